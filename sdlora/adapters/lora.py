"""Adapters: the contract every kind meets, LoRA itself, and the wrapper that holds several
adapters on one base layer.

Other kinds (LyCORIS's LoHa, LoKr, full weights, DoRA) live in lycoris.py; each is one small class
meeting `Adapter`'s contract, so strength, stacking, fusing and exact unfusing work alike for all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def layer_op(base: nn.Linear | nn.Conv2d, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The base layer's own operation (stride, padding, ...) with another weight and bias."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    return base._conv_forward(x, weight, bias)


def _without_unit_kernel(shape) -> tuple[int, ...]:
    return tuple(shape[:2]) if len(shape) == 4 and tuple(shape[2:]) == (1, 1) else tuple(shape)


class Adapter(nn.Module):
    """The contract of an adapter kind; `AdaptedLayer` needs nothing else.

    - `delta_weight(base_weight, strength)`: the update of the base weight at a strength, fp32, in the
      base weight's shape. The one source of truth: forward, fuse and export all come from it.
    - `delta_bias(base_bias, strength)`: the update of the bias, or None (most kinds leave it).
    - `output(x, base, strength)`: what the adapter adds to `base(x)`; by default the base layer's
      operation with the delta weight. Kinds with a cheaper path (LoRA: up(down(x))) override it.
    - `file_tensors()`: the tensors a file holds for this module, by role (`lora_down.weight`,
      `hada_w1_a`, `dora_scale`, ...); `alpha` is kept as an attribute (None for kinds without one).
    A kind whose update is not linear in the strength (DoRA) says so in `delta_weight`. A kind whose
    update is a whole weight (LoHa, LoKr, full, DoRA) also defines `weight_update(base, dtype)`, its
    update at strength 1 (built once by a frozen kind, at each call by DoRA in training): the layer then
    adds it to its weight for each call instead of running a second product as large as its own. Kinds
    without one (LoRA, whose two small products are cheaper) leave it None.

    Which tensors make the kind is declared here once, and `sdlora.adapters.kinds.KINDS` looks kinds up by it:
    - `roles`: every tensor a file may hold for the kind, by file role name;
    - `whole`: the role sets any one of which makes a whole module (by default all of `roles`);
    - `rank_roles`: the roles whose first dimension is the rank, the first present wins (none: no rank).
    A kind read from files also offers `from_tensors(base, tensors, alpha)` and `update_of(tensors, alpha)`,
    its update from the tensors alone (no layer at hand, to inspect or merge a file).
    """

    kind = "adapter"
    alpha: float | None = None
    roles: tuple[str, ...] = ()
    whole: tuple[tuple[str, ...], ...] = ()
    rank_roles: tuple[str, ...] = ()
    weight_update = None

    @classmethod
    def makes_whole(cls, roles: set[str]) -> bool:
        """Whether a module's roles (DoRA's scale aside) are enough for a whole adapter of this kind."""
        return any(set(needed) <= roles for needed in (cls.whole or (cls.roles,)))

    @classmethod
    def rank_of(cls, tensors: dict[str, torch.Tensor]) -> int | None:
        """The rank a module's file tensors have as this kind, None for a kind without one."""
        return next((tensors[role].shape[0] for role in cls.rank_roles if role in tensors), None)

    def delta_weight(self, base_weight: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self, base_bias: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor | None:
        return None

    def output(self, x: torch.Tensor, base: nn.Linear | nn.Conv2d, strength: float) -> torch.Tensor:
        weight = self.delta_weight(base.weight, strength).to(x.dtype)
        bias = self.delta_bias(base.bias, strength)
        return layer_op(base, x, weight, None if bias is None else bias.to(x.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        """The rank a file's header states for this module (None for kinds without one)."""
        return None


class LoRA(Adapter):
    """One low-rank update of a Linear or Conv2d layer: delta(x) = up(down(x)) * alpha / rank.

    For a conv, `down` has the base kernel, stride and padding, and `up` is 1x1 (the LoCon layout).
    Strength is not stored here: it is a runtime knob of the wrapper.
    """

    kind = "lora"
    roles = ("lora_down.weight", "lora_up.weight")
    rank_roles = ("lora_down.weight",)

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self._rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        # Training keeps adapters in fp32 on a low-precision base: pass dtype=torch.float32.
        factory = {"device": device or base.weight.device, "dtype": dtype or base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.up = nn.Linear(rank, base.out_features, bias=False, **factory)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise ValueError(f"LoRA on a grouped conv (groups={base.groups}) is not supported")
            self.down = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                bias=False, padding_mode=base.padding_mode, **factory,
            )
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        else:
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        # A fresh adapter changes nothing: up starts at zero, down as nn.Linear's own init.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    @classmethod
    def from_weights(cls, base: nn.Linear | nn.Conv2d, down: torch.Tensor, up: torch.Tensor,
                     alpha: float | None) -> LoRA:
        """An adapter holding the given tensors, in the base layer's dtype and device. Each must have its
        factor's shape, 1x1 spatial dims aside (files store a 1x1 conv's factors as a linear's, and back)."""
        lora = cls(base, down.shape[0], alpha, device="meta")  # no random init of tensors about to be replaced
        for role, tensor, expected in (("lora_down", down, lora.down.weight), ("lora_up", up, lora.up.weight)):
            if _without_unit_kernel(tensor.shape) != _without_unit_kernel(expected.shape):
                raise ValueError(f"{role} should be {list(expected.shape)} but is {list(tensor.shape)}")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        lora.down.weight = nn.Parameter(down.to(**factory).reshape(lora.down.weight.shape))
        lora.up.weight = nn.Parameter(up.to(**factory).reshape(lora.up.weight.shape))
        return lora

    @classmethod
    def from_tensors(cls, base: nn.Linear | nn.Conv2d, tensors: dict[str, torch.Tensor], alpha: float | None) -> LoRA:
        return cls.from_weights(base, tensors["lora_down.weight"], tensors["lora_up.weight"], alpha)

    @classmethod
    def update_of(cls, tensors: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
        """up @ down * alpha / rank from the file tensors, in the layer's weight shape (a conv's kernel is down's)."""
        down, up = tensors["lora_down.weight"].float(), tensors["lora_up.weight"].float()
        rank = down.shape[0]
        scale = (alpha if alpha is not None else rank) / rank
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module's contract (a LoRA called on its own); AdaptedLayer calls forward_unscaled instead, to fold
        # scale and strength into one add
        return self.up(self.down(x)) * self.scale

    def forward_unscaled(self, x: torch.Tensor) -> torch.Tensor:
        """up(down(x)) in the adapter's dtype; the wrapper folds scale and strength into one add."""
        return self.up(self.down(x.to(self.up.weight.dtype)))

    def output(self, x: torch.Tensor, base: nn.Linear | nn.Conv2d, strength: float) -> torch.Tensor:
        return self.forward_unscaled(x) * (strength * self.scale)

    def delta_weight(self, base_weight: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """The update as a weight of the base layer's shape, in fp32: up @ down * alpha / rank * strength."""
        up = self.up.weight.float().flatten(1)  # [out, rank]
        down = self.down.weight.float().flatten(1)  # [rank, in * kh * kw]
        delta = (up @ down).view(self.up.weight.shape[0], *self.down.weight.shape[1:]) * self.scale
        return delta * strength if strength != 1.0 else delta

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.down.weight, "lora_up.weight": self.up.weight}


class AdapterDict(nn.ModuleDict):
    """A ModuleDict whose keys may equal method names: adapter names ("half", "update") are the user's."""

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self._modules[key] = module


class AdaptedLayer(nn.Module):
    """A base layer plus any number of named adapters, each with its own strength.

    y = base(x) + sum_i strength_i * adapter_i(x). Fusing adds the strength-scaled deltas into the
    base weight (computed in fp32) and keeps an exact copy of the original weight, so unfusing
    restores it bit for bit whatever its dtype.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        if not isinstance(base, SUPPORTED_LAYERS):
            raise TypeError(f"adapters attach to nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.base = base
        self.adapters = AdapterDict()
        self.strengths: dict[str, float] = {}
        self.fused: list[str] = []
        self._original_weight: torch.Tensor | None = None
        self._original_bias: torch.Tensor | None = None
        self._has_whole = False  # whether any adapter here is a whole-weight kind (kept by add and remove)

    # Code elsewhere (diffusers processors, transformers) reads these off the layer it replaced.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def add(self, name: str, adapter: Adapter, strength: float = 1.0) -> None:
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        self.adapters[name] = adapter
        self.strengths[name] = float(strength)
        self._has_whole = any(a.weight_update is not None for a in self.adapters.values())

    def remove(self, name: str) -> None:
        if name in self.fused:
            raise RuntimeError(f"adapter {name!r} is fused into this layer: unfuse first")
        del self.adapters[name]
        del self.strengths[name]
        self._has_whole = any(a.weight_update is not None for a in self.adapters.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_output(x)
        for name, adapter in self.adapters.items():
            strength = self.strengths[name]
            if strength == 0.0 or name in self.fused or adapter.weight_update is not None:
                continue
            if isinstance(adapter, LoRA):  # the common case, in one fused multiply-add
                y = torch.add(y, adapter.forward_unscaled(x).to(y.dtype), alpha=strength * adapter.scale)
            else:
                y = y + adapter.output(x, self.base, strength).to(y.dtype)
        return y

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        """base(x); kinds whose update is a whole weight (LoHa, LoKr, full, DoRA) are added to the base weight
        for this call: one elementwise add instead of a second product as large as the layer's own."""
        whole = [name for name, adapter in self.adapters.items() if adapter.weight_update is not None
                 and self.strengths[name] != 0.0 and name not in self.fused] if self._has_whole else ()
        if not whole:
            return self.base(x)
        weight, bias = self.base.weight, self.base.bias
        for name in whole:
            adapter, strength = self.adapters[name], self.strengths[name]
            weight = weight + adapter.weight_update(self.base, x.dtype) * strength
            if (bias_update := adapter.delta_bias(bias, strength)) is not None:
                bias = bias + bias_update.to(bias.dtype)
        return layer_op(self.base, x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def delta_weight(self, names: list[str] | None = None) -> torch.Tensor:
        """The summed strength-scaled update of the named adapters (all by default), fp32. Each is
        computed against the base weight as loaded (unfused), which is what DoRA's needs."""
        names = list(self.adapters) if names is None else names
        base = self.base.weight if self._original_weight is None else self._original_weight.to(self.base.weight.device)
        delta = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        for name in names:
            delta += self.adapters[name].delta_weight(base, self.strengths[name]).to(delta.device)
        return delta

    def delta_bias(self, names: list[str] | None = None) -> torch.Tensor | None:
        """The summed bias update of the named adapters, or None when none of them changes the bias."""
        names = list(self.adapters) if names is None else names
        updates = [self.adapters[name].delta_bias(self.base.bias, self.strengths[name]) for name in names]
        updates = [update.float() for update in updates if update is not None]
        return sum(updates) if updates else None

    @torch.no_grad()
    def fuse(self, keep_original: bool = True) -> None:
        """Add the adapters' strength-scaled updates (weight and bias) into the base layer, in fp32.

        keep_original=False fuses for good (a bake): no copy of the original weights is kept, so a
        whole model is not held twice, and unfusing then restores nothing.
        """
        if self.fused:
            raise RuntimeError("this layer is already fused: unfuse it before fusing again")
        names = [name for name, strength in self.strengths.items() if strength != 0.0]
        if not names:
            return
        weight, bias = self.base.weight, self.base.bias
        delta, bias_delta = self.delta_weight(names), self.delta_bias(names)
        if keep_original:
            self._original_weight = weight.detach().to("cpu", copy=True)
        weight.copy_((weight.float() + delta).to(weight.dtype))
        if bias_delta is not None:
            if keep_original:
                self._original_bias = bias.detach().to("cpu", copy=True)
            bias.copy_((bias.float() + bias_delta.to(bias.device)).to(bias.dtype))
        self.fused = names

    @torch.no_grad()
    def unfuse(self) -> None:
        if self._original_weight is not None:
            self.base.weight.copy_(self._original_weight)
        if self._original_bias is not None:
            self.base.bias.copy_(self._original_bias)
        self._original_weight = self._original_bias = None
        self.fused = []
