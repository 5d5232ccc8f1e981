"""Step windows: an adapter on for a part of the denoising steps only (sdlora.step_windows, generate's @START-STOP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import sdlora
from sdlora.cli import main, parse_lora
from sdlora.errors import ConfigError

from conftest import make_adapter_file

PROMPT = "a red circle"
STEPS = 4


def draw(pipe, callback=None, seed=3) -> np.ndarray:
    image = pipe(prompt=PROMPT, height=16, width=16, num_inference_steps=STEPS, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback).images[0]
    return np.asarray(image)


@pytest.fixture
def adapted(pipe, tmp_path):
    """The tiny pipeline with one adapter "a" loaded at strength 0.9 on attention and MLP, and its base image."""
    pipe.set_progress_bar_config(disable=True)
    base = draw(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, targets="attn-mlp", seed=1)
    sdlora.load(pipe, path, strength=0.9, name="a")
    return pipe, base


def test_a_window_over_every_step_is_the_plain_adapter_and_an_empty_one_the_base_model(adapted):
    pipe, base = adapted
    plain = draw(pipe)
    assert not np.array_equal(plain, base)  # the adapter shows, so both checks below can fail
    with sdlora.step_windows(pipe, {"a": (0, 1)}) as callback:
        assert np.array_equal(draw(pipe, callback), plain)
    with sdlora.step_windows(pipe, {"a": (0, 0)}) as callback:
        assert np.array_equal(draw(pipe, callback), base)
    with sdlora.step_windows(pipe, {"a": (1, 1)}) as callback:
        assert np.array_equal(draw(pipe, callback), base)


@pytest.mark.parametrize("window, on_steps", [((0.5, 1), {2, 3}), ((0, 0.5), {0, 1}), ((0.25, 0.75), {1, 2})])
def test_a_window_switches_at_its_steps_as_a_callback_written_out_would(adapted, window, on_steps):
    """The reference sets the whole adapter's strength by hand before each step (set_strength)."""
    pipe, base = adapted
    plain = draw(pipe)

    def by_hand(pipe_, step, timestep, callback_kwargs):
        sdlora.set_strength(pipe_, "a", 0.9 if step + 1 in on_steps else 0.0)
        return callback_kwargs

    sdlora.set_strength(pipe, "a", 0.9 if 0 in on_steps else 0.0)
    expected = draw(pipe, by_hand)
    sdlora.set_strength(pipe, "a", 0.9)
    with sdlora.step_windows(pipe, {"a": window}) as callback:
        found = draw(pipe, callback)
        again = draw(pipe, callback)  # a second call in the same block starts from step 0 again
    assert np.array_equal(found, expected)
    assert np.array_equal(again, expected)
    assert not np.array_equal(found, plain) and not np.array_equal(found, base)


def test_the_strengths_are_restored_after_the_block_per_block_ones_too(adapted):
    pipe, _ = adapted
    per_block = {"unet": {"down": 0.3, "mid": 0.6, "up": 1.2}, "text_encoder": 0.5}
    sdlora.set_strength(pipe, "a", per_block)
    before = draw(pipe)
    with sdlora.step_windows(pipe, {"a": (0.5, 1)}) as callback:
        draw(pipe, callback)
    assert np.array_equal(draw(pipe), before)
    with pytest.raises(KeyError), sdlora.step_windows(pipe, {"a": (0, 0)}):
        raise KeyError("a failure inside the block")
    assert np.array_equal(draw(pipe), before)


def test_a_bad_window_an_unknown_or_a_fused_adapter_is_refused_before_anything_changes(adapted):
    pipe, _ = adapted
    plain = draw(pipe)
    for window in [(0.6, 0.2), (-0.1, 1), (0, 1.5), (0.5,), "all"]:
        with pytest.raises(ValueError, match="step window for adapter 'a'"):
            with sdlora.step_windows(pipe, {"a": window}):
                pass
    with pytest.raises(Exception, match="b"):
        with sdlora.step_windows(pipe, {"b": (0, 1)}):
            pass
    sdlora.fuse(pipe)
    with pytest.raises(RuntimeError, match="fused"):
        with sdlora.step_windows(pipe, {"a": (0, 1)}):
            pass
    sdlora.unfuse(pipe)
    assert np.array_equal(draw(pipe), plain)


def test_generate_reads_a_window_after_at():
    assert parse_lora("style.safetensors:0.8@0.4-1") == (parse_lora("style.safetensors")[0], 0.8, (0.4, 1.0))
    assert parse_lora("style.safetensors@0-0.5")[1:] == (1.0, (0.0, 0.5))
    assert parse_lora("C:/adapters/st@r.safetensors:0.5")[1:] == (0.5, None)  # an @ that is not a window
    for bad in ["a.safetensors@0.6-0.2", "a.safetensors@0-2", "a.safetensors@0.1.2-1"]:
        with pytest.raises(ConfigError, match="step window|START-STOP"):
            parse_lora(bad)


def test_generate_with_a_window_draws_what_the_api_draws(adapted, tiny_dir, tmp_path, capsys):
    pipe, _ = adapted
    path = tmp_path / "a.safetensors"
    sdlora.set_strength(pipe, "a", 0.7)
    with sdlora.step_windows(pipe, {"a": (0.5, 1)}) as callback:
        expected = draw(pipe, callback, seed=5)
    out = tmp_path / "windowed.png"
    code = main(["generate", "--model", str(tiny_dir), "--lora", f"{path}:0.7@0.5-1", "--prompt", PROMPT,
                 "--steps", str(STEPS), "--seed", "5", "-o", str(out)])
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)

    capsys.readouterr()
    code = main(["generate", "--model", str(tiny_dir), "--lora", f"{path}@0-0.5", "--fuse", "--prompt", PROMPT,
                 "-o", str(tmp_path / "fused.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--fuse" in err
    assert not (tmp_path / "fused.png").exists()


def test_toy_eval_scores_a_windowed_adapter_with_the_window_applied(adapted):
    from sdlora.toy import eval as toy_eval

    pipe, _ = adapted
    sets = {"content": ["a red circle"]}

    def pixels(evaluation):
        return [np.asarray(image) for image in evaluation.images["content", 1.0]]

    plain = pixels(toy_eval.evaluate(pipe, ["a"], (1.0,), 1, sets, steps=STEPS))
    off = toy_eval.evaluate(pipe, ["a"], (0.0,), 1, sets, steps=STEPS).images["content", 0.0]
    empty = pixels(toy_eval.evaluate(pipe, ["a"], (1.0,), 1, sets, steps=STEPS, windows={"a": (0, 0)}))
    late = pixels(toy_eval.evaluate(pipe, ["a"], (1.0,), 1, sets, steps=STEPS, windows={"a": (0.5, 1)}))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(empty, off))
    assert not any(np.array_equal(a, b) for a, b in zip(plain, empty))
    assert not any(np.array_equal(a, b) for a, b in zip(late, plain))
    assert sdlora.list_adapters(pipe)[0].strength == 1.0  # evaluate's last strength, restored after the window
