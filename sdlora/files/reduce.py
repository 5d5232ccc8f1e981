"""Reducing many modules' updates to low-rank LoRAs by SVD, with a report of what each kept: what merge,
resize and extract share (the SVD of one update is `lowrank`)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .layouts import ModuleTensors
from .lowrank import Factored, rank_for_energy, spectrum, truncate
from .names import BLOCK_KINDS, block_kind, block_of, component_of_file_key

Update = Factored | torch.Tensor


def group_of(name: str) -> str:
    """The part of the model a kohya module name belongs to, for reports: the kind of its UNet block
    (`down`, `mid`, `up`, `other`) or its text encoder, in the vocabulary inspect uses too."""
    return block_kind(block_of(name, component_of_file_key(name)))


@dataclass
class ModuleResult:
    name: str  # kohya module name
    rank: int
    kept: float  # squared Frobenius norm of the update that the new rank keeps
    tail: float  # and that it leaves out

    @property
    def error(self) -> float:
        """Relative Frobenius error of the truncation: ||update - kept|| / ||update||."""
        total = self.kept + self.tail
        return math.sqrt(self.tail / total) if total else 0.0


@dataclass
class Reduction:
    """What an SVD rank reduction kept, module by module."""

    rows: list[ModuleResult] = field(default_factory=list)

    def kept_fraction(self, rows: list[ModuleResult] | None = None) -> float:
        rows = self.rows if rows is None else rows
        total = sum(r.kept + r.tail for r in rows)
        return sum(r.kept for r in rows) / total if total else 1.0

    def relative_error(self) -> float:
        """Over all modules together: sqrt(sum of what is left out / sum of squared norms)."""
        return math.sqrt(max(0.0, 1.0 - self.kept_fraction())) if self.rows else 0.0

    def worst(self) -> ModuleResult:
        return max(self.rows, key=lambda r: r.error)

    def by_group(self) -> dict[str, float]:
        groups: dict[str, list[ModuleResult]] = {}
        for row in self.rows:
            groups.setdefault(group_of(row.name), []).append(row)
        return {group: self.kept_fraction(groups[group]) for group in BLOCK_KINDS if group in groups}

    def error_lines(self) -> list[str]:
        worst = self.worst()
        return [f"relative Frobenius error: overall {self.relative_error():.8f}, "
                f"worst {worst.error:.8f} ({worst.name})"]

    def energy_lines(self) -> list[str]:
        lines = ["kept energy (kept squared singular values / all):"]
        lines += [f"  {group:<16}{fraction:.8f}" for group, fraction in self.by_group().items()]
        lines.append(f"  {'overall':<16}{self.kept_fraction():.8f}")
        return lines

    def rank_line(self) -> str:
        ranks = Counter(r.rank for r in self.rows)
        return "ranks: " + ", ".join(f"{rank} (x{count})" for rank, count in sorted(ranks.items()))


def reduce(updates: Iterable[tuple[str, Update]], rank: int | None = None, energy: float | None = None,
           device: torch.device | str | None = None, desc: str = "SVD",
           total: int | None = None) -> tuple[dict[str, ModuleTensors], Reduction]:
    """Each update's best LoRA of rank `rank`, or of the smallest rank keeping `energy` of it.

    `updates` may be a generator, so that only one full update is in memory at a time.
    """
    if (rank is None) == (energy is None):
        raise ConfigError("give either a rank or an energy fraction")
    if rank is not None and rank <= 0:
        raise ConfigError(f"rank must be > 0, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be a fraction in (0, 1], got {energy}")
    modules, report = {}, Reduction()
    for name, update in tqdm(updates, desc=desc, unit="module", total=total):
        spec = spectrum(update, device)
        kept_rank = min(rank, len(spec.s)) if rank is not None else rank_for_energy(spec, energy)
        modules[name] = truncate(spec, kept_rank)
        report.rows.append(ModuleResult(name, kept_rank, spec.energy(kept_rank), spec.tail(kept_rank)))
    return modules, report
