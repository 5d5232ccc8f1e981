"""Which layers get adapters: presets as data, and selection of a model's modules by pattern."""

from __future__ import annotations

import re

from torch import nn

from .lora import SUPPORTED_LAYERS, AdaptedLayer

_ATTN_UNET = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_ATTN_TE = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
_MLP_UNET = r"(ff\.net\.0\.proj|ff\.net\.2|attentions\.\d+\.proj_in|attentions\.\d+\.proj_out)$"
_MLP_TE = r"mlp\.(fc1|fc2)$"
_CONV_UNET = r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$"

# Regular expressions searched in module paths, per component. `attn-mlp` is kohya's default set;
# `full` adds the ResNet and resampling convs (LoCon). `convs` adapts the UNet's convs alone (with the
# text encoder's attention and MLP): a shape adapter that leaves the UNet's transformers to a stacked
# style adapter.
PRESETS: dict[str, dict[str, list[str]]] = {
    "attn": {"unet": [_ATTN_UNET], "text_encoder": [_ATTN_TE]},
    "attn-mlp": {"unet": [_ATTN_UNET, _MLP_UNET], "text_encoder": [_ATTN_TE, _MLP_TE]},
    "full": {"unet": [_ATTN_UNET, _MLP_UNET, _CONV_UNET], "text_encoder": [_ATTN_TE, _MLP_TE]},
    "convs": {"unet": [_CONV_UNET], "text_encoder": [_ATTN_TE, _MLP_TE]},
}


def patterns_for(targets: str | list[str], component: str) -> list[str]:
    """A preset name, or a list of regular expressions used as they are for every component."""
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ValueError(f"unknown targets preset {targets!r}; choose one of {', '.join(PRESETS)} "
                             "or give a list of module-name patterns")
        # The second SDXL text encoder has the same layer names as the first.
        return PRESETS[targets]["text_encoder" if component.startswith("text_encoder") else component]
    for pattern in targets:
        re.compile(pattern)
    return list(targets)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """path -> layer for every Linear and Conv2d an adapter can attach to (already wrapped ones too)."""
    found = {}
    inside = None  # named_modules is depth-first: a wrapper's own layers come right after it
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(module, AdaptedLayer):
            found[path] = module.base
            inside = path + "."
        elif isinstance(module, SUPPORTED_LAYERS):
            found[path] = module
    return found


def select(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the model's adaptable layers whose path matches any pattern (re.search)."""
    compiled = [re.compile(pattern) for pattern in patterns]
    return [path for path in adaptable_modules(model) if any(p.search(path) for p in compiled)]
