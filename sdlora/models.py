"""The parts of a Stable Diffusion pipeline that adapters attach to, and which family it is."""

from __future__ import annotations

from torch import nn

from .keys import FAMILIES, TEXT_ENCODERS, Family


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


def detect_family(parts: dict[str, nn.Module]) -> Family:
    """SD 1.x, 2.x or SDXL, from the UNet config (or the text encoder's width when alone)."""
    unet = parts.get("unet")
    if "text_encoder_2" in parts or (unet is not None and unet.config.get("addition_embed_type") == "text_time"):
        return FAMILIES["sdxl"]
    width = unet.config.cross_attention_dim if unet is not None else parts["text_encoder"].config.hidden_size
    return FAMILIES["sd2"] if width == 1024 else FAMILIES["sd1"]


def unet_block_counts(parts: dict[str, nn.Module]) -> dict[str, int]:
    unet = parts.get("unet")
    if unet is None:
        return {"down": 0, "mid": 0, "up": 0}
    return {"down": len(unet.down_blocks), "mid": int(unet.mid_block is not None), "up": len(unet.up_blocks)}


def load_pipeline(model: str, dtype=None):
    """A StableDiffusionPipeline from a diffusers folder or a hub id, without the safety checker."""
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            model, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise OSError(f"could not load the model {model!r}: {error}") from None
