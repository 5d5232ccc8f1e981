"""What only a GPU can show: precisions, 8-bit AdamW, checkpointing, fused fp16 weights, and no host sync
in a training step. Skipped without CUDA (never faked on a CPU); `pytest -m gpu`, and bench/gpu.sh, run them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sdlora
from sdlora.errors import TrainingDiverged
from sdlora.training import loop
from sdlora.training.loop import run_training, setup_run
from conftest import unet_inputs
from test_train import adapter_tensors, config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU machine")]


def losses(out: Path) -> list[float]:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_without_nan_and_lowers_the_loss(tiny_dir, images, tmp_path, precision):
    run = setup_run(config(tiny_dir, images, tmp_path, mixed_precision=precision, max_steps=30, lr=1e-2), quiet=True)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert run.device.type == "cuda" and run.model.unet.dtype == dtype
    before = run.fixed_noise_loss()
    path = run_training(run)
    assert all(math.isfinite(loss) for loss in losses(tmp_path))
    assert run.fixed_noise_loss() < before
    assert all(torch.isfinite(t).all() for t in adapter_tensors(path).values())


def test_adamw8bit_and_gradient_checkpointing_train(tiny_dir, images, tmp_path):
    pytest.importorskip("bitsandbytes", reason="pip install 'sdlora[8bit]' for AdamW8bit")
    plain = run_training(setup_run(config(tiny_dir, images, tmp_path / "plain", max_steps=8), quiet=True))
    checkpointed = run_training(setup_run(config(tiny_dir, images, tmp_path / "ckpt", max_steps=8,
                                                 gradient_checkpointing=True), quiet=True))
    a, b = adapter_tensors(plain), adapter_tensors(checkpointed)
    for key in a:  # recomputing activations changes nothing but rounding
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    eight = run_training(setup_run(config(tiny_dir, images, tmp_path / "8bit", max_steps=8, optimizer="adamw8bit"),
                                   quiet=True))
    assert all(torch.isfinite(t).all() for t in adapter_tensors(eight).values())


def test_fuse_and_unfuse_on_fp16_weights_on_the_gpu(tiny_dir, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    adapter = run_training(setup_run(config(tiny_dir, images, tmp_path, max_steps=4), quiet=True))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, torch_dtype=torch.float16).to("cuda")
    sample, timesteps, text = (t.to("cuda", torch.float16) if t.is_floating_point() else t.to("cuda")
                               for t in unet_inputs())
    with torch.no_grad():
        base = pipe.unet(sample, timesteps, text).sample
        sdlora.load(pipe, adapter, strength=0.8)
        applied = pipe.unet(sample, timesteps, text).sample
        sdlora.fuse(pipe)
        fused = pipe.unet(sample, timesteps, text).sample
        sdlora.unfuse(pipe)
        sdlora.unload(pipe)
        restored = pipe.unet(sample, timesteps, text).sample
    assert (applied - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(fused, applied, atol=2e-3, rtol=1e-2)  # fp16 rounding of W + s * up @ down
    torch.testing.assert_close(restored, base, atol=1e-3, rtol=0)


def test_no_host_sync_in_a_training_step_that_does_not_log(tiny_dir, images, tmp_path, monkeypatch):
    """torch's sync debug mode raises on any call that makes the host wait for the GPU (.item(), a copy to
    the host, a blocking copy from it, nonzero...). On from the first micro-batch to the one check step."""
    run = setup_run(config(tiny_dir, images, tmp_path, mixed_precision="bf16", max_steps=6, log_every=100),
                    quiet=True)
    real_loss, real_agreed = run.micro_batch_loss, loop.agreed_losses
    steps_checked = []

    def loss(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        return real_loss(*args, **kwargs)

    def agreed(run, step, *args):
        torch.cuda.set_sync_debug_mode(0)
        steps_checked.append(step)
        return real_agreed(run, step, *args)

    run.micro_batch_loss = loss
    monkeypatch.setattr(loop, "agreed_losses", agreed)
    try:
        run_training(run)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps_checked == [6]  # five steps ran under the debug mode, and the check step read the loss


def test_a_nan_is_still_caught_without_a_sync_per_step(tiny_dir, images, tmp_path, monkeypatch):
    monkeypatch.setenv("SDLORA_TEST_FAULT", "nan:3")
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=8, log_every=5), quiet=True)
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 3"):
        run_training(run)


def test_the_vae_and_text_encoders_leave_the_gpu_once_cached(tiny_dir, images, tmp_path):
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=2), quiet=True)
    assert run.images.cache is not None and run.text_cache is not None
    assert run.model.unet.device.type == "cuda"
    assert run.model.vae.device.type == "cpu"
    assert all(encoder.device.type == "cpu" for encoder in run.model.text_encoders)
    run_training(run)
