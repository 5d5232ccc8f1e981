"""Optimizer and adapter options of the trainer: LoRA+ (its own learning rate for `up`), DoRA training (written
with `dora_scale`), and an EMA of the adapter weights (its own file). Each checked against an independent
computation written here, and DoRA files against the LyCORIS library (the reference client of DoRA files)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import sdlora
from conftest import te_out, unet_out
from sdlora.errors import ConfigError
from sdlora.loader import up_parameters
from sdlora.adapters.lora import AdaptedLayer
from sdlora.adapters.lycoris import DoRA
from sdlora.training.config import TrainConfig, validate
from sdlora.training.loop import run_training, setup_run, train
from sdlora.training.steps import lr_factor
from test_train import adapter_tensors, config as train_config


def config(tiny_dir, images, out, **overrides) -> TrainConfig:
    """test_train's tiny run, 6 steps unless told."""
    return train_config(tiny_dir, images, out, **{"max_steps": 6, **overrides})


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"loraplus_ratio": 0.5}, "loraplus_ratio .* at least 1 .* got 0.5"),
    ({"ema_decay": 1.0}, "ema_decay must be between 0 and 1 .* got 1.0"),
    ({"ema_decay": 0.0}, "ema_decay must be between 0 and 1"),
])
def test_bad_values_are_refused_with_the_value(tiny_dir, images, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(config(tiny_dir, images, tmp_path, **overrides))


def test_the_options_are_flags(capsys):
    from sdlora import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--dora", "--no-dora", "--loraplus-ratio", "--ema-decay"):
        assert flag in text


# ---------------------------------------------------------------- LoRA+


def test_loraplus_gives_the_up_matrices_their_own_scaled_learning_rate(tiny_dir, images, tmp_path):
    run = setup_run(config(tiny_dir, images, tmp_path, loraplus_ratio=16.0, train_text_encoder=True,
                             text_encoder_lr=5e-4, lr_scheduler="cosine", warmup_steps=2, max_steps=4,
                             targets="attn-mlp"), quiet=True)
    pipe = run.model.pipe
    groups = run.optim.optimizer.param_groups
    assert len(groups) == 4
    expected = []
    for component, lr in (("unet", 2e-3), ("text_encoder", 5e-4)):
        layers = [m for m in getattr(pipe, component).modules() if isinstance(m, AdaptedLayer)]
        ups = [layer.adapters["lora"].up.weight for layer in layers]
        downs = [layer.adapters["lora"].down.weight for layer in layers]
        expected += [(downs, lr), (ups, lr * 16.0)]
    for group, (parameters, lr) in zip(groups, expected):
        assert [id(p) for p in group["params"]] == [id(p) for p in parameters]
        assert group["initial_lr"] == pytest.approx(lr, rel=1e-12)
        assert group["weight_decay"] == run.config.weight_decay
        assert group["fused"]  # one kernel over the tensors, not a Python loop (bench/peers.py)
    run_training(run)
    factor = lr_factor(4, "cosine", 2, 4)
    for group, (_, lr) in zip(groups, expected):  # the schedule moves every group alike
        assert group["lr"] == pytest.approx(lr * factor, rel=1e-12)


def test_loraplus_moves_up_by_adamws_step_at_the_scaled_rate():
    """One AdamW step over two groups is the independent per-tensor update with each group's rate."""
    base = nn.Linear(6, 5)
    lora = sdlora.adapters.lora.LoRA(base, 2)
    with torch.no_grad():
        lora.up.weight.normal_()
    groups = [{"params": [lora.down.weight], "lr": 1e-2}, {"params": [lora.up.weight], "lr": 1e-2 * 16}]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    before = {name: p.detach().clone() for name, p in lora.named_parameters()}
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    lora(x).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in lora.named_parameters()}
    optimizer.step()
    for name, lr in (("down.weight", 1e-2), ("up.weight", 0.16)):
        # first AdamW step: m/(sqrt(v)+eps) with bias correction is g/(|g|+eps); decoupled decay first
        g = grads[name]
        expected = before[name] * (1 - lr * 1e-2) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(dict(lora.named_parameters())[name].detach(), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- DoRA


def naive_dora(layer: nn.Linear | nn.Conv2d, down: torch.Tensor, up: torch.Tensor, scale: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """m (W + s B A) / ||W + s B A||, the norm over everything but the input channel, written out."""
    weight = layer.weight.detach()
    product = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    merged = weight + scale * product
    dims = [d for d in range(merged.dim()) if d != 1]
    norms = merged.square().sum(dim=dims, keepdim=True).sqrt()
    return magnitude.reshape(norms.shape) * merged / norms


@pytest.mark.parametrize("layer", [nn.Linear(12, 7), nn.Conv2d(5, 6, 3, padding=1)], ids=["linear", "conv"])
def test_dora_forward_is_the_formula(layer):
    torch.manual_seed(0)
    dora = DoRA.trainable(layer, rank=3, alpha=1.5)
    wrapper = AdaptedLayer(layer)
    wrapper.add("d", dora)
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 5, 8, 8)
    assert dora.magnitude.shape == ((1, 12) if isinstance(layer, nn.Linear) else (1, 5, 1, 1))
    torch.testing.assert_close(wrapper(x), layer(x), atol=1e-6, rtol=0)  # a fresh DoRA is the base layer
    with torch.no_grad():
        dora.inner.up.weight.normal_()
        dora.magnitude.mul_(torch.rand(dora.magnitude.shape) + 0.5)
    weight = naive_dora(layer, dora.inner.down.weight.detach(), dora.inner.up.weight.detach(), 1.5 / 3,
                        dora.magnitude.detach())
    expected = F.linear(x, weight, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(
        x, weight, layer.bias)
    torch.testing.assert_close(wrapper(x), expected, atol=1e-5, rtol=1e-5)
    wrapper(x).sum().backward()  # every part of it trains
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dora.parameters())


def test_fresh_dora_leaves_the_model_as_it_was(pipe):
    base_unet, base_te = unet_out(pipe), te_out(pipe)
    sdlora.add_adapter(pipe, "d", rank=4, targets="full", dora=True)
    kinds = sdlora.list_adapters(pipe)[0].kinds
    assert list(kinds) == ["lora+dora"] and any(isinstance(m, nn.Conv2d) for m in pipe.unet.modules())
    torch.testing.assert_close(unet_out(pipe), base_unet, atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), base_te, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def trained_dora(tiny_dir, images, tmp_path_factory):
    """A short DoRA run over every layer (convs too) and the text encoder, with the trainer's outputs."""
    out = tmp_path_factory.mktemp("dora")
    run = setup_run(config(tiny_dir, images, out, dora=True, targets="full", train_text_encoder=True,
                             lr=1e-2), quiet=True)
    path = run_training(run)
    run.model.unet.eval()
    return path, unet_out(run.model.unet), te_out(run.model.text_encoders[0])


def test_trained_dora_file_loads_with_the_training_outputs(trained_dora, pipe):
    path, unet_trained, te_trained = trained_dora
    tensors = adapter_tensors(path)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha", f"{name}.dora_scale"} <= set(tensors)
    assert tensors[f"{name}.dora_scale"].shape[0] == 1  # one magnitude per input column
    conv = next(key for key, t in tensors.items() if key.endswith("dora_scale") and t.dim() == 4)
    assert tensors[conv].shape[2:] == (1, 1) and tensors[conv].shape[0] == 1
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["ss_network_args"])["wd_on_output"] == "False"
    base = unet_out(pipe)
    sdlora.load(pipe, path)
    assert (unet_out(pipe) - base).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(unet_out(pipe), unet_trained, atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), te_trained, atol=1e-5, rtol=0)


def test_trained_dora_file_gives_lycoris_the_same_outputs(trained_dora, pipe):
    """LyCORIS 4.1.3 (the DoRA reference) built as our file says (LoCon, DoRA per input column), loaded with
    the file: the outputs sdlora trained. Its own `create_network_from_weights` cannot rebuild per-input-
    column files (docs/lycoris-facts.md §8), so the network is created with the file's options."""
    from lycoris_reference import build_network

    path, unet_trained, te_trained = trained_dora
    unet, encoder = copy.deepcopy(pipe.unet).eval(), copy.deepcopy(pipe.text_encoder).eval()
    network = build_network(unet, encoder, "locon", rank=4, alpha=4.0, conv_rank=4, conv_alpha=4.0, dora_wd=True,
                            wd_on_output=False)
    holder = nn.Module()
    holder.text_model = encoder
    network.apply_to(holder, unet, apply_text_encoder=True, apply_unet=True)
    state = network.load_weights(str(path))
    assert "unexpected keys" not in state, state.get("unexpected keys", [])[:5]
    loaded = {key.rsplit(".", 2)[0] for key in load_file(path)}
    missing = {key.split(".")[0] for key in state.get("missing keys", [])}
    assert not loaded & missing  # every module of the file was loaded whole
    network.eval()
    torch.testing.assert_close(unet_out(unet), unet_trained, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_out(encoder), te_trained, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- EMA


def test_ema_is_the_warmed_up_average_of_the_weights(tiny_dir, images, tmp_path, pipe):
    decay = 0.2  # low, so that the warm-up min(decay, n / (n + 9)) takes both branches in four steps
    run = setup_run(config(tiny_dir, images, tmp_path, ema_decay=decay, max_steps=4), quiet=True)
    snapshots = []
    step = run.optim.optimizer.step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        snapshots.append([p.detach().clone() for p in run.optim.parameters])
        return result

    run.optim.optimizer.step = recording_step
    path = run_training(run)
    expected = snapshots[0]
    for n, weights in enumerate(snapshots[1:], start=2):
        d = min(decay, n / (n + 9))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights)]
    for average, value in zip(run.optim.ema, expected):
        torch.testing.assert_close(average, value, atol=1e-7, rtol=1e-6)
    for parameter, final in zip(run.optim.parameters, snapshots[-1]):  # the adapter keeps its own weights
        assert torch.equal(parameter, final)

    ema_path = tmp_path / "lora.ema.safetensors"
    main, ema = adapter_tensors(path), adapter_tensors(ema_path)
    assert main.keys() == ema.keys()
    assert any(not torch.equal(main[key], ema[key]) for key in main)
    with safe_open(path, "pt") as f, safe_open(ema_path, "pt") as g:
        assert f.metadata().keys() == g.metadata().keys()
        assert json.loads(g.metadata()["sdlora"])["ema"] is True
    # the file holds the averages, and loads: its up weights are the EMA's
    sdlora.load(pipe, ema_path, name="ema")
    averages = {id(p): average for p, average in zip(run.optim.parameters, run.optim.ema)}
    for loaded, trained in zip(up_parameters(pipe, "ema"), up_parameters(run.model.pipe, "lora"), strict=True):
        torch.testing.assert_close(loaded.detach(), averages[id(trained)], atol=1e-7, rtol=0)


# ---------------------------------------------------------------- resume, all three at once


def test_killed_dora_ema_loraplus_run_resumes_to_the_same_files(tiny_dir, images, tmp_path):
    steps = 16
    settings = dict(max_steps=steps, save_every=5, keep_checkpoints=2, flip=0.5, lr_scheduler="cosine",
                    warmup_steps=3, dora=True, ema_decay=0.9, loraplus_ratio=4.0, targets="attn-mlp")
    reference = train(config(tiny_dir, images, tmp_path / "reference", **settings), quiet=True)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sdlora", "train", "--quiet", "--model", str(tiny_dir), "--data", str(images),
               "--output-dir", str(out), "--resolution", "16", "--batch-size", "4", "--max-steps", str(steps),
               "--lr", "2e-3", "--rank", "4", "--seed", "7", "--log-every", "1", "--save-every", "5",
               "--keep-checkpoints", "2", "--flip", "0.5", "--lr-scheduler", "cosine", "--warmup-steps", "3",
               "--dora", "--ema-decay", "0.9", "--loraplus-ratio", "4", "--targets", "attn-mlp",
               "--save-dtype", "fp32"]
    killed = subprocess.run(command, env={**os.environ, "SDLORA_TEST_FAULT": "kill:step:13"}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (out / "lora.safetensors").exists() and (out / "checkpoints" / "step-000010").is_dir()

    resumed = train(config(tiny_dir, images, out, resume="latest", **settings), quiet=True)
    for mine, theirs in ((resumed, reference), (out / "lora.ema.safetensors", tmp_path / "reference" /
                                                "lora.ema.safetensors")):
        first, second = adapter_tensors(mine), adapter_tensors(theirs)
        assert first.keys() == second.keys() and any(key.endswith("dora_scale") for key in first)
        for key in first:
            torch.testing.assert_close(first[key], second[key], atol=1e-5, rtol=0, msg=key)


def test_resume_refuses_a_checkpoint_trained_without_the_option(tiny_dir, images, tmp_path):
    train(config(tiny_dir, images, tmp_path, max_steps=2, save_every=2), quiet=True)
    with pytest.raises(ConfigError, match="trained with dora=False, this run has dora=True"):
        run_training(setup_run(config(tiny_dir, images, tmp_path, max_steps=4, resume="latest", dora=True), quiet=True))
