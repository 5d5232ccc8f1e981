"""Prior preservation: the options, the class images' cache, the loss and batches, exact resume, and the
star's leak on the toy model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdlora import cli
from sdlora.errors import ConfigError
from sdlora.training.caching import sample_latents
from sdlora.training.config import build, class_prompt_list, to_toml, validate
from sdlora.training.data import BucketBatchSampler
from sdlora.training.loop import run_training, setup_run, train
from sdlora.training.steps import step_generator
from sdlora.training.loss import diffusion_loss
from sdlora.training.prior import (FINGERPRINT_FILE, PENDING_FILE, ClassBatch, class_batch_keys,
                                   prepare_class_images)
from test_config import valid
from test_reliability import cli_args
from test_train import assert_adapters_close, config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def class_images(tmp_path_factory) -> Path:
    """Six 16 px squares in two colours, captioned: a folder of class images as a user would give it."""
    folder = tmp_path_factory.mktemp("class-images")
    for i in range(6):
        colour = ("green", "yellow")[i % 2]
        image = Image.new("RGB", (16, 16), "white")
        ImageDraw.Draw(image).rectangle([2 + i % 3, 2, 12, 12], fill=colour)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {colour} square")
    return folder


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"reg_data": "/no/such/folder"}, "reg_data folder /no/such/folder does not exist"),
    ({"class_prompts": ["a dog"]}, "--class-prompts needs --num-class-images"),
    ({"class_prompts": ["missing.txt"], "num_class_images": 4}, "class_prompts file missing.txt does not exist"),
    ({"class_prompts": [" "], "num_class_images": 4}, "empty prompt"),
    ({"class_prompts": ["a dog"], "num_class_images": 0}, "num_class_images must be at least 1, got 0"),
    ({"num_class_images": 10}, "num_class_images is set but no class images are generated"),
    ({"class_data_dir": "x"}, "class_data_dir is set but no class images are generated"),
    ({"class_sample_steps": 5}, "class_sample_steps is set but no class images are generated: add --class-prompts "
     "or drop --class-sample-steps"),
    ({"class_guidance": 3.0}, "class_guidance is set but no class images are generated"),
    ({"class_prompts": ["a dog"], "num_class_images": 4, "class_sample_steps": 0},
     "class_sample_steps must be at least 1, got 0"),
    ({"prior_loss_weight": 0.5}, "prior_loss_weight is set but prior preservation is off"),
    ({"class_prompts": ["a dog"], "num_class_images": 4, "prior_loss_weight": -1.0},
     "prior_loss_weight must be 0 or more, got -1.0"),
    ({"class_prompts": ["a dog"], "num_class_images": 4, "reg_data": "."}, "not both"),
])
def test_prior_options_are_checked_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(valid(tmp_path, **overrides))


def test_an_empty_reg_data_folder_fails_before_the_model_loads(tmp_path, images, capsys):
    (tmp_path / "empty").mkdir()
    config = valid(tmp_path, data=str(images), reg_data=str(tmp_path / "empty"))  # a model folder with no model
    assert cli.main(["train", "--model", config.model, "--data", config.data, "--output-dir", config.output_dir,
                     "--reg-data", config.reg_data]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"sdlora: error: no usable images in {tmp_path / 'empty'}") and error.count("\n") == 1


def test_class_prompts_from_toml_a_file_or_repeated_flags(tmp_path, monkeypatch):
    prompts = tmp_path / "class.txt"
    prompts.write_text("a red circle\n\n  a blue square \n")
    assert class_prompt_list(str(prompts)) == ["a red circle", "a blue square"]
    assert class_prompt_list([str(prompts), "a dog"]) == ["a red circle", "a blue square", "a dog"]
    toml = tmp_path / "train.toml"
    toml.write_text(f'class_prompts = "{prompts}"\nnum_class_images = 8\n')
    assert build({}, toml).class_prompts == [str(prompts)]  # one string is a list of one
    toml.write_text('class_prompts = ["a red circle", "a blue square"]\n')
    listed = build({}, toml)
    assert listed.class_prompts == ["a red circle", "a blue square"]
    toml.write_text("class_prompts = 3\n")
    with pytest.raises(ConfigError, match="class_prompts must be a string or a list of strings"):
        build({}, toml)
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(to_toml(listed))
    assert build({}, resolved) == listed

    seen = {}
    monkeypatch.setattr("sdlora.training.loop.train", lambda config, quiet: seen.update(config=config))
    assert cli.main(["train", "--model", "m/x", "--data", "d", "--output-dir", "o", "--class-prompts", "a red circle",
                     "--class-prompts", "a blue square", "--num-class-images", "4", "--prior-loss-weight", "0.5"]) == 0
    chosen = seen["config"]
    assert (chosen.class_prompts, chosen.num_class_images, chosen.prior_loss_weight) == (
        ["a red circle", "a blue square"], 4, 0.5)


# --- generated class images ----------------------------------------------------------------------


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def generate(pipe, folder, count=5, **changes):
    settings = dict(prompts=["a red circle", "a blue square"], count=count, resolution=16, seed=3, steps=3,
                    guidance=5.0, batch_size=2, progress=False)
    settings.update(changes)
    said = []
    prepare_class_images(pipe, folder, say=said.append, **settings)
    return said


def test_generated_class_images_are_cached_with_the_base_models_fingerprint(pipe, tmp_path):
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "class"
    assert generate(pipe, folder) == [f"class images: generated 5 in {folder}"]
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"{i:05d}.{ext}" for i in range(5) for ext in ("png", "txt")] + [FINGERPRINT_FILE]
    assert [(folder / f"{i:05d}.txt").read_text() for i in range(3)] == ["a red circle\n", "a blue square\n",
                                                                         "a red circle\n"]
    recorded = json.loads((folder / FINGERPRINT_FILE).read_text())
    assert recorded["num_class_images"] == 5 and recorded["seed"] == 3 and len(recorded["model"]) == 24
    stamp = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    assert generate(pipe, folder) == [f"class images: reusing the 5 in {folder} (same base model and settings)"]
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamp

    # Image i comes from seed + i alone, so it is the same whichever batch it was generated in.
    generate(pipe, tmp_path / "one-by-one", batch_size=1)
    for i in range(5):
        assert np.abs(pixels(folder / f"{i:05d}.png") - pixels(tmp_path / "one-by-one" / f"{i:05d}.png")).max() <= 2

    said = generate(pipe, folder, count=6)
    assert said[0] == f"class images in {folder} were made with other settings (num_class_images 5 -> 6): " \
                      "generating 6 anew"
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.1)  # another base model: same settings, other weights
    said = generate(pipe, folder, count=6)
    assert said[0].startswith(f"class images in {folder} were made with other settings (model): generating 6 anew")


def test_class_images_follow_their_own_options_not_the_sample_options(tiny_dir, images, tmp_path):
    """Preview settings (sample_steps, sample_guidance) leave the class images as they are; the class
    options decide them and their fingerprint."""
    folder = tmp_path / "class"
    settings = dict(class_prompts=["a blue square"], num_class_images=2, class_data_dir=str(folder),
                    class_sample_steps=2, max_steps=1)

    def make(run: str, **changes) -> tuple[dict, dict]:
        setup_run(config(tiny_dir, images, tmp_path / run, **{**settings, **changes}), quiet=True)
        recorded = json.loads((folder / FINGERPRINT_FILE).read_text())
        return recorded, {path.name: path.read_bytes() for path in folder.glob("*.png")}

    first, first_images = make("first")
    assert (first["class_sample_steps"], first["class_guidance"]) == (2, 7.5)
    stamp = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert make("previews", sample_steps=7, sample_guidance=2.0) == (first, first_images)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == stamp  # reused, not rewritten
    steps, steps_images = make("steps", class_sample_steps=3)
    assert steps["class_sample_steps"] == 3 and steps_images != first_images
    guidance, guidance_images = make("guidance", class_sample_steps=3, class_guidance=2.0)
    assert guidance["class_guidance"] == 2.0 and guidance_images != steps_images


def test_a_fingerprint_written_under_the_old_option_names_is_still_reused(pipe, tmp_path):
    """Before class images had options of their own, the fingerprint named the sample options."""
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "class"
    generate(pipe, folder, count=2)
    recorded = json.loads((folder / FINGERPRINT_FILE).read_text())
    old = {("sample_steps" if key == "class_sample_steps" else "sample_guidance" if key == "class_guidance" else key):
           value for key, value in recorded.items()}
    assert old.keys() != recorded.keys()
    (folder / FINGERPRINT_FILE).write_text(json.dumps(old))
    assert generate(pipe, folder, count=2) == [f"class images: reusing the 2 in {folder} (same base model and "
                                               "settings)"]
    assert generate(pipe, folder, count=2, steps=4)[0].startswith(
        f"class images in {folder} were made with other settings (class_sample_steps 3 -> 4)")


def test_a_kill_during_generation_leaves_no_cache_that_is_taken_as_complete(tiny_dir, images, tmp_path):
    out = tmp_path / "out"
    options = dict(class_prompts="a blue square", num_class_images=6, class_sample_steps=3, max_steps=1)
    environment = {**os.environ, "SDLORA_TEST_FAULT": "kill:write:1:00003.png"}  # halfway through the 4th image
    done = subprocess.run([sys.executable, "-m", "sdlora", *cli_args(tiny_dir, images, out, **options)],
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    folder = out / "class-images"
    assert not (folder / FINGERPRINT_FILE).exists() and (folder / PENDING_FILE).exists()
    kept = {i: (folder / f"{i:05d}.png").read_bytes() for i in range(3)}

    run = setup_run(config(tiny_dir, images, out, class_prompts=["a blue square"], num_class_images=6,
                             class_sample_steps=3, max_steps=1), quiet=True)
    assert len(run.class_images.dataset) == 6 and (folder / FINGERPRINT_FILE).exists()
    assert not (folder / PENDING_FILE).exists() and not list(folder.glob(".*sdlora-tmp"))
    assert all((folder / f"{i:05d}.png").read_bytes() == content for i, content in kept.items())  # finished ones kept


# --- the loss and the batches --------------------------------------------------------------------


def test_the_loss_is_the_instance_loss_plus_the_weighted_class_loss(tiny_dir, images, class_images, tmp_path):
    run = setup_run(config(tiny_dir, images, tmp_path, reg_data=str(class_images), caption_prefix="zkz",
                             flip=0.5), quiet=True)
    indices, prior = [0, 3, 5, 6], ClassBatch(2, [1, 4, 0])

    def loss(weight: float, with_prior: bool = True) -> torch.Tensor:
        run.prior_loss_weight = weight
        with torch.no_grad():
            return run.micro_batch_loss(1, indices, step_generator(7, 5), prior=prior if with_prior else None)

    # The class half, recomputed from its parts: its cached latents, its captions (no prefix), the same
    # generator after the instance half has drawn.
    generator = step_generator(7, 5)
    with torch.no_grad():
        instance = run.micro_batch_loss(1, indices, generator)
        dataset = run.class_images.dataset
        captions = [dataset.caption(i, 2) for i in prior.indices]
        assert captions == [class_images.joinpath(f"{i}.txt").read_text() for i in prior.indices]
        pairs = [run.class_images.cache.entries[i, dataset.flipped(i, 2)] for i in prior.indices]
        latents = sample_latents(run.model.vae.config, torch.stack([m for m, _ in pairs]),
                                 torch.stack([s for _, s in pairs]), generator)
        inputs = {"encoder_hidden_states": run.model.encode_text(captions).hidden}
        class_loss = diffusion_loss(run.model.unet, run.scheduler, latents, inputs, generator,
                                    prediction_type="epsilon")
    assert class_loss > 0.01  # not trivially zero
    torch.testing.assert_close(loss(0.0), instance)
    torch.testing.assert_close(loss(0.0, with_prior=False), instance)  # the instance half draws as without it
    for weight in (1.0, 2.5):
        torch.testing.assert_close(loss(weight), instance + weight * class_loss)


def test_each_step_gets_the_class_batch_of_its_number_split_over_its_micro_batches(tiny_dir, images, class_images,
                                                                                   tmp_path):
    settings = dict(max_steps=5, gradient_accumulation=2, batch_size=4, caption_prefix="zkz", shuffle_tags=True)
    seen, plain = [], []
    for calls, extra in ((seen, {"reg_data": str(class_images)}), (plain, {})):
        run = setup_run(config(tiny_dir, images, tmp_path / str(len(extra)), **settings, **extra), quiet=True)
        real = run.micro_batch_loss

        def record(epoch, indices, generator, *args, calls=calls, real=real, **kwargs):
            calls.append((epoch, list(indices), kwargs.get("prior")))
            return real(epoch, indices, generator, *args, **kwargs)

        run.micro_batch_loss = record
        run_training(run)
    assert [(e, i) for e, i, _ in seen] == [(e, i) for e, i, _ in plain]  # the instance batches are unchanged
    assert all(prior is None for _, _, prior in plain)
    # Six class images, global batches of eight (4 x 2 micro-batches): one batch of six per class epoch, in
    # an order of (seed, epoch); step n takes class batch n, its first micro-batch rows 0-3, the second 4-5.
    order = BucketBatchSampler([(16, 16)] * 6, 8, seed="7:class")
    expected = [(n, order.batches(n)[0][rows]) for n in range(5) for rows in (slice(0, 4), slice(4, 6))]
    assert [(prior.epoch, prior.indices) for _, _, prior in seen] == expected
    assert sorted(i for _, batch in expected[:2] for i in batch) == list(range(6))  # each once per class epoch
    assert len({tuple(batch) for _, batch in expected}) > 2  # and reshuffled between class epochs


def test_cached_and_uncached_class_images_give_the_same_adapter(tiny_dir, images, class_images, tmp_path):
    """Without cached latents the class images come through their own DataLoader (with workers here)."""
    settings = dict(max_steps=4, reg_data=str(class_images), flip=0.5)
    cached = train(config(tiny_dir, images, tmp_path / "cached", **settings), quiet=True)
    uncached = train(config(tiny_dir, images, tmp_path / "uncached", cache_latents=False, cache_text=False,
                            num_workers=1, **settings), quiet=True)
    assert_adapters_close(cached, uncached, atol=1e-5)


def test_class_batch_keys_start_anywhere_and_stride_over_processes():
    sampler = BucketBatchSampler([(16, 16)] * 5 + [(8, 32)] * 3, 2, seed=1)
    per_epoch = len(sampler.batches(0))
    every = [(n // per_epoch, sampler.batches(n // per_epoch)[n % per_epoch]) for n in range(40)]
    keys = class_batch_keys(sampler, 3, 2)
    assert [next(keys) for _ in range(10)] == every[3:23:2]


# --- resuming ------------------------------------------------------------------------------------


def test_a_killed_prior_preservation_run_resumes_to_the_same_adapter(tiny_dir, images, tmp_path):
    settings = dict(max_steps=20, save_every=5, keep_checkpoints=2, flip=0.5, shuffle_tags=True,
                    gradient_accumulation=2, lr_scheduler="cosine", warmup_steps=3, caption_prefix="zkz",
                    class_prompts="a blue square", num_class_images=6, class_sample_steps=3, prior_loss_weight=0.7)
    as_config = {**settings, "class_prompts": [settings["class_prompts"]]}
    reference = train(config(tiny_dir, images, tmp_path / "reference", **as_config), quiet=True)

    out = tmp_path / "killed"
    environment = {**os.environ, "SDLORA_TEST_FAULT": "kill:step:12"}
    done = subprocess.run([sys.executable, "-m", "sdlora", *cli_args(tiny_dir, images, out, **settings)],
                          env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (out / "lora.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    resumed = train(config(tiny_dir, images, out, resume="latest", **as_config), quiet=True)
    assert_adapters_close(resumed, reference, atol=1e-5)
    unweighted = train(config(tiny_dir, images, tmp_path / "weight-1", **{**as_config, "prior_loss_weight": 1.0}),
                       quiet=True)
    with pytest.raises(AssertionError):  # the weight acts: the check above is not trivially true
        assert_adapters_close(unweighted, reference, atol=1e-5)


# --- the toy model: the star leaks less ----------------------------------------------------------


def test_prior_preservation_lowers_the_star_leak_on_the_toy_model(tmp_path):
    """A short, fast character run (the shipped config with a higher learning rate, so the star leaks
    within 120 steps), with and without class images generated by the base model for the ordinary
    prompts, from the same seeds. Measured: leak 11/48 -> 0/48, star on the trigger 22/24 -> 15/24."""
    from sdlora import loader
    from sdlora.toy.eval import content_prompts, generate, load_toy_pipeline, trigger_prompts
    from sdlora.toy.world import score

    model, data = ROOT / "models" / "toy-sd1", ROOT / "datasets" / "character-star"
    prompts = tmp_path / "class.txt"
    prompts.write_text("\n".join(content_prompts()) + "\n")
    fast = {"model": str(model), "data": str(data), "max_steps": 120, "batch_size": 8, "lr": 4e-3,
            "text_encoder_lr": 2e-3}
    # The shipped config has prior preservation on: "plain" turns it off, "prior" sets this test's own.
    plain = {"class_prompts": None, "num_class_images": None, "prior_loss_weight": None}
    prior = {"class_prompts": [str(prompts)], "num_class_images": 24, "prior_loss_weight": 1.0}
    rates = {}
    for name, options in (("plain", plain), ("prior", prior)):
        settings = build({"output_dir": str(tmp_path / name), **fast, **options}, data / "train.toml")
        pipe = load_toy_pipeline(model)
        loader.load(pipe, train(settings, quiet=True), name="character")
        leak = [score(image).star for image in generate(pipe, content_prompts(), 4, steps=15)]
        star = [score(image).star for image in generate(pipe, trigger_prompts(), 6, steps=15)]
        rates[name] = (sum(leak) / len(leak), sum(star) / len(star))
    (plain_leak, plain_star), (prior_leak, prior_star) = rates["plain"], rates["prior"]
    assert plain_leak >= 6 / 48 and prior_leak <= plain_leak / 3, rates  # the leak, at least three times lower
    assert plain_star >= 0.75 and prior_star >= 0.4, rates  # while the trigger still draws the star
