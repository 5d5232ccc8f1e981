"""Adapter strength: a float, per component, or per UNet block, resolved to one number per layer.

    0.8                                         every layer
    {"unet": 0.8, "text_encoder": 0.3}          per component; a component left out gets 1.0
    {"unet": {"down": 1.0, "mid": 0.5, "up": [0.2, 1.0]}}
                                                per UNet block: a float for all blocks of that kind or
                                                one value per block; a kind left out gets 1.0, and so
                                                do UNet layers outside the blocks (conv_in, time_embedding)
    "OUTD", "1,0,0,...", [1, 0, ...], {"IN04": 0.5}
                                                block weights as the A1111 "LoRA Block Weight" extension
                                                writes them: a preset, a vector or blocks by name, text
                                                encoders included (see sdlora.adapters.block_weights)

A step window (start, stop), fractions of the denoising steps, switches an adapter on for the steps
i of n with start <= i / n < stop only: (0, 1) every step, (0, 0) none, (0, 0.5) the first half.
"""

from __future__ import annotations

from typing import Collection, Union

from ..base_models.module_keys import unet_block
from .block_weights import BlockWeights, block_weights, is_block_weights, scaled_vector

BlockStrength = Union[float, list[float]]
Strength = Union[float, dict[str, Union[float, dict[str, BlockStrength]]], BlockWeights]
Window = tuple[float, float]
BLOCK_KINDS = ("down", "mid", "up")


def check_strength(strength: Strength, block_counts: dict[str, int], components: list[str],
                   model_blocks: Collection[str] = ()) -> None:
    """Raise ValueError naming the bad part of a strength spec; block_counts like {"down": 4, ...};
    model_blocks: the block-weight blocks (BASE, IN04, ...) the model's layers are in."""
    if _is_number(strength):
        return
    if is_block_weights(strength):
        block_weights(strength, model_blocks)
        return
    if not isinstance(strength, dict):
        raise ValueError(f"strength must be a number or a dict per component, got {strength!r}")
    for component, value in strength.items():
        if component not in components:
            raise ValueError(f"strength names component {component!r}, but this model has {', '.join(components)}")
        if _is_number(value):
            continue
        if component != "unet" or not isinstance(value, dict):
            raise ValueError(f"strength for {component!r} must be a number"
                             + (" or a dict of UNet blocks" if component == "unet" else "") + f", got {value!r}")
        for kind, block_value in value.items():
            if kind not in BLOCK_KINDS:
                raise ValueError(f"strength for 'unet' has unknown block {kind!r}; use {', '.join(BLOCK_KINDS)}")
            if _is_number(block_value):
                continue
            if not isinstance(block_value, (list, tuple)) or not all(_is_number(v) for v in block_value):
                raise ValueError(f"strength for unet {kind!r} must be a number or a list of numbers, "
                                 f"got {block_value!r}")
            if len(block_value) != block_counts[kind]:
                raise ValueError(f"strength for unet {kind!r} has {len(block_value)} values but this UNet has "
                                 f"{block_counts[kind]} {kind} block(s): give one value per block")


def layer_strengths(strength: Strength, model_blocks: Collection[str] = ()):
    """A function (component, path, block) -> that layer's strength, block weights worked out once:
    `block` is the layer's block-weight block (None outside every block; only block weights read it)."""
    if is_block_weights(strength):
        weights = block_weights(strength, model_blocks)
        return lambda component, path, block: 1.0 if block is None else weights[block]
    return lambda component, path, block: resolve_strength(strength, component, path)


def resolve_strength(strength: Strength, component: str, path: str) -> float:
    """The strength of one layer, for a number or a per-component / per-block dict. `path` is the
    layer's module path within its component."""
    if _is_number(strength):
        return float(strength)
    value = strength.get(component, 1.0)
    if _is_number(value):
        return float(value)
    block = unet_block(path)
    if block is None:
        return 1.0
    kind, index = block
    block_value = value.get(kind, 1.0)
    return float(block_value if _is_number(block_value) else block_value[index])


def split_weight(value: str) -> tuple[str, float | None]:
    """`FILE:WEIGHT` -> (FILE, WEIGHT); (value, None) when no number follows the last colon, so that a
    path with colons in it still works."""
    head, colon, tail = value.rpartition(":")
    if colon:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return value, None


def scaled(strength: Strength, factor: float) -> Strength:
    """The same strength with every layer's value times `factor`, in the same form. Block weights scale
    their blocks (layers outside every block keep 1, as the extension has them); factor 0 is 0 everywhere."""
    if factor == 0:
        return 0.0
    if _is_number(strength):
        return strength * factor
    if isinstance(strength, (str, list, tuple)):
        return scaled_vector(strength, factor)
    return {key: scaled(value, factor) for key, value in strength.items()}


def describe(strength: Strength) -> str:
    """A strength as one short token: `0.8`, `OUTD`, `1,0,0,...`."""
    if _is_number(strength):
        return f"{strength:g}"
    if isinstance(strength, str):
        return strength
    if isinstance(strength, (list, tuple)):
        return ",".join(f"{value:g}" for value in strength)
    return "{" + ",".join(f"{key}={describe(value)}" for key, value in strength.items()) + "}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_window(name: str, window: Window) -> None:
    """Raise ValueError naming the adapter unless 0 <= start <= stop <= 1."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(_is_number(v) for v in window)
            or not 0 <= window[0] <= window[1] <= 1):
        raise ValueError(f"step window for adapter {name!r} must be (start, stop) with 0 <= start <= stop <= 1, "
                         f"fractions of the steps; got {window!r}")


def in_window(window: Window, step: int, steps: int) -> bool:
    """Whether step `step` (from 0) of `steps` lies in the window. Step 0 is in it exactly when the
    window starts at 0 and does not stop there, whatever the number of steps."""
    start, stop = window
    return start <= step / steps < stop
