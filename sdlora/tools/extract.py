"""Extracting a LoRA from a fine-tuned model: the best low-rank fit of each layer's change.

For every Linear and Conv2d layer the target patterns pick (the UNet's and the text encoders'),
the update tuned - base is decomposed by SVD and truncated to the rank asked for. The file is
written in the kohya layout for the base model's family (the original block names for SDXL), so
that it loads wherever a trained adapter would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..files.reduce import Reduction, reduce
from ..files.safetensors import SAVE_DTYPES, build_metadata, check_output, write_adapter
from ..errors import ConfigError, ModelError
from ..base_models.families import detect_family
from ..files.derived import kohya_state_dict
from ..files.layouts import ModuleTensors
from ..base_models.module_keys import module_key
from ..files.names import kohya_name
from ..base_models.parts import components, native_resolution
from ..base_models.sgm import unet_module_map
from ..adapters.targets import patterns_for, select


def chosen_components(parts: dict[str, nn.Module], names: list[str] | None) -> list[str]:
    """The components asked for (all the model has by default), refusing names it does not have."""
    if not names:
        return list(parts)
    unknown = [name for name in names if name not in parts]
    if unknown:
        raise ConfigError(f"--components: this model has no {', '.join(unknown)}; it has {', '.join(parts)}")
    return names


def layer_pairs(base: dict[str, nn.Module], tuned: dict[str, nn.Module], targets: str | list[str],
                chosen: list[str]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """module key -> (base layer, tuned layer) for every targeted layer, checked to correspond."""
    pairs = {}
    for component in chosen:
        patterns = patterns_for(targets, component)
        paths = select(base[component], patterns)
        if not paths:
            raise ConfigError(f"targets {targets!r} match no Linear or Conv2d layer of the {component}")
        for path in paths:
            layer = base[component].get_submodule(path)
            try:
                other = tuned[component].get_submodule(path)
            except AttributeError:
                raise ModelError(f"the tuned model's {component} has no layer {path}: the two models have different "
                                 "architectures, so nothing can be extracted") from None
            if other.weight.shape != layer.weight.shape:
                raise ModelError(f"{component}.{path} is {list(layer.weight.shape)} in the base model but "
                                 f"{list(other.weight.shape)} in the tuned one: the models have different "
                                 "architectures")
            pairs[module_key(component, path)] = (layer, other)
    return pairs


def extract(base_pipe, tuned_pipe, rank: int, targets: str | list[str] = "attn-mlp",
            component_names: list[str] | None = None,
            device: torch.device | str | None = None) -> tuple[dict[str, ModuleTensors], Reduction, list[str]]:
    """kohya module name -> rank-`rank` LoRA of tuned - base, the truncation report, and the kohya
    names of targeted layers that did not change at all (left out of the file)."""
    base, tuned = components(base_pipe), components(tuned_pipe)
    family = detect_family(base)
    if detect_family(tuned) is not family:
        raise ModelError(f"the base model is {family.title} but the tuned one is {detect_family(tuned).title}: "
                         "extract from two models of one family")
    pairs = layer_pairs(base, tuned, targets, chosen_components(base, component_names))
    original_paths = unet_module_map(dict(base["unet"].config)) if family.sgm_unet_names else None
    unchanged: list[str] = []

    def differences() -> Iterator[tuple[str, torch.Tensor]]:
        for key, (layer, other) in pairs.items():
            name = kohya_name(family, key, original_paths)
            delta = other.weight.detach().to(device, torch.float32) - layer.weight.detach().to(device, torch.float32)
            if not delta.any():  # a frozen text encoder, say: an all-zero module would only add bytes
                unchanged.append(name)
                continue
            yield name, delta

    modules, report = reduce(differences(), rank=rank, device=device, desc="extract", total=len(pairs))
    return modules, report, unchanged


def load_model(model: str):
    from ..base_models.sources import load_pipeline

    # fp32 whatever the files hold: a fine-tune's change is small next to its weights, and fp16
    # weights would round it away.
    return load_pipeline(model, torch.float32)


def extract_file(base_model: str, tuned_model: str, output: Path, rank: int, targets: str = "attn-mlp",
                 component_names: list[str] | None = None, dtype: str = "fp16") -> tuple[Reduction, list[str]]:
    """Load both models, extract, and write the adapter; returns the report and the unchanged layers."""
    check_output(output)
    if rank <= 0:
        raise ConfigError(f"--rank must be > 0, got {rank}")
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    try:
        patterns_for(targets, "unet")  # an unknown preset fails now, not after loading two models
    except ValueError as error:
        raise ConfigError(str(error)) from None
    base_pipe, tuned_pipe = load_model(base_model), load_model(tuned_model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modules, report, unchanged = extract(base_pipe, tuned_pipe, rank, targets, component_names, device)
    if not modules:
        raise ModelError(f"{tuned_model} has the same weights as {base_model} in every targeted layer: "
                         "there is nothing to extract")
    parts = components(base_pipe)
    family = detect_family(parts)
    chosen = chosen_components(parts, component_names)
    metadata = build_metadata(
        modules, family, title=output.stem, targets={c: patterns_for(targets, c) for c in chosen},
        extra={"extracted_from": {"base": os.fspath(base_model), "tuned": os.fspath(tuned_model)},
               "extract_rank": rank},
        prediction_type=tuned_pipe.scheduler.config.prediction_type, resolution=native_resolution(tuned_pipe))
    write_adapter(output, kohya_state_dict(modules, SAVE_DTYPES[dtype]), metadata)
    return report, unchanged
