"""The parts of a Stable Diffusion pipeline that adapters attach to, and where base models come from."""

from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from .errors import ModelError
from .keys import TEXT_ENCODERS


def _is_unet(module) -> bool:
    return hasattr(module, "down_blocks") and hasattr(module, "up_blocks") and hasattr(module, "config")


def _is_text_encoder(module) -> bool:
    return type(module).__name__.startswith("CLIPTextModel")


def components(target) -> dict[str, nn.Module]:
    """{"unet": ..., "text_encoder": ..., ["text_encoder_2": ...]} of a pipeline or a bare model."""
    if _is_unet(target):
        return {"unet": target}
    if _is_text_encoder(target):
        return {"text_encoder": target}
    found = {}
    for name in ("unet", *TEXT_ENCODERS):
        module = getattr(target, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    if "unet" not in found:
        raise TypeError(
            f"expected a Stable Diffusion pipeline (with .unet), a UNet2DConditionModel or a CLIPTextModel, "
            f"got {type(target).__name__}"
        )
    return found


def unet_block_counts(parts: dict[str, nn.Module]) -> dict[str, int]:
    unet = parts.get("unet")
    if unet is None:
        return {"down": 0, "mid": 0, "up": 0}
    return {"down": len(unet.down_blocks), "mid": int(unet.mid_block is not None), "up": len(unet.up_blocks)}


CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def _looks_like_hub_id(model: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", model)) and not model.startswith((".", "/"))


def check_model_source(model: str, model_config: str | None = None) -> None:
    """Refuse, before anything loads, a model that is no folder, checkpoint file or hub id."""
    path = Path(model)
    if path.is_dir():
        if not (path / "unet").is_dir() and not (path / "model_index.json").is_file():
            raise ModelError(f"model folder {model} has no unet/ subfolder or model_index.json: give a diffusers "
                             "folder, a checkpoint file (.safetensors / .ckpt), or a hub id")
    elif path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise ModelError(f"model file {model} is not a checkpoint sdlora reads: give a .safetensors or .ckpt "
                             "file, a diffusers folder, or a hub id")
    elif not _looks_like_hub_id(model):
        raise ModelError(f"model {model!r} does not exist: give a diffusers folder, a checkpoint file "
                         "(.safetensors / .ckpt), or a hub id (org/name)")
    if model_config is not None and not Path(model_config).is_dir():
        raise ModelError(f"model config folder {model_config} does not exist: give a diffusers folder whose "
                         "configs describe the checkpoint's architecture")


def native_resolution(pipe) -> int:
    """The size the model was trained at: its UNet's sample size times the VAE's downscaling."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.unet.config.sample_size * scale


def load_pipeline(model: str, dtype=None):
    """A Stable Diffusion (XL) pipeline from a diffusers folder or a hub id, without the safety checker."""
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = Path(model) / "model_index.json"
    class_name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    try:
        if "XL" in class_name:
            return StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, add_watermarker=False)
        return StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load the model {model!r}: {error}") from None
