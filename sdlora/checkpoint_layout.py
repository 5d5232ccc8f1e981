"""Write a diffusers SD 1.x pipeline as one checkpoint in the original (LDM) layout.

Single-file checkpoints (`v1-5-pruned-emaonly.safetensors` and the like) hold the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
`cond_stage_model.transformer.`, named as the original code (and transformers 4) named them. We only
read such files in the product; this writer exists so tests can make one from a toy model. It is
checked against diffusers' own readers (`convert_ldm_*_checkpoint`) in tests/test_sources.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .sgm import unet_state_dict_to_original

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers' VAE attention part -> the original AttnBlock's (1x1 convolutions there, linear here).
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_original(state_dict: Mapping[str, Any], unet_config: Mapping[str, Any]) -> dict[str, Any]:
    return unet_state_dict_to_original(state_dict, unet_config, prefix=UNET_PREFIX)


def _vae_name(name: str, levels: int) -> str:
    """One diffusers AutoencoderKL parameter name in the original layout (without the prefix)."""
    name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
    name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    # The original decoder counts its levels from the lowest resolution up; diffusers from the top.
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.",
                  name)
    name = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                  lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
    name = name.replace(".conv_shortcut.", ".nin_shortcut.")
    attention = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)
    if attention:
        return f"{attention[1]}.mid.attn_1.{_VAE_ATTENTION[attention[2]]}.{attention[3]}"
    return name


def vae_to_original(state_dict: Mapping[str, Any], vae_config: Mapping[str, Any]) -> dict[str, Any]:
    levels = len(vae_config["block_out_channels"])
    out = {}
    for name, value in state_dict.items():
        original = _vae_name(name, levels)
        if ".mid.attn_1." in original and original.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        out[VAE_PREFIX + original] = value
    return out


def clip_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 flattened CLIPTextModel (no `text_model.`); the original layout keeps it."""
    return {CLIP_PREFIX + name.removeprefix("text_model."): value for name, value in state_dict.items()}


def pipeline_to_original(pipe) -> dict[str, Any]:
    """One original-layout state dict of an SD 1.x-style pipeline's UNet, VAE and text encoder."""
    return {
        **unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
        **clip_to_original(pipe.text_encoder.state_dict()),
    }
