"""A family's standard architecture, for reading an adapter file without a model.

A file names modules, not a model, and kohya names lose the dots of module paths; so a file is read against
a model's module names: the family's standard UNet and text encoders, built from the configs sdlora ships
with no weights (on the meta device), so that building them costs no memory and reads nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.targets import adaptable_modules
from ..base_models.families import Family
from ..base_models.sgm import unet_module_map
from .layouts import Parsed, parse_state_dict
from ..base_models.module_keys import module_key


def standard_parts(family: Family) -> dict[str, nn.Module]:
    """The family's standard UNet and text encoders, built from the shipped configs on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..base_models import architectures

    folder = architectures.config_folder(family.standard_architecture)
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))}
        for name in family.text_encoders:
            config = CLIPTextConfig.from_pretrained(folder / name)
            model = CLIPTextModelWithProjection if name in family.projected_text_encoders else CLIPTextModel
            parts[name] = model(config)
    return parts


def module_keys(parts: dict[str, nn.Module]) -> list[str]:
    """The module key of every layer an adapter may hold, in a model's parts."""
    return [module_key(component, path) for component, model in parts.items()
            for path in adaptable_modules(model)]


def parse_against(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: Family,
                  parts: dict[str, nn.Module]) -> tuple[Parsed, dict[str, str]]:
    """A file's modules by module key, read against `parts` (a model's, or `standard_parts(family)`), and the
    parts' UNet paths in the original layout (what kohya and ComfyUI names use)."""
    original = unet_module_map(dict(parts["unet"].config))
    return parse_state_dict(tensors, metadata, family, module_keys(parts), original), original
