"""Write a diffusers SD pipeline as one checkpoint in the original (LDM/SGM) layout.

Single-file checkpoints (`v1-5-pruned-emaonly.safetensors` and the like) hold the UNet under
`model.diffusion_model.` and the VAE under `first_stage_model.`. The text encoders sit where the
original code kept them: SD 1.x's CLIP under `cond_stage_model.transformer.` (named as transformers 4
named it), SD 2.x's OpenCLIP under `cond_stage_model.model.` (OpenCLIP's own names, q/k/v fused),
SDXL's pair under `conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.`.
Tests make such files from a toy model with it, and `sdlora merge --into MODEL -o FILE.safetensors`
writes a model with adapters baked in as one.
It is checked against diffusers' own readers (`convert_ldm_*`, `convert_open_clip_checkpoint`) in
tests/test_sources.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from .families import SD1, Family, detect_family
from .parts import components
from .sgm import unet_state_dict_to_original

# Every family keeps its UNet and VAE here; where its text encoders sit is the family's
# (Family.checkpoint_text_encoders).
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

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


def clip_to_original(state_dict: Mapping[str, Any],
                     prefix: str = SD1.checkpoint_text_encoders["text_encoder"].prefix) -> dict[str, Any]:
    """transformers 5 flattened CLIPTextModel (no `text_model.`); the original layout keeps it."""
    return {prefix + "text_model." + name.removeprefix("text_model."): value for name, value in state_dict.items()}


# transformers' CLIP encoder-layer part -> OpenCLIP's residual-block part.
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def open_clip_to_original(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A CLIPTextModel(WithProjection) state dict in OpenCLIP's names under `prefix`.

    OpenCLIP keeps q, k and v as one in_proj (stacked in that order) and multiplies by
    text_projection on the right, so it stores the transpose of transformers' Linear weight.
    """
    state = {name.removeprefix("text_model."): value for name, value in state_dict.items()}
    out = {}
    for name, value in state.items():
        layer = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        if name in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[name]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if layer[2] == "self_attn.q_proj":  # write the fused tensor once, when meeting q
                parts = [state[f"encoder.layers.{layer[1]}.self_attn.{p}_proj.{layer[3]}"] for p in "qkv"]
                suffix = "weight" if layer[3] == "weight" else "bias"
                out[f"{prefix}transformer.resblocks.{layer[1]}.attn.in_proj_{suffix}"] = torch.cat(parts)
        elif layer:
            out[f"{prefix}transformer.resblocks.{layer[1]}.{_OPEN_CLIP_LAYER[layer[2]]}.{layer[3]}"] = value
        else:
            raise KeyError(f"{name!r} has no place in the OpenCLIP layout")
    return out


def pipeline_to_original(pipe, family: Family | None = None) -> dict[str, Any]:
    """One original-layout state dict of a pipeline's UNet, VAE and text encoder(s).

    The text encoders go where `family` keeps them (by default the pipeline's own family): SD 1.x's
    CLIP, SD 2.x's OpenCLIP, or SDXL's pair in SGM's conditioner.
    """
    family = family or detect_family(components(pipe))
    out = {**unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
           **vae_to_original(pipe.vae.state_dict(), pipe.vae.config)}
    for component, place in family.checkpoint_text_encoders.items():
        state = getattr(pipe, component).state_dict()
        out |= open_clip_to_original(state, place.prefix) if place.open_clip else clip_to_original(state, place.prefix)
    return out
