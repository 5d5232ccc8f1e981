"""Encoding images and captions for training, once (cached) or per step, with the same arithmetic.

The VAE gives a distribution per image; we keep its mean and std and draw the latent sample from the
step's own generator. So caching changes when the VAE runs, never which numbers the UNet sees.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from ..reliability.durable import write_file
from ..base_models.families import TextConditioning
from .data import ImageCaptionDataset, crop_box
from .loss import Draws, draws_of


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution, fp32, for a batch of [-1, 1] pixels."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype, non_blocking=True)).latent_dist  # no sync per step
    return dist.mean.float(), dist.std.float()


def sample_latents(vae_config, mean: torch.Tensor, std: torch.Tensor, draws: Draws | torch.Generator) -> torch.Tensor:
    """One draw from the latent distribution, scaled as the UNet was trained to expect."""
    noise = draws_of(draws, mean.shape[0]).normal(*mean.shape[1:]).to(mean.device, non_blocking=True)
    latents = mean + std * noise
    shift = vae_config.get("shift_factor") or 0.0
    return (latents - shift) * vae_config.scaling_factor


def to_device(batch: torch.Tensor, device) -> torch.Tensor:
    """A batch made on the host, on `device` without the host waiting: pinned first for a GPU, so the
    copy runs beside the step's work instead of being a sync in every step."""
    if torch.device(device).type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def latent_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] pixel masks averaged over each latent's H/h x W/w pixels: [B, 1, h, w] loss weights."""
    height, width = masks.shape[-2:]
    # The VAE's scale factor, read off the latents rather than assumed (8 for SD, 2 for the toy model).
    assert height % size[0] == 0 and width % size[1] == 0, (masks.shape, size)
    return F.avg_pool2d(masks, (height // size[0], width // size[1]))


def add_weights(digest, module: torch.nn.Module, prefix: str = "") -> None:
    """Add a module's weights to a hash, cheaply: every tensor's name, shape, type and sum.

    One sum per tensor, moved to the CPU at once: a model on a GPU is read without a sync per tensor.
    """
    tensors = sorted(module.state_dict().items())
    sums = torch.stack([t.sum(dtype=torch.float64).cpu() for _, t in tensors]).tolist() if tensors else []
    for (key, tensor), total in zip(tensors, sums):
        digest.update(f"{prefix}{key}:{tuple(tensor.shape)}:{tensor.dtype}:{total:.12e};".encode())


def vae_fingerprint(vae) -> str:
    """Identifies a VAE (its config and weights) cheaply enough to key a disk cache with."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    add_weights(digest, vae)
    return digest.hexdigest()[:16]


class Sharing(NamedTuple):
    """How the processes of a run split work each of them needs the whole of (the caches): process p
    does items p, p + processes, ...; `gather` hands every process the parts of all."""

    process: int = 0
    processes: int = 1
    gather: Callable[[dict], list[dict]] = lambda part: [part]

    def mine(self, items: list) -> list:
        return items[self.process :: self.processes]


class LatentCache:
    """(item, flipped) -> (mean, std) for every image the run can see, encoded before training.

    With masks, `masks` holds each one at the latents' size too (not on disk: it is cheap to make,
    and a disk entry is keyed by the image alone). With several processes each encodes (or reads) its
    `sharing` part, writes it to `cache_dir` (each file whole, under its final name only when
    complete), and then every process holds every entry.
    """

    def __init__(self, vae, dataset: ImageCaptionDataset, flips: bool, cache_dir: Path | None,
                 progress: bool = True, sharing: Sharing = Sharing()):
        entries: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks: dict[tuple[int, bool], torch.Tensor] = {}
        fingerprint = vae_fingerprint(vae) if cache_dir else ""
        wanted = [(item, flipped) for item in range(len(dataset.items)) for flipped in ((False, True) if flips else
                                                                                       (False,))]
        buckets = {item: bucket for item, bucket in zip(dataset.item_of, dataset.sample_buckets)}
        reused = 0
        for item, flipped in tqdm(sharing.mine(wanted), desc="caching latents", unit="image", leave=False,
                                  disable=not progress):
            bucket = buckets[item]
            disk_path = None
            if cache_dir:
                content = hashlib.sha256(dataset.items[item].path.read_bytes()).hexdigest()[:24]
                disk_path = cache_dir / f"{content}-{bucket[0]}x{bucket[1]}-{int(flipped)}-{fingerprint}.safetensors"
                if disk_path.is_file():
                    cached = load_file(disk_path)
                    entries[item, flipped] = (cached["mean"], cached["std"])
                    reused += 1
                    continue
            pixels, _ = dataset.item_pixels(item, bucket, flipped)
            mean, std = encode_pixels(vae, pixels[None])
            entries[item, flipped] = (mean[0].cpu(), std[0].cpu())
            if disk_path:
                tensors = {"mean": mean[0].cpu().contiguous(), "std": std[0].cpu().contiguous()}
                write_file(disk_path, save(tensors))
        parts = sharing.gather({"entries": entries, "reused": reused})
        self.entries = {key: value for part in parts for key, value in part["entries"].items()}
        self.reused = sum(part["reused"] for part in parts)
        if dataset.has_masks:
            for (item, flipped), (mean, _) in self.entries.items():
                # Cached latents are centre crops: random crops are never cached.
                image = dataset.items[item]
                _, top_left = crop_box((image.width, image.height), buckets[item])
                mask = dataset.item_mask(item, buckets[item], flipped, top_left)
                self.masks[item, flipped] = latent_mask(mask[None], tuple(mean.shape[-2:]))[0]

    def batch(self, dataset: ImageCaptionDataset, indices: list[int], epoch: int, device) -> tuple[torch.Tensor, ...]:
        pairs = [self.entries[dataset.item_of[i], dataset.flipped(i, epoch)] for i in indices]
        mean, std = torch.stack([m for m, _ in pairs]), torch.stack([s for _, s in pairs])
        return to_device(mean, device), to_device(std, device)

    def mask_batch(self, dataset: ImageCaptionDataset, indices: list[int], epoch: int, device) -> torch.Tensor:
        """The batch's latent-sized masks, [B, 1, h, w]."""
        masks = [self.masks[dataset.item_of[i], dataset.flipped(i, epoch)] for i in indices]
        return to_device(torch.stack(masks), device)


class TextCache:
    """caption -> the text encoders' conditioning, for frozen encoders and captions that never change.

    Kept on the CPU (SDXL's is 77 x 2048 numbers a caption) and moved per batch.
    """

    def __init__(self, encode: Callable[[list[str]], TextConditioning], captions: list[str],
                 sharing: Sharing = Sharing()):
        unique = sharing.mine(sorted(set(captions)))  # with several processes, each encodes its part
        entries: dict[str, TextConditioning] = {}
        with torch.no_grad():
            for start in range(0, len(unique), 64):
                chunk = unique[start : start + 64]
                encoded = encode(chunk).to("cpu")
                entries.update({caption: encoded[row] for row, caption in enumerate(chunk)})
        self.entries = {caption: value for part in sharing.gather(entries) for caption, value in part.items()}

    def batch(self, captions: list[str]) -> TextConditioning:
        return TextConditioning.stack([self.entries[caption] for caption in captions])
