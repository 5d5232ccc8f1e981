"""Shipped diffusers configs of the base architectures, and which one a single-file checkpoint is.

Each folder here (`sd15`, `sd21-base`, `sd21-v`, `sdxl-base`) is a diffusers model folder without
weights: model_index.json and every component's config, copied from the public diffusers-format
releases (stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base, -2-1 and
-xl-base-1.0). With them a single `.safetensors`/`.ckpt` loads with no network. Tokenizer folders
hold only tokenizer_config.json: the vocabulary comes from `clip-bpe.txt.gz` (see clip_tokenizer.py).
tests/test_sources.py builds every model from these configs on the meta device and checks the
parameter counts against the real models'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from ..errors import UnknownArchitecture
from .checkpoints import UNET_PREFIX as UNET
from .checkpoints import VAE_PREFIX as VAE
from .families import FAMILIES, SDXL, family_of_architecture, family_of_context_width

ARCHITECTURES = tuple(name for family in FAMILIES.values() for name in family.shipped_architectures)

# SDXL's size/crop conditioning input: base 1.0 takes 2816 (1280 pooled + 6 x 256); the refiner 2560.
SDXL_BASE_ADM_CHANNELS = 2816


def config_folder(name: str) -> Path:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; shipped: {', '.join(ARCHITECTURES)}")
    return Path(str(resources.files(__package__) / "configs" / name))


def unet_config(name: str) -> dict:
    """A shipped architecture's UNet config, as a dict."""
    return json.loads((config_folder(name) / "unet" / "config.json").read_text())


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...] | None:
    return tuple(shapes[key]) if key in shapes else None


def _context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The text width the UNet cross-attends to (the input width of any attn2.to_k)."""
    for key, shape in shapes.items():
        if key.startswith(UNET) and key.endswith(".attn2.to_k.weight"):
            return tuple(shape)[-1]
    return None


def detect(shapes: Mapping[str, tuple[int, ...]], prediction_type: str | None = None) -> str:
    """Which shipped architecture an original-layout checkpoint (parameter name -> shape) is.

    SD 2.x 512-base (epsilon) and 768-v (v_prediction) have identical weights; like diffusers we
    take 768-v unless `prediction_type` is "epsilon".
    """
    if not any(key.startswith(UNET) for key in shapes):
        raise UnknownArchitecture(
            f"it has no UNet weights ({UNET}...): it is not a full Stable Diffusion checkpoint "
            "(a LoRA, a VAE or a text encoder alone?)"
        )
    conv_in = _shape(shapes, UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise UnknownArchitecture(
            f"its UNet takes {conv_in[1]} input channels, not 4: an inpainting or instruct-pix2pix model, "
            "which sdlora does not ship a config for"
        )
    adm = _shape(shapes, UNET + "label_emb.0.0.weight")
    if adm is not None:
        if adm[1] == SDXL_BASE_ADM_CHANNELS:
            return SDXL.standard_architecture
        raise UnknownArchitecture(
            f"its UNet takes a {adm[1]}-wide size/class conditioning; SDXL base takes {SDXL_BASE_ADM_CHANNELS} "
            "(an SDXL refiner or another variant?)"
        )
    family = family_of_context_width(_context_dim(shapes))
    if family is not None and not family.size_conditioning:  # SDXL's width alone, without its size input
        return family.shipped_architecture(prediction_type)
    raise UnknownArchitecture(f"its UNet cross-attends to width {_context_dim(shapes)}, which is neither SD 1.x "
                              "(768) nor SD 2.x (1024)")


def missing_components(shapes: Mapping[str, tuple[int, ...]], name: str) -> list[str]:
    """The parts of architecture `name` that the checkpoint holds no weights for."""
    wanted = {"UNet": (UNET,), "VAE": (VAE,)}
    encoders = list(family_of_architecture(name).checkpoint_text_encoders.values())
    for index, encoder in enumerate(encoders):
        wanted[f"text encoder {index + 1}" if len(encoders) > 1 else "text encoder"] = (encoder.prefix,)
    return [part for part, prefixes in wanted.items()
            if not any(key.startswith(prefixes) for key in shapes)]
