"""Pure functions between module keys (base_models/module_keys.py) and other tools' key names:
kohya's `lora_unet_…`/`lora_te1_…` and the prefixes an adapter file's keys start with.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from ..base_models.module_keys import TEXT_ENCODERS, split_key

if TYPE_CHECKING:
    from ..base_models.families import Family


def kohya_name(family: Family, key: str, original_paths: dict[str, str] | None = None) -> str:
    """`unet.down_blocks.0.attentions.0...to_q` -> `lora_unet_down_blocks_0_attentions_0_..._to_q`.

    For a family that kohya names by the original UNet layout (SDXL), `original_paths` (diffusers
    module path -> original path, from `sgm.unet_module_map`) gives the UNet part.
    """
    component, path = split_key(key)
    if component not in family.kohya_prefixes:
        raise ValueError(f"{family.title} has no component {component!r} (key {key!r})")
    if component == "unet" and family.sgm_unet_names:
        if original_paths is None or path not in original_paths:
            raise ValueError(f"no original-layout name for UNet module {path!r}")
        path = original_paths[path]
    return f"{family.kohya_prefixes[component]}_{path.replace('.', '_')}"


def kohya_index(family: Family, keys: list[str], original_paths: dict[str, str] | None = None) -> dict[str, str]:
    """kohya name -> module key, for the modules of a model (kohya names lose the dots).

    UNet modules are found under both the diffusers path and, when `original_paths` is given, the
    original layout, since tools write either for any family (ComfyUI reads both); text-encoder
    modules with and without the canonical `text_model_`.
    """
    index = {}
    for key in keys:
        component, path = split_key(key)
        index[f"{family.kohya_prefixes[component]}_{path.replace('.', '_')}"] = key
        if component in TEXT_ENCODERS and path.startswith("text_model."):
            # tools running under transformers 5, whose CLIP has no `text_model`, write names without it
            index[f"{family.kohya_prefixes[component]}_{path.removeprefix('text_model.').replace('.', '_')}"] = key
        if component == "unet" and original_paths and path in original_paths:
            index[f"{family.kohya_prefixes[component]}_{original_paths[path].replace('.', '_')}"] = key
    return index


@functools.cache  # the same for every call, and asked once per module of a file
def _file_prefixes() -> tuple[tuple[str, str], ...]:
    """(prefix, component) for every prefix an adapter file's key may start with, longest first."""
    from ..base_models.families import FAMILIES  # here: families imports torch, and this module stays torch-free

    pairs = {(f"{prefix}_", component) for family in FAMILIES.values()
             for component, prefix in family.kohya_prefixes.items()}
    pairs |= {(f"{component}.", component) for component in ("unet", *TEXT_ENCODERS)}
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def component_of_file_key(file_key: str) -> str | None:
    """Which component an adapter file's key is for, judged from its prefix (kohya or diffusers)."""
    for prefix, component in _file_prefixes():
        if file_key.startswith(prefix):
            return component
    return None


# -- the one vocabulary every command's output names UNet blocks in: `down 1`, `mid`, `up 2`
# (diffusers' blocks), or `input 4`, `middle`, `output 3` where a name in the original layout cannot be
# placed in a diffusers block; text-encoder modules by their component (`text_encoder`, `text_encoder_2`).

_BLOCK_PATTERNS = (
    (r"(?:^|_)down_blocks_(\d+)_", "down {}"), (r"(?:^|_)up_blocks_(\d+)_", "up {}"),
    (r"(?:^|_)mid_block_", "mid"), (r"(?:^|_)input_blocks_(\d+)_", "input {}"),
    (r"(?:^|_)middle_block_", "middle"), (r"(?:^|_)output_blocks_(\d+)_", "output {}"),
)
_ORIGINAL_KINDS = {"input": "down", "middle": "mid", "output": "up"}
BLOCK_KINDS = ("down", "mid", "up", "other", *TEXT_ENCODERS)  # in the order reports list them


def block_of(name: str, component: str | None, original: dict[str, str] | None = None) -> str:
    """A module's block from its file name in any layout: `down 1`, `mid`, `up 2`, `other` (the UNet
    outside its blocks), or the text encoder's component. `original` (original UNet path with `_` ->
    diffusers path, for the model's UNet) places original-layout names in diffusers' blocks; without
    it they keep their own (`input 4`)."""
    if component not in (None, "unet"):
        return component
    flat = name.replace(".", "_")
    if original:
        unet_prefixes = [prefix.replace(".", "_") for prefix, part in _file_prefixes() if part == "unet"]
        for prefix in (*unet_prefixes, "diffusion_model_"):  # kohya's, diffusers', ComfyUI's
            if flat.startswith(prefix) and flat.removeprefix(prefix) in original:
                flat = original[flat.removeprefix(prefix)].replace(".", "_")
    for pattern, label in _BLOCK_PATTERNS:
        match = re.search(pattern, flat)
        if match:
            return label.format(*match.groups())
    return "other"


def block_kind(block: str) -> str:
    """`down 1` and `input 4` -> `down`; `mid`, `middle` -> `mid`; a component or `other` as it is."""
    head = block.split(" ")[0]
    return _ORIGINAL_KINDS.get(head, head)
