"""Which layer of a model a module key means: `<component>.<canonical module path>`, for example
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj`. Text-encoder paths are canonical with
`text_model.` whatever the installed transformers builds (transformers 5 has no `.text_model`).

Pure functions, no torch: the adapters, the file layouts and the loader all name layers this way.
"""

from __future__ import annotations

import re

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def module_key(component: str, path: str) -> str:
    return f"{component}.{canonical_path(component, path)}"


def split_key(key: str) -> tuple[str, str]:
    component, _, path = key.partition(".")
    return component, path


def canonical_path(component: str, path: str) -> str:
    """The path other tools expect: text-encoder paths start with `text_model.` (all but the projection
    of SDXL's second encoder, which sits beside it)."""
    if component in TEXT_ENCODERS and not path.startswith(("text_model.", "text_projection")):
        return "text_model." + path
    return path


def unet_block(path: str) -> tuple[str, int] | None:
    """("down" | "mid" | "up", block index) for a UNet module path, None outside those blocks."""
    match = re.match(r"(down|up)_blocks\.(\d+)\.", path)
    if match:
        return match.group(1), int(match.group(2))
    if path.startswith("mid_block."):
        return "mid", 0
    return None
