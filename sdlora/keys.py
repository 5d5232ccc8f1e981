"""Model families as data, and pure functions between module paths and other tools' key names.

A module key is `<component>.<canonical module path>`, for example
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. Text-encoder paths are canonical with
`text_model.` whatever the installed transformers builds (transformers 5 has no `.text_model`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Family:
    """What other tools call a model family, and how they name its LoRA modules."""

    name: str
    title: str
    kohya_prefixes: dict[str, str]
    base_model_version: str  # kohya's ss_base_model_version
    architecture: str  # modelspec.architecture
    implementation: str  # modelspec.implementation
    resolution: int
    prediction_type: str = "epsilon"
    sgm_unet_names: bool = False  # kohya names SDXL UNet modules by the original SGM layout
    aliases: tuple[str, ...] = field(default=())


FAMILIES: dict[str, Family] = {
    "sd1": Family(
        name="sd1", title="Stable Diffusion 1.x",
        kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
        base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", implementation="diffusers",
        resolution=512, aliases=("sd_v1", "stable-diffusion-v1"),
    ),
    "sd2": Family(
        name="sd2", title="Stable Diffusion 2.x",
        kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
        base_model_version="sd_v2", architecture="stable-diffusion-v2-512/lora", implementation="diffusers",
        resolution=512, aliases=("sd_v2", "stable-diffusion-v2"),
    ),
    "sdxl": Family(
        name="sdxl", title="Stable Diffusion XL",
        kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
        base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base/lora",
        implementation="https://github.com/Stability-AI/generative-models",
        resolution=1024, sgm_unet_names=True, aliases=("sdxl", "stable-diffusion-xl"),
    ),
}


def module_key(component: str, path: str) -> str:
    return f"{component}.{canonical_path(component, path)}"


def split_key(key: str) -> tuple[str, str]:
    component, _, path = key.partition(".")
    return component, path


def canonical_path(component: str, path: str) -> str:
    """The path other tools expect: text-encoder paths always start with `text_model.`."""
    if component in TEXT_ENCODERS and not path.startswith("text_model."):
        return "text_model." + path
    return path


def kohya_name(family: Family, key: str) -> str:
    """`unet.down_blocks.0.attentions.0...to_q` -> `lora_unet_down_blocks_0_attentions_0_..._to_q`."""
    component, path = split_key(key)
    if component not in family.kohya_prefixes:
        raise ValueError(f"{family.title} has no component {component!r} (key {key!r})")
    if component == "unet" and family.sgm_unet_names:
        raise NotImplementedError("kohya's SGM names for SDXL UNet modules are not supported yet")
    return f"{family.kohya_prefixes[component]}_{path.replace('.', '_')}"


def kohya_index(family: Family, keys: list[str]) -> dict[str, str]:
    """kohya name -> module key, for the modules of a model (kohya names lose the dots)."""
    return {kohya_name(family, key): key for key in keys}


_FILE_PREFIXES = (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te1_", "text_encoder"),
                  ("lora_te_", "text_encoder"), ("unet.", "unet"), ("text_encoder_2.", "text_encoder_2"),
                  ("text_encoder.", "text_encoder"))


def component_of_file_key(file_key: str) -> str | None:
    """Which component an adapter file's key is for, judged from its prefix (kohya or diffusers)."""
    for prefix, component in _FILE_PREFIXES:
        if file_key.startswith(prefix):
            return component
    return None


def unet_block(path: str) -> tuple[str, int] | None:
    """("down" | "mid" | "up", block index) for a UNet module path, None outside those blocks."""
    match = re.match(r"(down|up)_blocks\.(\d+)\.", path)
    if match:
        return match.group(1), int(match.group(2))
    if path.startswith("mid_block."):
        return "mid", 0
    return None


def family_named_in_metadata(metadata: dict[str, str]) -> Family | None:
    """The family an adapter file's metadata says it is for, if it says."""
    for field_name in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field_name, "")
        for family in FAMILIES.values():
            if value and any(value.startswith(alias) for alias in family.aliases):
                return family
    if metadata.get("ss_v2") == "True":
        return FAMILIES["sd2"]
    return None


def family_from_kohya_names(names: list[str]) -> Family | None:
    """SDXL files are recognisable from their key names alone; SD 1.x and 2.x share a layout."""
    if any(name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_"))
           for name in names):
        return FAMILIES["sdxl"]
    return None
