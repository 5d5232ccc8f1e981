"""Which tensors make which adapter kind: one registry of the kinds sdlora reads, looked up by a module's
file roles. Each kind declares its roles once, on its class (`Adapter.roles`, `.whole`, `.rank_roles`);
everything that needs to know a module's kind (building it, its update without a layer, its rank, whether a
file's module is whole) asks here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .lora import Adapter, LoRA
from .lycoris import DoRA, Full, LoHa, LoKr, TuckerLoCon

# kind name -> class. Order matters where one kind's roles hold another's: plain LoRA's pair comes before
# Tucker LoCon's, which adds a mid tensor to the same pair.
KINDS: dict[str, type[Adapter]] = {kind.kind: kind for kind in (LoRA, TuckerLoCon, LoHa, LoKr, Full)}
MAGNITUDE = DoRA.magnitude_role  # DoRA's scale, which rides on any kind
ROLES = (*dict.fromkeys(role for kind in KINDS.values() for role in kind.roles), MAGNITUDE)

# Tensors of adapter kinds sdlora does not read, to name them in the error.
UNREAD_KINDS = {
    "lora_magnitude_vector": "DoRA as PEFT writes it", "oft_blocks": "LyCORIS OFT", "oft_diag": "OFT",
    "oft_R": "OFT", "boft_R": "BOFT", "a1.weight": "LyCORIS GLoRA", "b1.weight": "LyCORIS GLoRA",
    "ia3_l": "IA3", "weight": "LyCORIS IA3 or a norm layer (`w_norm`/`b_norm`)", "w_norm": "a norm layer",
    "b_norm": "a norm layer", "on_input": "LyCORIS IA3",
}


def kind_of(roles: Iterable[str]) -> type[Adapter] | None:
    """The kind a module's tensors belong to, DoRA's scale aside: the first whose roles hold them all (None:
    a mix no kind has). Half a module still has its kind; `is_whole` says whether it is complete."""
    roles = set(roles) - {MAGNITUDE}
    return next((kind for kind in KINDS.values() if roles <= set(kind.roles)), None)


def is_whole(roles: Iterable[str]) -> bool:
    """Whether a module's tensors make a whole adapter of some kind (DoRA's scale aside)."""
    roles = set(roles) - {MAGNITUDE}
    kind = kind_of(roles)
    return kind is not None and kind.makes_whole(roles)


def _whole_kind(tensors: dict[str, torch.Tensor]) -> type[Adapter]:
    kind = kind_of(tensors)
    if kind is None or not kind.makes_whole(set(tensors)):
        raise ValueError(f"no adapter kind has exactly the tensors {sorted(tensors)}")
    return kind


def build_adapter(base: nn.Linear | nn.Conv2d, tensors: dict[str, torch.Tensor], alpha: float | None) -> Adapter:
    """The adapter a module's file tensors describe (any kind, with or without DoRA)."""
    tensors = dict(tensors)
    magnitude = tensors.pop(MAGNITUDE, None)
    inner = _whole_kind(tensors).from_tensors(base, tensors, alpha)
    return inner if magnitude is None else DoRA(inner, magnitude, base.weight)


def standalone_update(tensors: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """A module's update at strength 1 from its file tensors alone, with no layer at hand (to inspect or merge
    a file): the base weight's shape, or [out, in * kh * kw] where the tensors do not tell the kernel.
    DoRA's rescaling needs the base weight and is left out."""
    tensors = {role: tensor.float() for role, tensor in tensors.items() if role != MAGNITUDE}
    return _whole_kind(tensors).update_of(tensors, alpha)
