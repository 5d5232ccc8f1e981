"""The pure step math of a run: learning-rate schedule, EMA, each micro-batch's generator, the validation
split and which batch each step takes.

Each is a pure function of its arguments (a step, the seed, the config's numbers), never of what ran
before in this process: that is what lets a resumed run repeat exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

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


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator every random draw of one optimizer step comes from (see `loss.Draws`): each
    micro-batch of every process starts a fresh one and takes its own rows of the global batch's draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1024)


class Share(NamedTuple):
    """One micro-batch's part of an optimizer step's global batch.

    `rows` are its rows of the global batch (of `size` images); the loss of the micro-batch is its
    images' mean times `weight` = len(rows) * processes / size, so that the gradient, averaged over
    the processes and summed over the micro-batches, is that of the global batch's mean loss,
    however the batch was split. A part with no image of its own (a short global batch) trains on
    the batch's first image with weight 0: every process still runs its backward pass, where the
    gradients are exchanged, and adds nothing.
    """

    rows: range
    size: int
    weight: float

    @classmethod
    def whole(cls, size: int) -> "Share":
        """All of a batch of `size` images, weight 1: a batch that is its own global batch."""
        return cls(range(size), size, 1.0)


def global_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """Images per optimizer step: batch_size per micro-batch, times micro-batches, times processes."""
    return batch_size * processes * accumulation


def shares(size: int, batch_size: int, processes: int, accumulation: int, process: int) -> list[Share]:
    """`process`'s share of each of its micro-batches of a global batch of `size` images.

    Micro-batch m of process p takes rows [k * batch_size, (k + 1) * batch_size) with k = m * processes + p,
    cut at `size`: consecutive blocks in that order, so that a full batch is the same whatever the split.
    """
    parts = []
    for micro in range(accumulation):
        start = (micro * processes + process) * batch_size
        rows = range(min(start, size), min(start + batch_size, size))
        parts.append(Share(rows, size, len(rows) * processes / size) if rows else Share(range(0, 1), size, 0.0))
    return parts


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


def batch_keys(sampler: BucketBatchSampler, epoch: int, position: int):
    """(epoch, position after, global batch) of each optimizer step from a resume point onwards, forever.

    The sampler's batches are global batches (`global_batch_size` images, from one bucket): every
    process reads the same sequence and takes its `shares` of each, so the order of images, and so the
    run, does not depend on how many processes split it.
    """
    while True:
        batches = sampler.batches(epoch)
        while position < len(batches):
            position += 1
            yield epoch, position, batches[position - 1]
        epoch, position = epoch + 1, 0
