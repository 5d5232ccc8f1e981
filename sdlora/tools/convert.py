"""Converting adapter files between the layouts other tools read, without loss.

    kohya      lora_unet_… / lora_te_… (SDXL: original UNet names, lora_te1_ / lora_te2_), alpha tensors:
               what A1111 and ComfyUI read, and diffusers too
    diffusers  unet.<path>.lora_A.weight / lora_B.weight, text_encoder(_2).…, alphas in the
               `lora_adapter_metadata` header: what diffusers' save_lora_weights writes (PEFT names)
    comfy      diffusion_model.<original path>.…, text_encoders.clip_l.transformer.…: ComfyUI's own

A file names modules, not a model, and kohya names lose the dots of module paths; so conversion reads
the file against a model's module names: the model given, or the family's standard architecture
(`sdlora.files.standard.read_against`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..base_models.families import Family
from ..base_models.module_keys import split_key
from ..errors import AdapterFileError
from ..files.layouts import to_kohya
from ..files.safetensors import write_adapter
from ..files.standard import read_against

LAYOUTS = ("kohya", "diffusers", "comfy")


def to_comfy(modules: dict, family: Family, original_paths: dict[str, str]) -> dict[str, torch.Tensor]:
    """ComfyUI's own names: `diffusion_model.<original path>`, `text_encoders.<clip>.transformer.<path>`."""
    clips = {component: clip for clip, component in family.comfy_text_encoders.items()}
    state_dict = {}
    for key, weights in modules.items():
        component, path = split_key(key)
        name = (f"diffusion_model.{original_paths[path]}" if component == "unet"
                else f"text_encoders.{clips[component]}.transformer.{path}")
        state_dict |= {f"{name}.{role}": tensor for role, tensor in weights.tensors.items()}
        if weights.alpha is not None:
            state_dict[f"{name}.alpha"] = torch.tensor(float(weights.alpha))
    return state_dict


def to_diffusers(modules: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT names under each component, and the alphas in the header as diffusers keeps them."""
    state_dict, configs = {}, {}
    for key, weights in modules.items():
        if weights.kind != "lora":
            raise AdapterFileError(f"{key} is {weights.kind}: diffusers' layout holds plain LoRA only; convert "
                                   "to kohya or comfy, which hold LyCORIS kinds")
        state_dict[f"{key}.lora_A.weight"] = weights.down
        state_dict[f"{key}.lora_B.weight"] = weights.up
        component, path = split_key(key)
        # The header's module paths are matched by PEFT against the end of the model's own module names, and
        # transformers 5's CLIP has no `text_model.`: diffusers strips it from tensor names but not from the
        # header, and refuses a target `text_model.…` (NoMatchingPeftModuleError). A path without it ends both
        # the old and the new module names; the tensor names keep it, which old and new diffusers both read.
        configs.setdefault(component, {})[path.removeprefix("text_model.")] = (weights.rank, weights.effective_alpha)
    header = {}
    for component, per_module in configs.items():
        rank = Counter(r for r, _ in per_module.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in per_module.values()).most_common(1)[0][0]
        # exact per-module values: PEFT's patterns are matched against the end of module paths
        header |= {f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                   f"{component}.rank_pattern": {p: r for p, (r, _) in per_module.items() if r != rank},
                   f"{component}.alpha_pattern": {p: a for p, (_, a) in per_module.items() if a != alpha},
                   f"{component}.target_modules": sorted(per_module)}
    return state_dict, {"lora_adapter_metadata": json.dumps(header, sort_keys=True)}


def convert(path: str | Path, layout: str, output: str | Path, model=None) -> Path:
    """Write the file at `path` in another layout; the tensors are carried over unchanged."""
    if layout not in LAYOUTS:
        raise AdapterFileError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    path, output = Path(path), Path(output)
    read = read_against(path, model, doing="conversion")
    keep = {k: v for k, v in read.metadata.items() if k != "lora_adapter_metadata"}
    if layout == "kohya":
        state_dict = to_kohya(read.modules, read.family, None, read.original)
    elif layout == "comfy":
        state_dict = to_comfy(read.modules, read.family, read.original)
    else:
        state_dict, header = to_diffusers(read.modules)
        keep |= header
    keep.setdefault("ss_base_model_version", read.family.base_model_version)
    keep["sdlora_converted_from"] = f"{read.layout} ({path.name})"
    return write_adapter(output, {k: v.contiguous() for k, v in state_dict.items()}, keep)



