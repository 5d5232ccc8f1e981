"""Per-block weights as the A1111 "LoRA Block Weight" extension writes them, so that a vector or a preset
copied from there means the same layers here.

The extension names blocks of the original (SGM) UNet layout: BASE is the text encoders, INnn is
`input_blocks.nn`, M00 is `middle_block`, OUTnn is `output_blocks.nn`. Layers outside every block
(the time embedding, conv_out) keep weight 1.

    "OUTD"                                  a preset (PRESETS: the extension's own)
    "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"     a vector, as text or as a list of numbers
    {"IN04": 0.5, "M00": 0.0}               blocks by name, on any UNet with an original layout;
                                            blocks not named keep 1

A vector's length says which blocks its numbers are for (BLOCK_IDS): 17 (the blocks that hold attention)
or 26 (all) for SD 1.x and 2.x, whose UNets have 12 input blocks; 12 or 20 for SDXL, which has 9.
Blocks a vector leaves out get 0, as in the extension: a 17-value vector switches off a LoCon's layers
in IN00 (conv_in), the downsamplers and OUT00-OUT02.

Pure functions, no torch.
"""

from __future__ import annotations

import re
from typing import Collection, Mapping, Sequence, Union

from ..base_models.module_keys import TEXT_ENCODERS

_IN = [f"IN{i:02d}" for i in range(12)]
_OUT = [f"OUT{i:02d}" for i in range(12)]
BLOCK_IDS: dict[int, tuple[str, ...]] = {
    # SD 1.x / 2.x: the input blocks with attention (1, 2, 4, 5, 7, 8), the middle, output 3-11.
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[3:]),
    26: ("BASE", *_IN, "M00", *_OUT),
    # SDXL: attention in input blocks 4, 5, 7, 8 and output blocks 0-5.
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_OUT[:6]),
    20: ("BASE", *_IN[:9], "M00", *_OUT[:9]),
}
LAYOUTS = {12: ("SD 1.x/2.x", (17, 26)), 9: ("SDXL", (12, 20))}  # input blocks -> (name, vector lengths)

_ONE, _NONE = "1," * 16 + "1", "0," * 16 + "0"
PRESETS: dict[str, str] = {  # the extension's default presets (all 17 values: SD 1.x/2.x)
    "NONE": _NONE,
    "ALL": _ONE,
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
# Blocks to train in (the blocks training option): B-LoRA's for SDXL, where up_blocks.0.attentions.0 holds
# an image's content and up_blocks.0.attentions.1 its style.
TRAINING_PRESETS: dict[str, tuple[str, ...]] = {"b-lora-content": ("OUT00",), "b-lora-style": ("OUT01",)}
_BLOCK_NAME = re.compile(r"BASE|IN\d\d|M00|OUT\d\d")
_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)")

BlockWeights = Union[str, Sequence[float], Mapping[str, float]]


def block_id(component: str, original_path: str | None) -> str | None:
    """The block a layer is in: `BASE` for the text encoders; for the UNet, from its path in the
    original layout (`input_blocks.4.1.proj_in` -> IN04); None outside every block."""
    if component in TEXT_ENCODERS:
        return "BASE"
    if original_path is None:
        return None
    if match := re.match(r"(input|output)_blocks\.(\d+)\.", original_path):
        return f"{'IN' if match[1] == 'input' else 'OUT'}{int(match[2]):02d}"
    if original_path.startswith("middle_block."):
        return "M00"
    return None


def is_unet_block(name: str) -> bool:
    """Whether `name` names a UNet block (IN04, M00, OUT01), whichever the model has."""
    return bool(_BLOCK_NAME.fullmatch(name)) and name != "BASE"


def is_block_weights(strength) -> bool:
    """Whether a strength is in one of this module's forms (not a number or a per-component dict)."""
    if isinstance(strength, str):
        return True
    if isinstance(strength, (list, tuple)):
        return True
    return isinstance(strength, Mapping) and bool(strength) and all(
        isinstance(key, str) and _BLOCK_NAME.fullmatch(key) for key in strength)


def from_text(text: str) -> BlockWeights | None:
    """Block weights written on a command line: a preset (`OUTD`), a vector (`1,0,0,...`) or blocks by
    name (`IN04=0.5,M00=0`); None when the text is none of these."""
    if text in PRESETS:
        return text
    parts = text.split(",")
    if len(parts) > 1 and all(_NUMBER.fullmatch(part.strip()) for part in parts):
        return text
    pairs = [part.partition("=") for part in parts]
    if all(eq and _BLOCK_NAME.fullmatch(name.strip()) and _NUMBER.fullmatch(value.strip())
           for name, eq, value in pairs):
        return {name.strip(): float(value) for name, _, value in pairs}
    return None


def parse_vector(text: str) -> list[float]:
    """A preset name or comma-separated numbers -> the numbers; ValueError naming what is wrong."""
    text = PRESETS.get(text.strip(), text)
    try:
        return [float(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"strength {text!r} is not a number, a block-weight preset ({', '.join(PRESETS)}) "
                         "or block weights as comma-separated numbers") from None


def block_weights(spec: BlockWeights, model_blocks: Collection[str]) -> dict[str, float]:
    """The weight of every block of a model (`model_blocks`: the block ids its layers are in), from a
    spec in any form above; ValueError naming the problem when the spec does not fit this model."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(model_blocks))
        if unknown:
            raise ValueError(f"block weights name {', '.join(unknown)}, which this model does not have; its "
                             f"blocks are {', '.join(sort_blocks(model_blocks))}")
        return {block: float(spec.get(block, 1.0)) for block in model_blocks}
    values = parse_vector(spec) if isinstance(spec, str) else [float(value) for value in spec]
    inputs = sum(block.startswith("IN") for block in model_blocks)
    layout, lengths = LAYOUTS.get(inputs, (None, ()))
    if len(values) not in lengths:
        fits = {length: name for name, counts in LAYOUTS.values() for length in counts}
        what = (f"a {len(values)}-value vector is for {fits[len(values)]} UNets" if len(values) in fits
                else f"a vector of {len(values)} values fits no UNet")
        want = (f"this {layout} UNet takes {' or '.join(map(str, lengths))} values "
                f"({','.join(BLOCK_IDS[lengths[0]])})" if layout
                else f"this UNet ({inputs} input blocks) has no block-weight vectors: name its blocks "
                     f"({', '.join(sort_blocks(model_blocks))}) in a dict instead")
        raise ValueError(f"block weights {_show(spec)}: {what}; {want}")
    named = dict(zip(BLOCK_IDS[len(values)], values))
    return {block: named.get(block, 0.0) for block in model_blocks}


def sort_blocks(blocks: Collection[str]) -> list[str]:
    """BASE, IN00..., M00, OUT00... in the order the extension lists them."""
    return sorted(blocks, key=lambda block: BLOCK_IDS[26].index(block) if block in BLOCK_IDS[26] else 99)


def scaled_vector(spec: str | Sequence[float], factor: float) -> list[float]:
    """A vector or preset with every weight times `factor` (a grid over strengths scales each block)."""
    values = parse_vector(spec) if isinstance(spec, str) else [float(value) for value in spec]
    return [value * factor for value in values]


def _show(spec) -> str:
    if isinstance(spec, str):
        return repr(spec if len(spec) <= 40 else spec[:37] + "...")
    return f"[{len(list(spec))} values]"
