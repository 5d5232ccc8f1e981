"""Training for stacking: an adapter trained in some UNet blocks only, and one trained with another
adapter applied (frozen), whose file is left as it was and whose run resumes exactly."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import sdlora
from sdlora.base_models.parts import components
from sdlora.errors import ConfigError
from sdlora.loader import _block_ids, _layers
from sdlora.training.loop import train

from conftest import make_adapter_file
from test_train import adapter_tensors, assert_adapters_close, config


def adapted_blocks(pipe, name) -> dict:
    """block -> how many layers of adapter `name` lie in it."""
    block_of, _ = _block_ids(components(pipe))
    found = {}
    for component, path, wrapper in _layers(components(pipe)):
        if name in wrapper.adapters:
            block = block_of(component, path)
            found[block] = found.get(block, 0) + 1
    return found


def test_blocks_train_nothing_outside_them(tiny_dir, images, tmp_path, pipe):
    every = train(config(tiny_dir, images, tmp_path / "every", targets="full", max_steps=3), quiet=True)
    sdlora.load(pipe, every, name="every")
    assert len(adapted_blocks(pipe, "every")) >= 6  # full targets reach every block of the tiny UNet

    only = train(config(tiny_dir, images, tmp_path / "only", targets="full", max_steps=3, blocks=["OUT01", "M00"]),
                 quiet=True)
    sdlora.load(pipe, only, name="only")
    assert set(adapted_blocks(pipe, "only")) == {"OUT01", "M00"}
    tensors = load_file(only)
    ups = [tensor for key, tensor in tensors.items() if "lora_up" in key]
    assert ups and all(tensor.abs().max() > 0 for tensor in ups)  # every layer in those blocks trained
    assert len(tensors) < len(load_file(every)) / 2


def test_bad_blocks_are_refused_before_training(tiny_dir, images, tmp_path):
    with pytest.raises(ConfigError, match="name UNet blocks as block weights do"):
        train(config(tiny_dir, images, tmp_path, blocks=["up"]), quiet=True)
    with pytest.raises(ConfigError, match="blocks OUT09: this UNet's blocks are IN00, IN01"):
        train(config(tiny_dir, images, tmp_path, blocks=["OUT09"]), quiet=True)
    assert not (tmp_path / "lora.safetensors").exists()


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_training_with_a_frozen_adapter_leaves_it_as_it_was_and_resumes_exactly(tiny_dir, images, tmp_path, pipe):
    frozen = make_adapter_file(pipe, tmp_path / "character.safetensors", name="character", seed=3, targets="attn")
    before = digest(frozen)
    steps = 16
    settings = dict(max_steps=steps, save_every=5, keep_checkpoints=2, with_adapters=[f"{frozen}:0.7"])
    reference = train(config(tiny_dir, images, tmp_path / "reference", **settings), quiet=True)
    alone = train(config(tiny_dir, images, tmp_path / "alone", max_steps=steps), quiet=True)
    assert digest(frozen) == before
    # The file holds the trained adapter alone, and the frozen one changed what it learned.
    assert adapter_tensors(reference).keys() == adapter_tensors(alone).keys()
    assert any(not torch.allclose(adapter_tensors(reference)[key], adapter_tensors(alone)[key], atol=1e-4)
               for key in adapter_tensors(alone))

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "sdlora", "train", "--quiet", "--model", str(tiny_dir), "--data", str(images),
               "--output-dir", str(out), "--resolution", "16", "--batch-size", "4", "--max-steps", str(steps),
               "--lr", "2e-3", "--rank", "4", "--seed", "7", "--log-every", "1", "--save-every", "5",
               "--keep-checkpoints", "2", "--save-dtype", "fp32", "--with-adapters", f"{frozen}:0.7"]
    killed = subprocess.run(command, env={**os.environ, "SDLORA_TEST_FAULT": "kill:step:13"}, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (out / "lora.safetensors").exists() and (out / "checkpoints" / "step-000010").is_dir()
    resumed = train(config(tiny_dir, images, out, resume="latest", **settings), quiet=True)
    assert_adapters_close(resumed, reference, atol=1e-5)
    assert digest(frozen) == before

    # A resumed run must apply the same frozen file: another one under the same name is refused.
    (out / "lora.safetensors").unlink()
    make_adapter_file(pipe, frozen, name="character", seed=4, targets="attn")
    with pytest.raises(ConfigError, match="is not the file this run was trained with"):
        train(config(tiny_dir, images, out, resume="latest", **settings), quiet=True)


def test_a_missing_frozen_adapter_is_named(tiny_dir, images, tmp_path):
    with pytest.raises(ConfigError, match="with_adapters: .*nothing.safetensors does not exist"):
        train(config(tiny_dir, images, tmp_path, with_adapters=[str(tmp_path / "nothing.safetensors")]), quiet=True)


def test_b_lora_presets_name_sdxls_first_up_block_attentions():
    """B-LoRA's content and style layers, up_blocks.0.attentions.0 and .1, are SDXL's OUT00 and OUT01."""
    from types import SimpleNamespace

    from sdlora.training.config import training_blocks
    from test_sgm import SDXL, meta_unet

    unet = meta_unet(SDXL)
    block_of, _ = _block_ids({"unet": SimpleNamespace(config=unet.config)})
    assert training_blocks(["b-lora-content"]) == [block_of("unet", "up_blocks.0.attentions.0.proj_in")]
    assert training_blocks(["b-lora-style", "M00"]) == [block_of("unet", "up_blocks.0.attentions.1.proj_in"), "M00"]
