"""Low-rank approximation of one layer's weight update by SVD: pure functions on tensors, no files.

An update is either a full tensor of the layer's weight shape (a difference of two models, or
any adapter kind through its `delta_weight()`) or `Factored` (up @ down, what a plain LoRA or a
concatenation of LoRAs is). A factored update of rank k is decomposed through two thin QR
factorisations and the SVD of a k x k matrix, which is exact and takes milliseconds where the SVD
of the full SDXL-sized matrix would take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layouts import ModuleTensors


@dataclass(frozen=True)
class Factored:
    """A weight update up @ down, flattened to 2-D; `shape` is the layer weight's own shape."""

    up: torch.Tensor  # [out, k]
    down: torch.Tensor  # [k, in * kh * kw]
    shape: tuple[int, ...]

    def full(self) -> torch.Tensor:
        return (self.up @ self.down).reshape(self.shape)


@dataclass(frozen=True)
class Spectrum:
    """The SVD of an update flattened to [out, in * kh * kw], singular values in decreasing order."""

    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k]
    vh: torch.Tensor  # [k, in * kh * kw]
    shape: tuple[int, ...]

    def energy(self, rank: int | None = None) -> float:
        """Sum of the squared singular values: of the first `rank`, or of all (the squared Frobenius norm)."""
        return float((self.s[:rank].double() ** 2).sum())

    def tail(self, rank: int) -> float:
        """The squared Frobenius norm of what a rank-`rank` truncation leaves out."""
        return float((self.s[rank:].double() ** 2).sum())


def lora_factors(weights: ModuleTensors) -> Factored:
    """A plain LoRA module's update, up @ down * alpha / rank, with the scale folded into up."""
    up = weights.up.float().flatten(1)
    down = weights.down.float().flatten(1)
    shape = (up.shape[0], *weights.down.shape[1:])
    return Factored(up * (weights.effective_alpha / weights.rank), down, shape)


def spectrum(delta: torch.Tensor | Factored, device: torch.device | str | None = None) -> Spectrum:
    """SVD of an update, on `device` (default: where it is), returned on the CPU.

    Full tensors are decomposed in fp32; factored ones in fp64, which costs nothing at their size
    and keeps the singular values of a concatenation of many LoRAs accurate.
    """
    if isinstance(delta, Factored):
        up, down, shape = delta.up.to(device, torch.float64), delta.down.to(device, torch.float64), delta.shape
        if up.shape[1] < min(up.shape[0], down.shape[1]):
            q_up, r_up = torch.linalg.qr(up)  # up = Qu Ru, down^T = Qd Rd, so up @ down = Qu (Ru Rd^T) Qd^T
            q_down, r_down = torch.linalg.qr(down.T)
            u, s, vh = torch.linalg.svd(r_up @ r_down.T)
            u, vh = q_up @ u, vh @ q_down.T
        else:
            u, s, vh = torch.linalg.svd(up @ down, full_matrices=False)
    else:
        shape = tuple(delta.shape)
        u, s, vh = torch.linalg.svd(delta.to(device, torch.float32).flatten(1), full_matrices=False)
    return Spectrum(u.float().cpu(), s.float().cpu(), vh.float().cpu(), tuple(shape))


def rank_for_energy(spec: Spectrum, fraction: float) -> int:
    """The smallest rank whose squared singular values reach `fraction` of the total (at least 1)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the energy fraction must be in (0, 1], got {fraction}")
    total = spec.energy()
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(spec.s.double() ** 2, 0) / total
    # a tolerance so that fraction 1.0 is reached despite rounding in the cumulative sum
    return min(int((cumulative < fraction - 1e-12).sum()) + 1, len(spec.s))


def truncate(spec: Spectrum, rank: int) -> ModuleTensors:
    """The best rank-`rank` LoRA of an update (Eckart-Young), with alpha = rank so its scale is 1.

    Each singular value is split as sqrt(s) into up and down, which keeps both factors of similar
    size (fp16 files lose less). Conv updates get the LoCon layout: down [rank, in, kh, kw], up
    [out, rank, 1, 1]; a rank above the update's own is lowered to it.
    """
    if rank <= 0:
        raise ValueError(f"rank must be > 0, got {rank}")
    rank = min(rank, len(spec.s))
    root = spec.s[:rank].sqrt()
    up = spec.u[:, :rank] * root
    down = root[:, None] * spec.vh[:rank]
    if len(spec.shape) == 4:  # a conv weight [out, in, kh, kw]
        down = down.reshape(rank, *spec.shape[1:])
        up = up.reshape(spec.shape[0], rank, 1, 1)
    return ModuleTensors.lora(down.contiguous(), up.contiguous(), float(rank))


def with_common_alpha(modules: dict[str, ModuleTensors]) -> dict[str, ModuleTensors]:
    """The same updates with one alpha for every module (the largest rank), the scale folded into the factors.

    A file whose modules differ in rank differs in alpha when each keeps scale 1, and diffusers
    (0.42, with transformers 5) drops the per-module alphas of text-encoder modules, silently
    rescaling them. With one alpha there is no per-module alpha to drop. Each factor is multiplied
    by sqrt(alpha_m / alpha), so up @ down * alpha / rank is unchanged.
    """
    common = float(max(weights.rank for weights in modules.values()))
    out = {}
    for name, weights in modules.items():
        factor = (weights.effective_alpha / common) ** 0.5
        out[name] = ModuleTensors.lora(weights.down * factor, weights.up * factor, common)
    return out
