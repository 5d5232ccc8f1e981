"""The parts of a Stable Diffusion pipeline that adapters attach to, and its native size."""

from __future__ import annotations

from torch import nn

from .module_keys import TEXT_ENCODERS


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


def native_resolution(pipe) -> int:
    """The size the model was trained at: its UNet's sample size times the VAE's downscaling."""
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return pipe.unet.config.sample_size * scale
