"""The trainer on the tiny offline pipeline: it learns, its files load in diffusers, resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdlora
from sdlora.training.config import TrainConfig
from sdlora.training.loop import TrainingDiverged, run_training, setup_run, train
from sdlora.training.steps import lr_factor
from sdlora.training.loss import diffusion_loss
from conftest import te_out, unet_out


def config(tiny_dir, images, out, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_dir), data=str(images), output_dir=str(out), resolution=16, batch_size=4,
                  max_steps=12, lr=2e-3, rank=4, seed=7, log_every=1, save_dtype="fp32")
    values.update(overrides)
    return TrainConfig(**values)


def adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(path).items()}


def assert_adapters_close(a: Path, b: Path, atol: float) -> None:
    first, second = adapter_tensors(a), adapter_tensors(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=atol, rtol=0, msg=key)


def test_short_run_lowers_the_loss_at_fixed_noise(tiny_dir, images, tmp_path):
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=40, lr=1e-2, targets="attn-mlp"), quiet=True)
    before = run.fixed_noise_loss()
    run_training(run)
    after = run.fixed_noise_loss()
    assert after < 0.85 * before, (before, after)  # measured: 1.136 -> 0.807
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all({"loss", "lr", "time"} <= r.keys() for r in records)
    assert (tmp_path / "lora.safetensors").is_file()


def test_trained_file_loads_in_diffusers_with_our_outputs(tiny_dir, images, tmp_path, pipe, reference_client):
    from diffusers import StableDiffusionPipeline

    path = train(config(tiny_dir, images, tmp_path, train_text_encoder=True, max_steps=6, targets="attn-mlp"),
                 quiet=True)
    sdlora.load(pipe, path, strength=0.9)
    reference = StableDiffusionPipeline.from_pretrained(tiny_dir)
    base = unet_out(reference)
    reference.load_lora_weights(str(path), adapter_name="trained")
    reference.set_adapters(["trained"], adapter_weights=[0.9])
    assert (unet_out(pipe) - base).abs().max() > 1e-4  # training changed something
    torch.testing.assert_close(unet_out(reference), unet_out(pipe), atol=1e-4, rtol=0)
    torch.testing.assert_close(te_out(reference), te_out(pipe), atol=1e-4, rtol=0)
    with __import__("safetensors").safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_steps"] == "6" and json.loads(metadata["sdlora"])["training"]["rank"] == 4


def test_cached_and_uncached_runs_give_the_same_adapter(tiny_dir, images, tmp_path):
    cached = train(config(tiny_dir, images, tmp_path / "cached", flip=0.5), quiet=True)
    uncached = train(config(tiny_dir, images, tmp_path / "uncached", flip=0.5, cache_latents=False,
                            cache_text=False), quiet=True)
    assert_adapters_close(cached, uncached, atol=1e-5)


def test_disk_cache_is_reused(tiny_dir, images, tmp_path):
    first = setup_run(config(tiny_dir, images, tmp_path / "a", cache_dir=str(tmp_path / "cache")), quiet=True)
    assert first.images.cache.reused == 0 and len(list((tmp_path / "cache").iterdir())) == 8
    second = setup_run(config(tiny_dir, images, tmp_path / "b", cache_dir=str(tmp_path / "cache")), quiet=True)
    assert second.images.cache.reused == 8
    for key, (mean, std) in first.images.cache.entries.items():
        again = second.images.cache.entries[key]
        assert torch.equal(again[0], mean) and torch.equal(again[1], std)


def test_killed_run_resumes_to_the_same_adapter(tiny_dir, images, tmp_path):
    steps = 60
    settings = dict(max_steps=steps, save_every=5, keep_checkpoints=2, flip=0.5, shuffle_tags=True,
                    lr_scheduler="cosine", warmup_steps=5)
    reference = train(config(tiny_dir, images, tmp_path / "reference", **settings), quiet=True)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sdlora", "train", "--quiet", "--model", str(tiny_dir), "--data", str(images),
               "--output-dir", str(out), "--resolution", "16", "--batch-size", "4", "--max-steps", str(steps),
               "--lr", "2e-3", "--rank", "4", "--seed", "7", "--log-every", "1", "--save-every", "5",
               "--keep-checkpoints", "2", "--flip", "0.5", "--shuffle-tags", "--lr-scheduler", "cosine",
               "--warmup-steps", "5"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000010").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "lora.safetensors").exists()  # it really died before the end
    folders = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert len(folders) <= 2  # keep_checkpoints

    resumed = train(config(tiny_dir, images, out, resume="latest", **settings), quiet=True)
    assert_adapters_close(resumed, reference, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_dir, images, tmp_path, monkeypatch):
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=10, save_every=3), quiet=True)
    real_loss = run.micro_batch_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(run, "micro_batch_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 5"):
        run_training(run)
    checkpoint = tmp_path / "checkpoints" / "step-000003" / "adapter.safetensors"
    assert all(torch.isfinite(t).all() for t in load_file(checkpoint).values())
    assert not (tmp_path / "lora.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000003"]


def test_samples_validation_and_resolved_config(tiny_dir, images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue circle\n")
    out = tmp_path / "run"
    train(config(tiny_dir, images, out, max_steps=4, sample_prompts=str(prompts), sample_every=2, sample_steps=2,
                 validation_split=0.25, validation_every=2), quiet=True)
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(out / "samples" / grids[0]).size == (32, 16)  # two prompts side by side
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    from sdlora.training.config import build

    again = build({}, out / "config.toml")
    assert again == config(tiny_dir, images, out, max_steps=4, sample_prompts=str(prompts), sample_every=2,
                           sample_steps=2, validation_split=0.25, validation_every=2)


@pytest.mark.parametrize("options", [
    {"gradient_accumulation": 2, "mixed_precision": "bf16", "gradient_checkpointing": True},
    {"min_snr_gamma": 5.0, "noise_offset": 0.05, "prediction_type": "v_prediction", "targets": "full"},
    {"train_text_encoder": True, "text_encoder_lr": 1e-3, "caption_dropout": 0.5, "cache_latents": False},
    {"targets": r"attn1\.(to_q|to_v)$|resnets\.\d+\.conv2$", "rank": 2},
    {"train_text_encoder": True, "timestep_max": 500, "preserve_outside_window": True, "cache_text": False},
])
def test_option_combinations_train(tiny_dir, images, tmp_path, options):
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=3, **options), quiet=True)
    before = {k: v.detach().clone() for k, v in enumerate(run.optim.parameters)}
    path = run_training(run)
    assert any(not torch.equal(before[i], p.detach()) for i, p in enumerate(run.optim.parameters))
    assert all(torch.isfinite(t).all() for t in load_file(path).values())


def test_preserved_timesteps_are_trained_towards_the_base_prediction():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(64, 4, 2, 2)
    seen, calls = {}, []

    def unet(noisy, timesteps, encoder_hidden_states):
        seen["noisy"], seen["timesteps"] = noisy, timesteps
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    def base_prediction(noisy, timesteps, rows):
        calls.append((timesteps, rows))
        return torch.zeros_like(noisy)

    loss = diffusion_loss(unet, scheduler, latents, {"encoder_hidden_states": None}, torch.Generator().manual_seed(0),
                          prediction_type="epsilon", timestep_range=(0, 400), base_prediction=base_prediction)
    timesteps = seen["timesteps"]
    inside = timesteps < 400
    assert inside.any() and (~inside).any()  # drawn from the whole schedule, not the window alone
    (base_timesteps, rows), = calls
    assert torch.equal(rows, (~inside).nonzero().flatten()) and torch.equal(base_timesteps, timesteps[~inside])
    # The model predicts 0: the loss is the mean square of the target, the noise inside the window and
    # the base prediction (0) outside. From zero latents, noisy = sqrt(1 - alpha_bar) * noise.
    noise = seen["noisy"] / (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    expected = (noise.pow(2).mean(dim=(1, 2, 3)) * inside).mean()
    torch.testing.assert_close(loss, expected)

    diffusion_loss(unet, scheduler, latents, {"encoder_hidden_states": None}, torch.Generator().manual_seed(0),
                   prediction_type="epsilon", timestep_range=(0, 400))
    assert (seen["timesteps"] < 400).all()  # without preservation the window is all that is drawn


def test_lr_schedules():
    assert lr_factor(0, "constant", 10, 100) == 1.0
    assert lr_factor(0, "constant_with_warmup", 10, 100) == pytest.approx(0.1)
    assert lr_factor(50, "constant_with_warmup", 10, 100) == 1.0
    assert lr_factor(10, "cosine", 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, "cosine", 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, "linear", 0, 100) == pytest.approx(0.0)
    assert lr_factor(25, "linear", 0, 100) == pytest.approx(0.75)


def test_two_processes_train_together(tiny_dir, images, tmp_path):
    """torchrun with two CPU processes: gradients are all-reduced, only the main process writes."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "sdlora", "train",
               "--quiet", "--model", str(tiny_dir), "--data", str(images), "--output-dir", str(out),
               "--resolution", "16", "--batch-size", "2", "--max-steps", "4", "--save-every", "2",
               "--train-text-encoder", "--validation-split", "0.25", "--validation-every", "2", "--log-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # one writer, not two
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert all(torch.isfinite(t).all() for t in load_file(out / "lora.safetensors").values())


def test_image_loading_workers_change_nothing(tiny_dir, images, tmp_path):
    """num_workers loads images ahead in other processes; the adapter is the same as loading them inline."""
    settings = dict(max_steps=4, cache_latents=False, random_crop=True, flip=0.5)
    inline = train(config(tiny_dir, images, tmp_path / "inline", num_workers=0, **settings), quiet=True)
    ahead = train(config(tiny_dir, images, tmp_path / "ahead", num_workers=2, **settings), quiet=True)
    assert_adapters_close(inline, ahead, atol=0)


def test_zero_terminal_snr_rescales_the_schedule(tiny_dir, images, tmp_path):
    from sdlora.errors import ConfigError

    run = setup_run(config(tiny_dir, images, tmp_path / "v", zero_terminal_snr=True, max_steps=2,
                             prediction_type="v_prediction"), quiet=True)
    alphas = run.scheduler.alphas_cumprod
    assert alphas[-1] == 0 and alphas[0] > 0.99  # the last step is pure noise, the first almost clean
    assert run.model.pipe.scheduler.config.rescale_betas_zero_snr  # and the sampler knows it
    assert sdlora.read_adapter(run_training(run))[1]["ss_zero_terminal_snr"] == "True"
    with pytest.raises(ConfigError, match="needs v_prediction"):  # the tiny model predicts epsilon
        setup_run(config(tiny_dir, images, tmp_path / "eps", zero_terminal_snr=True), quiet=True)


def test_resolution_defaults_to_the_models_own_and_upscaling_is_named(tiny_dir, images, tmp_path, capsys):
    run = setup_run(config(tiny_dir, images, tmp_path / "a", resolution=None, max_steps=1))
    assert run.model.resolution == 16  # sample size 8 x the VAE's 2
    assert "resolution 16 (the model's own" in capsys.readouterr().out
    setup_run(config(tiny_dir, images, tmp_path / "b", resolution=64, max_steps=1))
    assert "8 of 8 images are enlarged more than 2x" in capsys.readouterr().out


def test_clip_skip_is_bounded_by_the_loaded_text_encoders_depth(tiny_dir, images, tmp_path, capsys):
    from sdlora import cli
    from sdlora.errors import ConfigError
    from sdlora.training.config import validate
    from test_config import valid
    from test_reliability import cli_args

    depth = __import__("transformers").CLIPTextConfig.from_pretrained(tiny_dir / "text_encoder").num_hidden_layers
    assert depth < 12  # so that the old bound (CLIP-L's 12 layers) would have let depth + 1 through
    assert cli.main(cli_args(tiny_dir, images, tmp_path / "deep", clip_skip=depth + 1)) == 2
    assert capsys.readouterr().err == (f"sdlora: error: clip_skip {depth + 1} is deeper than this Stable Diffusion "
                                       f"1.x model's text_encoder, which has {depth} layers: give 1 to {depth}\n")
    assert not (tmp_path / "deep" / "lora.safetensors").exists()
    run = setup_run(config(tiny_dir, images, tmp_path / "within", clip_skip=depth, max_steps=1), quiet=True)
    assert run.model.text_options.clip_skip == depth
    validate(valid(tmp_path, clip_skip=23))  # SD 2.x's encoder has 23 layers: the model decides, not validate
    with pytest.raises(ConfigError, match="clip_skip counts layers from the end, 1 being the last, got 0"):
        validate(valid(tmp_path, clip_skip=0))


def test_save_scale_multiplies_the_final_update_and_not_the_checkpoints(tiny_dir, images, tmp_path, pipe):
    plain = train(config(tiny_dir, images, tmp_path / "plain", max_steps=4, save_every=4), quiet=True)
    scaled = train(config(tiny_dir, images, tmp_path / "scaled", max_steps=4, save_every=4, save_scale=1.5),
                   quiet=True)
    # The same factors, alpha times 1.5: a naive W + 1.5 (alpha / rank) up @ down is what loads.
    first, second = load_file(plain), load_file(scaled)
    assert first.keys() == second.keys()
    for key in first:
        factor = 1.5 if key.endswith(".alpha") else 1.0
        torch.testing.assert_close(second[key], first[key] * factor, msg=key)
    base = unet_out(pipe)
    sdlora.load(pipe, plain, strength=1.5, name="plain")
    at_one_and_a_half = unet_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, scaled, name="scaled")
    torch.testing.assert_close(unet_out(pipe), at_one_and_a_half, atol=1e-5, rtol=0)
    assert not torch.allclose(at_one_and_a_half, base)
    checkpoint = tmp_path / "scaled" / "checkpoints" / "step-000004" / "adapter.safetensors"
    assert torch.equal(load_file(checkpoint)[next(k for k in first if k.endswith(".alpha"))],
                       first[next(k for k in first if k.endswith(".alpha"))])
