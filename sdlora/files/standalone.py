"""An adapter file's modules by the kohya names it gives them, without a model: what merging and
resizing files work on, and how their results are written back.

kohya names lose the dots of module paths, so without a model they cannot become module keys; they
are used as they are. Dotted names (PEFT and older diffusers files) are turned into the kohya name
of the same module, by its diffusers path. Output is the kohya layout, which every reader takes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .safetensors import build_metadata, read_adapter
from ..errors import AdapterFileError
from ..base_models.families import SD1, SDXL, Family, family_from_tensors, family_named_in_metadata
from .layouts import (ModuleTensors, describe_unsupported, dotted_module_key, module_state_dict, module_tensors,
                      group_tensors, peft_alpha, peft_alphas)
from ..base_models.module_keys import split_key
from .names import block_kind, block_of, component_of_file_key
from ..adapters.kinds import is_whole
from ..base_models.sgm import unet_module_map

# Which UNet naming a kohya name uses: the original (SGM) layout or diffusers' block names.
_SGM_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_")
_DIFFUSERS_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
@dataclass
class AdapterModules:
    """One file's modules (kohya name -> weights) and what its header and tensors say about it."""

    path: Path
    modules: dict[str, ModuleTensors]
    family: Family | None
    metadata: dict[str, str]
    dtype: torch.dtype  # of its LoRA tensors (the widest when mixed)

    @property
    def unet_naming(self) -> str | None:
        """"original" or "diffusers" for the UNet names this file uses, None when it has no UNet module."""
        if any(_SGM_UNET.match(name) for name in self.modules):
            return "original"
        if any(_DIFFUSERS_UNET.match(name) for name in self.modules):
            return "diffusers"
        return None


def group_of(name: str) -> str:
    """The part of the model a kohya module name belongs to, for reports: the kind of its UNet block
    (`down`, `mid`, `up`, `other`) or its text encoder, in the vocabulary inspect uses too."""
    return block_kind(block_of(name, component_of_file_key(name)))


def widest_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    distinct = set(dtypes)
    if len(distinct) == 1:
        return distinct.pop()
    return torch.float32  # fp16 and bf16 together, or anything with fp32: only fp32 holds both


def _kohya_name(name: str, family: Family | None, has_second_encoder: bool) -> str | None:
    if name.startswith("lora_"):
        return name
    key = dotted_module_key(name)
    if key is None:
        return None
    component, path = split_key(key)
    family = family or (SDXL if has_second_encoder else SD1)  # SD 1.x and 2.x share their prefixes
    return f"{family.kohya_prefixes[component]}_{path.replace('.', '_')}"


def read_modules(path: str | os.PathLike) -> AdapterModules:
    """Read an adapter file of any layout sdlora reads into kohya-named modules; refuse what cannot be used."""
    path = Path(path)
    tensors, metadata = read_adapter(path)
    family = family_named_in_metadata(metadata) or family_from_tensors(tensors)
    has_second_encoder = any(key.startswith("text_encoder_2.") for key in tensors)
    configs = peft_alphas(metadata)
    by_file_name, sources, unreadable = group_tensors(tensors)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    dotted: dict[str, str] = {}  # kohya name -> the module key, for PEFT alphas
    for file_name, roles in by_file_name.items():
        name = _kohya_name(file_name, family, has_second_encoder)
        if not name:
            unreadable += sources[file_name]
            continue
        grouped.setdefault(name, {}).update(roles)
        if not file_name.startswith("lora_"):
            dotted[name] = dotted_module_key(file_name)
    if unreadable:
        raise AdapterFileError(f"{path}: {len(unreadable)} tensor(s) sdlora cannot read as LoRA, first "
                               f"{unreadable[:3]}" + describe_unsupported(unreadable))
    modules = {}
    for name, roles in grouped.items():
        module = module_tensors(roles)
        if not is_whole(module.tensors):
            raise AdapterFileError(f"{path}: module {name} has no {'up' if 'lora_down.weight' in roles else 'down'} "
                                   "tensor; the file is incomplete")
        if module.alpha is None and name in dotted and split_key(dotted[name])[0] in configs and \
                module.rank is not None:
            component, module_path = split_key(dotted[name])
            module.alpha = peft_alpha(configs[component], module_path, module.rank)
        modules[name] = module
    if not modules:
        raise AdapterFileError(f"{path}: holds no LoRA tensors")
    dtype = widest_dtype([t.dtype for m in modules.values() for t in m.tensors.values()])
    return AdapterModules(path, modules, family, metadata, dtype)


def kohya_state_dict(modules: dict[str, ModuleTensors], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """kohya-named modules -> the tensors of a kohya file (alpha in fp32, as formats.to_kohya writes it)."""
    return {key: tensor for name, weights in modules.items()
            for key, tensor in module_state_dict(name, weights, dtype).items()}


def original_unet_names(family: Family) -> dict[str, str]:
    """kohya UNet name by diffusers path -> by the original layout, for the family's standard UNet (from the
    shipped config)."""
    from ..base_models.architectures import unet_config

    prefix = family.kohya_prefixes["unet"]
    return {f"{prefix}_{path.replace('.', '_')}": f"{prefix}_{original.replace('.', '_')}"
            for path, original in unet_module_map(unet_config(family.standard_architecture)).items()}


def with_original_unet_names(adapter: AdapterModules, family: Family) -> AdapterModules | None:
    """A file's UNet modules renamed from diffusers' block names to the original layout's, for a family that
    kohya and A1111 name that way (SDXL) and whose fine-tunes share its standard UNet's layout. None when the
    file may be for another UNet (SDXL's refiner cross-attends to 1280 wide text, not base's 2048) or has a
    module outside the standard layout."""
    table = original_unet_names(family)
    renamed = {}
    for name, weights in adapter.modules.items():
        if "attn2_to_k" in name and weights.kind == "lora" and \
                weights.down.flatten(1).shape[1] != family.context_width:
            return None
        if name.startswith("lora_unet_"):
            if name not in table:
                return None
            name = table[name]
        renamed[name] = weights
    return AdapterModules(adapter.path, renamed, adapter.family, adapter.metadata, adapter.dtype)


def training_facts(metadata: dict[str, str]) -> tuple[str, tuple[int, ...] | None]:
    """The prediction type and resolution an input file's header states, to carry them over."""
    v = metadata.get("modelspec.prediction_type") == "v" or metadata.get("ss_v_parameterization") == "True"
    match = re.fullmatch(r"(\d+)x(\d+)", metadata.get("modelspec.resolution", ""))
    return ("v_prediction" if v else "epsilon"), (tuple(int(n) for n in match.groups()) if match else None)


def output_metadata(modules: dict[str, ModuleTensors], family: Family | None, title: str, source: dict[str, str],
                    record: dict) -> dict[str, str]:
    """The header of a file made from other files: their family, prediction type and resolution, and
    `record` (what was done) in sdlora's JSON record. With no family stated by any input, none is
    written: the header says what is known, not a guess."""
    prediction_type, resolution = training_facts(source)
    metadata = build_metadata(modules, family or SD1, title=title, extra=record, prediction_type=prediction_type,
                              resolution=resolution)
    if family is None:  # the family keys as the input had them (none, or only some), not SD 1.x's
        for key in SD1.header(prediction_type, resolution):
            metadata.pop(key, None)
            if key in source:
                metadata[key] = source[key]
        sdlora_record = json.loads(metadata["sdlora"])
        del sdlora_record["family"]
        metadata["sdlora"] = json.dumps(sdlora_record, sort_keys=True)
    return metadata


