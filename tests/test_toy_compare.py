"""`sdlora toy eval --config C --change KEY=VALUE`: two runs from the same seed, scored side by side."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdlora.errors import ConfigError
from sdlora.toy import compare

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("text,expected", [
    ("prior_loss_weight=1.0", ("prior_loss_weight", 1.0)),
    ("--max-steps=20", ("max_steps", 20)),
    ("train_text_encoder=false", ("train_text_encoder", False)),
    ("targets=attn-mlp", ("targets", "attn-mlp")),
    ('targets="convs"', ("targets", "convs")),
])
def test_changes_are_read_as_toml_values(text, expected):
    assert compare.parse_change(text) == expected


def test_a_change_without_a_value_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        compare.parse_change("rank")


def test_two_runs_are_trained_scored_side_by_side_and_reused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the shipped config's paths are relative to the repository
    config = ROOT / "datasets" / "style-outline" / "train.toml"
    # The baseline with the same two changes, so both runs are quick; the compared change is the rank.
    base_config = tmp_path / "base.toml"
    text, steps = re.subn(r"(?m)^max_steps = \d+$", "max_steps = 2", config.read_text())
    text, batches = re.subn(r"(?m)^batch_size = \d+$", "batch_size = 2", text)
    assert (steps, batches) == (1, 1)  # the shipped config changed: keep this run short on purpose
    base_config.write_text(text)
    text = compare.compare(base_config, ["rank=4"], tmp_path / "out", per_prompt=1, seeds=[0, 7],
                           trigger="zkz", stack_with=None, steps=2, quiet=True)
    lines = text.splitlines()
    assert "| | baseline | rank = 4 |" in lines
    leak = next(line for line in lines if line.startswith("| star leak"))
    assert leak.count("/") == 2  # one rate per seed set, for each run
    runs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[0].startswith("baseline-") and runs[1].startswith("changed-")
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*.safetensors")}
    again = compare.compare(base_config, ["rank=4"], tmp_path / "out", per_prompt=1, seeds=[0, 7], trigger="zkz",
                            stack_with=None, steps=2, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*.safetensors")} == stamps  # reused
    assert again.splitlines()[:-3] == lines[:-3]  # the same adapters score the same
    assert (tmp_path / "out" / "grid-changed.png").is_file()


def test_a_bad_change_fails_before_anything_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = ROOT / "datasets" / "style-outline" / "train.toml"
    with pytest.raises(ConfigError, match="flip"):
        compare.compare(config, ["flip=2.0"], tmp_path / "out", 1, [0], None, None)
    assert not any((tmp_path / "out").glob("*/*.safetensors"))
