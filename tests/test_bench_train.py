"""bench/train.py's cheap parts: per-architecture defaults, and floor inputs each UNet family accepts."""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

from sdlora.base_models import architectures
from sdlora.toy.pipelines import tiny_sdxl_unet, tiny_unet

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        with warnings.catch_warnings():  # its use_cpu_policy() comes after the suite imported torch
            warnings.simplefilter("ignore", UserWarning)
            spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_defaults_per_architecture(bench):
    tiny = bench.parse_args([])
    assert (tiny.arch, tiny.resolution, tiny.batch, tiny.steps, tiny.warmup) == ("tiny", 64, 4, 10, 3)
    assert tiny.runs == ("cached", "cached-gc", "uncached", "preserved")
    real = bench.parse_args(["--arch", "sdxl", "--device", "cpu"])
    assert (real.resolution, real.batch, real.steps, real.warmup, real.runs) == (256, 1, 3, 1, ("cached", "cached-gc"))
    assert real.mixed_precision == "no"
    vram = bench.parse_args(["--sdxl-vram", "--device", "cuda"])
    assert (vram.arch, vram.resolution, vram.batch, vram.runs, vram.mixed_precision) == (
        "sdxl", 1024, 1, ("cached-gc",), "bf16")


def test_bad_runs_and_zero_warmup_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--runs", "cached,fast"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--warmup", "0"])


@pytest.mark.parametrize("build", [tiny_unet, tiny_sdxl_unet])
def test_floor_inputs_fit_the_unet(bench, build):
    unet = build()
    sample, timesteps, conditioning = bench.floor_inputs(unet, batch=2, resolution=64, latent_side=8, device="cpu")
    assert ("added_cond_kwargs" in conditioning) == (unet.config.addition_embed_type == "text_time")
    out = unet(sample, timesteps, **conditioning).sample
    out.pow(2).mean().backward()
    assert out.shape == sample.shape and sample.grad is not None


def test_sdxl_floor_conditioning_has_the_real_widths(bench):
    config = json.loads((architectures.config_folder("sdxl-base") / "unet" / "config.json").read_text())

    class Meta:  # floor_inputs reads only the config
        pass

    unet = Meta()
    unet.config = type("Config", (), config)
    _, _, conditioning = bench.floor_inputs(unet, batch=1, resolution=256, latent_side=32, device="cpu")
    assert conditioning["encoder_hidden_states"].shape == (1, 77, 2048)
    assert conditioning["added_cond_kwargs"]["text_embeds"].shape == (1, 1280)
    assert conditioning["added_cond_kwargs"]["time_ids"].tolist() == [[256, 256, 0, 0, 256, 256]]
