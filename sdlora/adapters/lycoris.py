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

    @property
    def rank(self) -> int:
        return self.tensor("lora_down.weight").shape[0]

    def update(self) -> torch.Tensor:
        down = self.tensor("lora_down.weight").flatten(1)  # [r, in]
        up = self.tensor("lora_up.weight").flatten(1)  # [out, r]
        return rebuild_tucker(self.tensor("lora_mid.weight"), up.T, down) * self.scale(self.rank)


class LoHa(_FileKind):
    """(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, the product elementwise (Hadamard); with Tucker
    cores hada_t1/hada_t2, each factor is rebuilt from its core first."""

    kind = "loha"

    @property
    def rank(self) -> int:
        return self.tensor("hada_w1_b").shape[0]

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

    @property
    def rank(self) -> int | None:
        for role in ("lokr_w1_b", "lokr_w2_b"):
            if (tensor := self.tensor(role)) is not None:
                return tensor.shape[0]
        return None

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
        return {**self.inner.file_tensors(), "dora_scale": self.magnitude}


# Which tensors make which kind: a module's roles decide it.
KIND_ROLES = {
    "locon-tucker": {"lora_down.weight", "lora_up.weight", "lora_mid.weight"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"},
    "full": {"diff"},
}


def standalone_update(tensors: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """A module's update at strength 1 from its file tensors alone, with no layer at hand (to inspect a
    file): the base weight's shape, or [out, in * kh * kw] where the tensors do not tell the kernel.
    DoRA's rescaling needs the base weight and is left out."""
    tensors = {role: tensor.float() for role, tensor in tensors.items() if role != "dora_scale"}
    roles = set(tensors)
    if roles == {"lora_down.weight", "lora_up.weight"}:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        rank = down.shape[0]
        return (up.flatten(1) @ down.flatten(1)) * ((alpha if alpha is not None else rank) / rank)
    if "lora_mid.weight" in roles:
        shape = (tensors["lora_up.weight"].shape[0], tensors["lora_down.weight"].shape[1],
                 *tensors["lora_mid.weight"].shape[2:])
        return TuckerLoCon(None, tensors, alpha, shape).update()
    if "diff" in roles:
        return tensors["diff"]
    if roles & KIND_ROLES["loha"]:
        core = tensors.get("hada_t1")
        shape = ((tensors["hada_w1_a"].shape[1], tensors["hada_w1_b"].shape[1], *core.shape[2:]) if core is not None
                 else (tensors["hada_w1_a"].shape[0], tensors["hada_w1_b"].shape[1]))
        return LoHa(None, tensors, alpha, shape).update()
    w1 = tensors.get("lokr_w1", None)
    w1 = w1 if w1 is not None else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    w2 = tensors.get("lokr_w2", None)
    if w2 is None:
        core = tensors.get("lokr_t2")
        w2 = (rebuild_tucker(core, tensors["lokr_w2_a"], tensors["lokr_w2_b"]) if core is not None
              else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"])
    shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    return LoKr(None, tensors, alpha, shape).update()


def build_adapter(base: nn.Linear | nn.Conv2d, tensors: dict[str, torch.Tensor], alpha: float | None) -> Adapter:
    """The adapter a module's file tensors describe (any kind, with or without DoRA)."""
    tensors = dict(tensors)
    magnitude = tensors.pop("dora_scale", None)
    roles = set(tensors)
    if roles == {"lora_down.weight", "lora_up.weight"}:
        inner: Adapter = LoRA.from_weights(base, tensors["lora_down.weight"], tensors["lora_up.weight"], alpha)
    elif "lora_mid.weight" in roles:
        inner = TuckerLoCon(base, tensors, alpha)
    elif roles & KIND_ROLES["loha"]:
        inner = LoHa(base, tensors, alpha)
    elif roles & KIND_ROLES["lokr"]:
        inner = LoKr(base, tensors, alpha)
    elif "diff" in roles:
        inner = Full(base, tensors, alpha)
    else:
        raise ValueError(f"no adapter kind has exactly the tensors {sorted(roles)}")
    return inner if magnitude is None else DoRA(inner, magnitude, base.weight)
