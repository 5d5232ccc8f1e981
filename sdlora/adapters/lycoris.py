"""LyCORIS's adapter kinds, each one small class meeting `lora.Adapter`'s contract.

LoCon with Tucker factors (`lora_mid`), LoHa (`hada_*`), LoKr (`lokr_*`), full weight differences
(`diff`, `diff_b`) and DoRA (`dora_scale` on any of them). Every kind computes its update as a
weight (`delta_weight`), from which forward, fuse and export follow; the formulas are LyCORIS's
(docs/lycoris-facts.md names the source of each). Frozen: these kinds are loaded, not trained, except
DoRA over a LoRA, which the trainer makes with `DoRA.trainable`.
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import Adapter, LoRA


def _buffer_dict(module: nn.Module, tensors: dict[str, torch.Tensor], like: torch.Tensor) -> None:
    """Keep file tensors as buffers (they move with .to() and stay out of parameters()), in the base
    layer's dtype and device."""
    module._roles = list(tensors)
    for index, (role, tensor) in enumerate(tensors.items()):
        module.register_buffer(f"t{index}", tensor.to(device=like.device, dtype=like.dtype))


class _FileKind(Adapter):
    """An adapter built from a file's tensors, by role."""

    def __init__(self, base: nn.Linear | nn.Conv2d | None, tensors: dict[str, torch.Tensor], alpha: float | None,
                 shape: tuple[int, ...] | None = None):
        super().__init__()
        self.alpha = None if alpha is None else float(alpha)
        self.shape = tuple(base.weight.shape) if base is not None else shape
        _buffer_dict(self, tensors, base.weight if base is not None else next(iter(tensors.values())).float())

    def tensor(self, role: str) -> torch.Tensor | None:
        return getattr(self, f"t{self._roles.index(role)}").float() if role in self._roles else None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {role: getattr(self, f"t{index}") for index, role in enumerate(self._roles)}

    @classmethod
    def from_tensors(cls, base: nn.Linear | nn.Conv2d, tensors: dict[str, torch.Tensor], alpha: float | None):
        return cls(base, tensors, alpha)

    @classmethod
    def update_of(cls, tensors: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
        """The update from the file tensors alone, in the shape `shape_of` reads from them."""
        return cls(None, tensors, alpha, cls.shape_of(tensors)).update()

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """The update's shape as far as the tensors tell it: the base weight's, or [out, in * kh * kw]
        where they do not tell the kernel."""
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        return self.rank_of(self.file_tensors())

    def scale(self, rank: int | None) -> float:
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def update(self) -> torch.Tensor:
        """The update at strength 1, fp32, in the base weight's shape."""
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        delta = self.update()
        return delta * strength if strength != 1.0 else delta

    def weight_update(self, base: nn.Linear | nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
        """The update at strength 1 in `dtype`: these kinds are loaded, never trained, so the layer adds it
        to its weight rather than rebuilding it every step."""
        return _built_once(self, base, dtype, self.update)


def _built_once(adapter: Adapter, base: nn.Module, dtype: torch.dtype, build) -> torch.Tensor:
    """`build()` on the base layer's device in `dtype`, kept on the adapter until either changes."""
    cached = getattr(adapter, "_cached", None)
    if cached is None or cached.device != base.weight.device or cached.dtype != dtype:
        adapter._cached = cached = build().to(base.weight.device, dtype)
    return cached


def rebuild_tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """A conv weight [out, in, kh, kw] from a Tucker core [r, r, kh, kw] and factors left [r, out]
    and right [r, in]: W[p, q] = sum_ij left[i, p] core[i, j] right[j, q]."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, left, right).contiguous()


class TuckerLoCon(_FileKind):
    """LoCon on a k x k conv with a Tucker core: down [r, in, 1, 1], mid [r, r, kh, kw], up [out, r, 1, 1]."""

    kind = "locon-tucker"
    roles = ("lora_down.weight", "lora_mid.weight", "lora_up.weight")
    rank_roles = ("lora_down.weight",)

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return (tensors["lora_up.weight"].shape[0], tensors["lora_down.weight"].shape[1],
                *tensors["lora_mid.weight"].shape[2:])

    def update(self) -> torch.Tensor:
        down = self.tensor("lora_down.weight").flatten(1)  # [r, in]
        up = self.tensor("lora_up.weight").flatten(1)  # [out, r]
        return rebuild_tucker(self.tensor("lora_mid.weight"), up.T, down) * self.scale(self.rank)


class LoHa(_FileKind):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, the product elementwise (Hadamard); with Tucker
    cores hada_t1/hada_t2, each factor is rebuilt from its core first."""

    kind = "loha"
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    whole = (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),)  # the Tucker cores are optional
    rank_roles = ("hada_w1_b",)

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
        core = tensors.get("hada_t1")
        if core is not None:  # a: [r, out], b: [r, in] around the core (`rebuild_tucker`)
            return (tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1], *core.shape[2:])
        return (tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1])

    def _factor(self, index: int) -> torch.Tensor:
        a, b, core = (self.tensor(f"hada_w{index}_a"), self.tensor(f"hada_w{index}_b"),
                      self.tensor(f"hada_t{index}"))
        if core is not None:
            return rebuild_tucker(core, a, b)
        return (a @ b).reshape(self.shape)

    def update(self) -> torch.Tensor:
        return (self._factor(1) * self._factor(2)).reshape(self.shape) * self.scale(self.rank)


class LoKr(_FileKind):
    """kron(W1, W2) * scale; each factor whole (lokr_w1, lokr_w2) or low-rank (lokr_w1_a @ lokr_w1_b,
    lokr_w2_a @ lokr_w2_b, or a Tucker core lokr_t2). The scale is alpha / rank when a factor is
    low-rank, and 1 when both are whole."""

    kind = "lokr"
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    # each factor whole or as a pair (the second may add a Tucker core)
    whole = tuple((*w1, *w2) for w1 in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
                  for w2 in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b")))
    rank_roles = ("lokr_w1_b", "lokr_w2_b")

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
        w1 = tensors["lokr_w1"].shape if "lokr_w1" in tensors else (tensors["lokr_w1_a"].shape[0],
                                                                    tensors["lokr_w1_b"].shape[1])
        if "lokr_w2" in tensors:
            w2 = tuple(tensors["lokr_w2"].shape)
        elif "lokr_t2" in tensors:  # a: [r, out], b: [r, in] around the core (`rebuild_tucker`)
            w2 = (tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1], *tensors["lokr_t2"].shape[2:])
        else:
            w2 = (tensors["lokr_w2_a"].shape[0], tensors["lokr_w2_b"].shape[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])

    def _w1(self) -> torch.Tensor:
        whole = self.tensor("lokr_w1")
        return whole if whole is not None else self.tensor("lokr_w1_a") @ self.tensor("lokr_w1_b")

    def _w2(self, w1: torch.Tensor) -> torch.Tensor:
        whole = self.tensor("lokr_w2")
        if whole is not None:
            return whole
        a, b, core = self.tensor("lokr_w2_a"), self.tensor("lokr_w2_b"), self.tensor("lokr_t2")
        if core is not None:
            return rebuild_tucker(core, a, b)
        out, inner = self.shape[0] // w1.shape[0], self.shape[1] // w1.shape[1]
        return (a @ b).reshape(out, inner, *self.shape[2:])

    def update(self) -> torch.Tensor:
        w1 = self._w1()
        w2 = self._w2(w1)
        if w2.dim() == 4:  # a conv: W1 acts on the channels only
            w1 = w1[:, :, None, None]
        whole = self.tensor("lokr_w1") is not None and self.tensor("lokr_w2") is not None
        scale = 1.0 if whole else self.scale(self.rank)
        return torch.kron(w1.contiguous(), w2.contiguous()).reshape(self.shape) * scale


class Full(_FileKind):
    """A whole weight difference `diff` (and `diff_b` for the bias), applied as it is."""

    kind = "full"
    roles = ("diff", "diff_b")
    whole = (("diff",),)

    @staticmethod
    def shape_of(tensors: dict[str, torch.Tensor]) -> tuple[int, ...]:
        return tuple(tensors["diff"].shape)

    def update(self) -> torch.Tensor:
        return self.tensor("diff").reshape(self.shape)

    def delta_bias(self, base_bias: torch.Tensor | None, strength: float = 1.0) -> torch.Tensor | None:
        bias = self.tensor("diff_b")
        return None if bias is None else bias * strength


def decomposition_norms(weight: torch.Tensor, per_row: bool) -> torch.Tensor:
    """DoRA's norms of a weight, shaped to broadcast against it: one per output row ([out, 1, ...]) or one
    per input column ([1, in, ...], the norm over the output and kernel dims). LyCORIS and ComfyUI add
    float32's eps, which keeps a zero row or column finite; A1111 does not (a 1e-7 relative difference)."""
    axis = 0 if per_row else 1
    norms = weight.transpose(0, axis).reshape(weight.shape[axis], -1).norm(dim=1)
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return norms.reshape(shape) + torch.finfo(torch.float32).eps


class DoRA(Adapter):
    """Weight-decomposed adaptation: another kind's update, then W + ΔW rescaled to the stored magnitude
    `dora_scale`, one norm per output row (LyCORIS's default, scale shaped [out, 1, ...]) or per input
    column (kohya's and LyCORIS's wd_on_output=False, [1, in, ...]): the scale's shape says which.

    At a strength s the layer is W + s (W' - W), as A1111 and ComfyUI apply it, so that strength 0 is
    the base model. LyCORIS's own network differs between 0 and 1: it keeps all of ΔW and scales only
    the magnitude correction (docs/lycoris-facts.md); the two agree at strength 1.

    `DoRA.trainable(base, rank, alpha)` makes one to train: a LoRA inside, and the magnitude a parameter.
    """

    magnitude_role = "dora_scale"  # the one tensor DoRA adds to any kind's, in a file

    def __init__(self, inner: Adapter, magnitude: torch.Tensor, like: torch.Tensor, train: bool = False):
        super().__init__()
        self.inner = inner
        self.kind = f"{inner.kind}+dora"
        self.alpha = inner.alpha
        self.train_magnitude = train
        magnitude = magnitude.to(device=like.device, dtype=like.dtype)
        if train:
            self.magnitude = nn.Parameter(magnitude)
        else:
            self.register_buffer("magnitude", magnitude)

    @classmethod
    def trainable(cls, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, *,
                  dtype: torch.dtype | None = None) -> DoRA:
        """A fresh DoRA over a fresh LoRA (up zero) whose magnitude is the base weight's own norms, one per
        input column: it starts as the base layer. Per input column because that is the axis A1111 reads
        whatever the file's shape, and ComfyUI and LyCORIS read from a [1, in] scale (FORMATS.md)."""
        inner = LoRA(base, rank, alpha, dtype=dtype)
        magnitude = decomposition_norms(base.weight.detach().float(), per_row=False)
        return cls(inner, magnitude, inner.up.weight, train=True)

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    def delta_weight(self, base_weight: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        if base_weight is None:
            raise ValueError("DoRA's update depends on the base weight: pass it")
        base = base_weight.float()
        merged = base + self.inner.delta_weight(base_weight)
        magnitude = self.magnitude.float()
        per_row = magnitude.shape[0] == merged.shape[0] and magnitude.numel() == merged.shape[0]
        norms = decomposition_norms(merged, per_row)
        rescaled = merged * (magnitude.reshape(norms.shape) / norms)
        return (rescaled - base) * strength

    def weight_update(self, base: nn.Linear | nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
        """W' - W at strength 1 in `dtype` (the base weight is not fused while the layer runs unfused); built
        once for a loaded DoRA, every call for one in training, whose tensors change at each step."""
        if self.train_magnitude:
            return self.delta_weight(base.weight).to(dtype)
        return _built_once(self, base, dtype, lambda: self.delta_weight(base.weight))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.inner.file_tensors(), self.magnitude_role: self.magnitude}
