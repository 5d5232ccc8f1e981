"""The tensors and header of an adapter file made from other files or models (merge, resize, extract):
modules by their kohya name, written in the kohya layout, which every reader takes.
"""

from __future__ import annotations

import re

import torch

from ..base_models.families import Family
from .layouts import ModuleTensors, module_state_dict
from .safetensors import build_metadata


def widest_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    distinct = set(dtypes)
    if len(distinct) == 1:
        return distinct.pop()
    return torch.float32  # fp16 and bf16 together, or anything with fp32: only fp32 holds both


def kohya_state_dict(modules: dict[str, ModuleTensors], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya-named modules -> the tensors of a kohya file (alpha in fp32, as `layouts.to_kohya` writes it)."""
    return {key: tensor for name, weights in modules.items()
            for key, tensor in module_state_dict(name, weights, dtype).items()}


def training_facts(metadata: dict[str, str]) -> tuple[str, tuple[int, ...] | None]:
    """The prediction type and resolution an input file's header states, to carry them over."""
    v = metadata.get("modelspec.prediction_type") == "v" or metadata.get("ss_v_parameterization") == "True"
    match = re.fullmatch(r"(\d+)x(\d+)", metadata.get("modelspec.resolution", ""))
    return ("v_prediction" if v else "epsilon"), (tuple(int(n) for n in match.groups()) if match else None)


def output_metadata(modules: dict[str, ModuleTensors], family: Family, title: str, source: dict[str, str],
                    record: dict) -> dict[str, str]:
    """The header of a file made from other files: their family, prediction type and resolution, and
    `record` (what was done) in sdlora's JSON record."""
    prediction_type, resolution = training_facts(source)
    return build_metadata(modules, family, title=title, extra=record, prediction_type=prediction_type,
                          resolution=resolution)
