"""The pure step math of a run: learning-rate schedule, EMA, each micro-batch's generator, the validation
split and which batch each step takes.

Each is a pure function of its arguments (a step, the seed, the config's numbers), never of what ran
before in this process: that is what lets a resumed run repeat exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import random

import torch

from ..errors import ConfigError
from .data import BucketBatchSampler, DatasetScan


def lr_factor(step: int, schedule: str, warmup: int, total: int, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at an optimizer step; a cosine ends at `floor`."""
    if warmup and step < warmup and schedule != "constant":
        return (step + 1) / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA's decay after optimizer step `step` (from 1): the warm-up of diffusers' EMAModel (its default),
    0 at the first step, so the average starts as the weights, then min(decay, step / (step + 9)), so that
    the first steps, where the weights move fast, do not linger in it."""
    return 0.0 if step <= 1 else min(decay, step / (step + 9))


@torch.no_grad()
def update_ema(averages: list[torch.Tensor], parameters: list[torch.Tensor], decay: float) -> None:
    """averages <- decay * averages + (1 - decay) * parameters, in place."""
    for average, parameter in zip(averages, parameters):
        average.lerp_(parameter.detach(), 1.0 - decay)


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The generator every random draw of one micro-batch comes from."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 16 + process)


def split_validation(scan: DatasetScan, fraction: float, seed: int) -> tuple[DatasetScan, DatasetScan | None]:
    if fraction == 0:
        return scan, None
    order = list(range(len(scan.items)))
    random.Random(f"{seed}:validation").shuffle(order)
    count = max(1, round(fraction * len(order)))
    if count >= len(order):
        raise ConfigError(f"validation_split {fraction} leaves no training image out of {len(order)}")
    held = set(order[:count])
    train = [item for i, item in enumerate(scan.items) if i not in held]
    validation = [item for i, item in enumerate(scan.items) if i in held]
    return DatasetScan(train, root=scan.root), DatasetScan(validation, root=scan.root)


def epoch_batches(sampler: BucketBatchSampler, epoch: int, processes: int) -> list[list[int]]:
    """This epoch's batches, a whole number of rounds so every process takes as many."""
    batches = sampler.batches(epoch)
    usable = len(batches) // processes * processes
    if usable == 0:
        raise ConfigError(f"{len(batches)} batch(es) per epoch cannot feed {processes} processes: use more images "
                         "or a smaller --batch-size")
    return batches[:usable]


def batch_keys(sampler: BucketBatchSampler, epoch: int, position: int, processes: int, process: int):
    """(epoch, position after, this process's batch) from a resume point onwards, forever."""
    while True:
        batches = epoch_batches(sampler, epoch, processes)
        while position < len(batches):
            position += processes
            yield epoch, position, batches[position - processes + process]
        epoch, position = epoch + 1, 0
