"""The New-run form: generated from TrainConfig, converted and refused as the command line would."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace

import pytest

from sdlora import cli
from sdlora.studio.forms import config_from_form, config_from_toml, form_fields, form_values
from sdlora.training.config import ConfigError, TrainConfig, add_arguments, to_toml, validate


@pytest.fixture
def required(tmp_path) -> dict[str, str]:
    """The three required values, pointing at a model folder, a data folder and an output folder in tmp_path."""
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    data.mkdir()
    return {"model": str(model), "data": str(data), "output_dir": str(tmp_path / "out")}


def test_every_field_appears_once_with_its_help_default_and_flag():
    entries = form_fields()
    json.dumps(entries)
    assert [entry["name"] for entry in entries] == [f.name for f in fields(TrainConfig)]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    for entry, f in zip(entries, fields(TrainConfig)):
        assert (entry["help"], entry["default"], entry["group"]) == (f.metadata["help"], f.default, f.metadata["group"])
        assert entry["flag"] == flags[f.name]
    by_name = {entry["name"]: entry for entry in entries}
    assert [(by_name[name]["type"], by_name[name]["optional"]) for name in
            ("rank", "alpha", "buckets", "train_text_encoder_2", "targets", "resume", "class_prompts")] == [
        ("int", False), ("float", True), ("bool", False), ("bool", True), ("str", False), ("str", True),
        ("list", True)]
    assert [name for name, entry in by_name.items() if entry["required"]] == ["model", "data", "output_dir"]


def test_choices_come_with_their_field():
    by_name = {entry["name"]: entry for entry in form_fields()}
    assert by_name["mixed_precision"]["choices"] == ["no", "fp16", "bf16"]
    assert by_name["rank"]["choices"] is None


def test_a_bad_rank_is_refused_under_rank_in_the_command_lines_words(required, capsys):
    config, errors = config_from_form({**required, "rank": "0"})
    with pytest.raises(ConfigError) as error:
        validate(TrainConfig(**required, rank=0))
    assert config is None and errors == {"rank": str(error.value)}
    assert cli.main(["train", "--model", required["model"], "--data", required["data"], "--output-dir",
                     required["output_dir"], "--rank", "0"]) == 2
    assert capsys.readouterr().err == f"sdlora: error: {errors['rank']}\n"


@pytest.mark.parametrize("values, key, message", [
    ({"rank": "eight"}, "rank", "form: rank must be int, got 'eight' (str)"),
    ({"buckets": "maybe"}, "buckets", "form: buckets must be bool, got 'maybe' (str)"),
    ({"rnak": "8"}, "", "form: unknown key 'rnak'; did you mean 'rank'?"),
    ({"max_steps": "5", "epochs": "2"}, "max_steps", "give --max-steps or --epochs, not both"),  # the first named
    ({"lr": "-1"}, "", "learning rates must be > 0"),  # names no field
    ({"mixed_precision": "fp8"}, "mixed_precision", "mixed_precision must be one of no, fp16, bf16, got 'fp8'"),
    ({"model": ""}, "model", "--model is required"),  # empty: the default, which is no model
    ({"keep_tokens": "2"}, "keep_tokens", "keep_tokens is set but acts only with --shuffle-tags or --tag-dropout"),
    ({"sample_prompts": "/no/prompts.txt"}, "sample_prompts", "sample prompts file /no/prompts.txt does not exist"),
])
def test_refusals_are_keyed_by_the_field_they_name(required, values, key, message):
    config, errors = config_from_form({**required, **values})
    assert config is None and list(errors) == [key] and errors[key].startswith(message)


def test_empty_values_leave_the_defaults_and_bools_read_as_a_form_sends_them(required):
    blank = {entry["name"]: "" for entry in form_fields()}
    config, errors = config_from_form({**blank, **required})
    assert errors == {} and config == TrainConfig(**required)
    config, errors = config_from_form({**required, "buckets": "false", "dora": "on", "train_text_encoder_2": "off",
                                       "flip": "0.5", "class_prompts": "a dog\r\n\r\na cat\r\n",
                                       "num_class_images": "4"})
    assert errors == {}
    assert (config.buckets, config.dora, config.train_text_encoder_2, config.flip, config.class_prompts) == (
        False, True, False, 0.5, ["a dog", "a cat"])


def test_toml_is_read_as_a_config_file_is(required):
    config, errors = config_from_toml("rnak = 8\n")
    assert config is None and errors == {"": "TOML: unknown key 'rnak'; did you mean 'rank'?"}
    _, errors = config_from_toml('rank = "eight"\n')
    assert errors == {"rank": "TOML: rank must be int, got 'eight' (str)"}
    _, errors = config_from_toml("rank = \n")
    assert list(errors) == [""] and errors[""].startswith("TOML: not valid TOML")
    body = "".join(f"{key} = {json.dumps(value)}\n" for key, value in required.items())
    config, errors = config_from_toml(body + "max-steps = 50\nlr = 3e-4\n")
    assert errors == {} and config == TrainConfig(**required, max_steps=50, lr=3e-4)


def test_a_config_goes_through_the_form_and_back_unchanged(required):
    config = TrainConfig(**required, rank=8, alpha=4.0, lr=3e-4, buckets=False, train_text_encoder=True,
                         train_text_encoder_2=False, text_encoder_lr=1e-5, class_prompts=["a dog", "a photo of a cat"],
                         num_class_images=10, resolution=256, mixed_precision="bf16", caption_prefix="sks, ",
                         max_steps=50, noise_offset=0.05, cache_latents=False, random_crop=True)
    validate(config)
    values = form_values(config)
    json.dumps(values)
    assert config_from_form(values) == (config, {})
    assert config_from_toml(to_toml(config)) == (config, {})  # cloned from a run's config.toml
    default = TrainConfig(**required)
    assert config_from_form(form_values(default)) == (default, {})
    assert config_from_form(form_values(replace(default, clip_skip=2))) == (replace(default, clip_skip=2), {})
