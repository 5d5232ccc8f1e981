"""Shared fixtures: one tiny SD 1.x pipeline saved once per session, loaded fresh for each test."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdlora.threads import use_cpu_policy

use_cpu_policy()  # before torch loads OpenMP: tests and their subprocesses share the cores

import torch
from PIL import Image, ImageDraw

import sdlora
from sdlora.toy.pipelines import reference_client_problem, save_tiny_pipeline

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """Eight 16 px images of coloured discs with captions, as a user's folder would hold them."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(8):
        colour = ("red", "blue")[i % 2]
        image = Image.new("RGB", (16, 16), "white")
        offset = i % 5
        ImageDraw.Draw(image).ellipse([offset, offset, offset + 10, offset + 10], fill=colour)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} circle")
    return folder


@pytest.fixture(scope="session")
def reference_client():
    """diffusers' own load_lora_weights can run here; if not, fail with the versions and the fix."""
    problem = reference_client_problem()
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.fixture
def pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_dir)


def randomize(pipe_or_model, name: str, seed: int, std: float = 0.05) -> None:
    """Give an adapter non-zero down and up weights so that properties can fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sdlora.trainable_parameters(pipe_or_model, name):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def unet_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    return sample, torch.tensor([10, 500]), context


@torch.no_grad()
def unet_out(pipe) -> torch.Tensor:
    unet = pipe.unet if hasattr(pipe, "unet") else pipe
    sample, timesteps, context = unet_inputs()
    return unet(sample, timesteps, encoder_hidden_states=context).sample


@torch.no_grad()
def te_out(pipe) -> torch.Tensor:
    text_encoder = pipe.text_encoder if hasattr(pipe, "text_encoder") else pipe
    ids = torch.tensor([[49406 % 600, 5, 17, 42, 99, 3, 12, 519, 520]])
    ids = ids.clamp(max=text_encoder.config.vocab_size - 1)
    return text_encoder(ids)[0]


def make_adapter_file(pipe, path, name="a", seed=0, rank=4, alpha=None, targets="attn", dtype="fp32", **kw):
    """Train-free adapter: attach, randomize, save, unload. The pipeline is left as it was."""
    sdlora.add_adapter(pipe, name, rank=rank, alpha=alpha, targets=targets, **kw)
    randomize(pipe, name, seed)
    sdlora.save(pipe, path, name, dtype=dtype)
    sdlora.unload(pipe, name)
    return path
