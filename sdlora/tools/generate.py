"""Generating images with adapters: images from consecutive seeds, or a grid over strengths.

Image j is drawn from seed + j, alone, so that it is the same image whatever `num` is and can be
made again by itself. The device is chosen at run time: CUDA in fp16 when there is one, else the
CPU in fp32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import loader
from ..reliability.durable import write_file
from ..errors import AdapterFileError, ConfigError
from ..base_models.parts import native_resolution
from ..adapters.strength import Strength, Window, describe, scaled
from ..images import labelled_columns, png_bytes

COMPARE_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Settings:
    prompt: str
    negative: str | None = None
    steps: int = 30
    guidance: float = 7.5
    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height); None: the model's native size


def runtime() -> tuple[str, torch.dtype]:
    """CUDA with fp16 when a GPU is there (half the memory, the speed of tensor cores), else CPU fp32,
    where fp16 is slow and poorly supported."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or 0 in (int(match[1]), int(match[2])):
        raise ConfigError(f"--size must be WIDTHxHEIGHT in pixels, like 512x768; got {text!r}")
    return int(match[1]), int(match[2])


def image_size(pipe, size: tuple[int, int] | None) -> tuple[int, int]:
    """The size asked for, checked against the VAE's scale, or the model's native square."""
    if size is None:
        native = native_resolution(pipe)
        return native, native
    factor = pipe.vae_scale_factor
    if size[0] % factor or size[1] % factor:
        raise ConfigError(f"--size {size[0]}x{size[1]}: this model's width and height must be multiples of {factor}")
    return size


def load_with_adapters(model: str, loras: list[tuple[Path, Strength]], fuse: bool = False):
    """The pipeline on the run-time device with the adapters loaded; returns (pipe, adapter names)."""
    from ..base_models.sources import load_pipeline

    for path, _ in loras:  # before the minutes a large model takes to load
        if not Path(path).exists():
            raise AdapterFileError(f"{path}: no such adapter file")
    device, dtype = runtime()
    pipe = load_pipeline(model, dtype).to(device)
    pipe.set_progress_bar_config(disable=True)  # our own bar counts images
    names = [loader.load(pipe, path, strength=strength, name=f"lora{index}")
             for index, (path, strength) in enumerate(loras)]
    if fuse and names:
        loader.fuse(pipe)
    return pipe, names


@torch.no_grad()
def images(pipe, settings: Settings, num: int = 1, progress: tqdm | None = None,
           windows: dict[str, Window] | None = None) -> list[Image.Image]:
    """`num` images, image j from a CPU generator seeded with seed + j (the same on every device);
    `windows` gives adapters by name a part of the steps to act in (sdlora.step_windows)."""
    width, height = image_size(pipe, settings.size)
    out = []
    with loader.step_windows(pipe, windows or {}) as callback:
        for j in range(num):
            result = pipe(prompt=settings.prompt, negative_prompt=settings.negative, height=height, width=width,
                          num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                          generator=torch.Generator().manual_seed(settings.seed + j),
                          callback_on_step_end=callback if windows else None)
            out.append(result.images[0])
            if progress is not None:
                progress.update(1)
    return out


def compare(pipe, names: list[str], strengths: list[Strength], settings: Settings, num: int = 1,
            fused: bool = False, windows: dict[str, Window] | None = None) -> Image.Image:
    """A grid: one column per strength in COMPARE_STRENGTHS (each adapter at that fraction of its own
    strength), one row per seed. At strength 0 every adapter is skipped: the base model's images."""
    columns = []
    with tqdm(total=len(COMPARE_STRENGTHS) * num, desc="generate", unit="image") as progress:
        for fraction in COMPARE_STRENGTHS:
            if fused:
                loader.unfuse(pipe)
            for name, strength in zip(names, strengths):
                loader.set_strength(pipe, name, scaled(strength, fraction))
            if fused:
                loader.fuse(pipe)
            columns.append(images(pipe, settings, num, progress, windows))
    narrow = columns[0][0].width < 128  # "strength 0.25" would not fit: the number alone
    return labelled_columns(columns, [f"{fraction:g}" if narrow else f"strength {fraction:g}"
                                      for fraction in COMPARE_STRENGTHS])


def parameters_text(settings: Settings, seed: int, size: tuple[int, int], loras: list[tuple[Path, Strength]]) -> str:
    """The generation parameters as A1111 writes them in a PNG, so that an image says how it was made."""
    lines = [settings.prompt]
    if settings.negative:
        lines.append(f"Negative prompt: {settings.negative}")
    fields = [f"Steps: {settings.steps}", f"CFG scale: {settings.guidance:g}", f"Seed: {seed}",
              f"Size: {size[0]}x{size[1]}"]
    fields += [f"Lora: {Path(path).name}:{describe(strength)}" for path, strength in loras]
    lines.append(", ".join(fields))
    return "\n".join(lines)


def output_paths(path: Path, num: int) -> list[Path]:
    """One image: PATH itself. Several: PATH with -0, -1, ... before the suffix (out-0.png, out-1.png)."""
    if num == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{j}{path.suffix}") for j in range(num)]


def write_images(path: Path, found: list[Image.Image], settings: Settings, size: tuple[int, int],
                 loras: list[tuple[Path, Strength]]) -> list[Path]:
    """Write each image atomically as a PNG that records its parameters."""
    written = []
    for j, (target, image) in enumerate(zip(output_paths(path, len(found)), found)):
        written.append(write_file(target, png_bytes(image, parameters_text(settings, settings.seed + j, size, loras))))
    return written
