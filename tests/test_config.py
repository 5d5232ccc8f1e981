"""The training config: TOML < command line precedence, named errors, and failing fast without a model."""

from __future__ import annotations

import re
import time

import pytest

from sdlora import cli
from sdlora.training.config import ConfigError, TrainConfig, build, read_toml, to_toml, validate


def test_defaults_file_flags_precedence(tmp_path):
    toml = tmp_path / "train.toml"
    toml.write_text('rank = 8\nlr = 3e-4\nmax-steps = 50\ntargets = "attn-mlp"\n')
    config = build({"rank": 32}, toml)
    assert config.rank == 32  # the flag beats the file
    assert config.lr == 3e-4 and config.max_steps == 50 and config.targets == "attn-mlp"  # the file beats defaults
    assert config.batch_size == TrainConfig().batch_size  # defaults fill the rest


def test_cli_flags_reach_the_config(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("sdlora.training.loop.train", lambda config, quiet: seen.update(config=config))
    toml = tmp_path / "train.toml"
    toml.write_text("rank = 8\nflip = 0.5\n")
    code = cli.main(["train", "--config", str(toml), "--model", "m/x", "--data", "d", "--output-dir", "o",
                     "--rank", "4", "--no-buckets", "--train-text-encoder", "--lr", "1e-3"])
    assert code == 0
    config = seen["config"]
    assert (config.rank, config.flip, config.buckets, config.train_text_encoder, config.lr) == (4, 0.5, False, True,
                                                                                                1e-3)


@pytest.mark.parametrize("content, message", [
    ("rnak = 8", "unknown key 'rnak'; did you mean 'rank'"),
    ('rank = "eight"', "rank must be int"),
    ("lr = true", "lr must be float"),
    ("train_text_encoder = 1", "train_text_encoder must be bool"),
    ("rank = ", "not valid TOML"),
])
def test_toml_errors_name_the_key(tmp_path, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        read_toml(toml)
    assert str(toml) in str(error.value)


def test_int_is_accepted_for_float_and_toml_round_trips(tmp_path):
    config = build({}, None)
    config.lr, config.caption_prefix = 1, 'sks "quoted" \\ style'
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(config))
    assert build({}, path) == TrainConfig(**{**config.__dict__, "lr": 1.0})


def valid(tmp_path, **overrides) -> TrainConfig:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True, exist_ok=True)
    (model / "model_index.json").write_text("{}")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    values = dict(model=str(model), data=str(data), output_dir=str(tmp_path / "out"))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("overrides, message", [
    ({"model": "/no/such/model"}, "does not exist: give a diffusers folder, a checkpoint file"),
    ({"data": "/no/such/data"}, "data folder /no/such/data does not exist"),
    ({"max_steps": 5, "epochs": 2}, "not both"),
    ({"rank": 0}, "rank must be at least 1"),
    ({"resolution": 500}, "multiple of 8"),
    ({"random_crop": True}, "cannot be cached"),
    ({"sample_every": 10}, "needs --sample-prompts"),
    ({"text_encoder_lr": 1e-5}, "text encoder is not trained"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"caption_dropout": 1.5}, "probability"),
    ({"timestep_min": 900, "timestep_max": 100}, "timestep_min < timestep_max"),
    ({"preserve_outside_window": True}, "preserve_outside_window needs a timestep window"),
    ({"output_dir": "/proc/sdlora-cannot-write-here"}, "not writable"),
    ({"targets": "attn1.(to_q"}, "or a regular expression over module paths"),
])
def test_incompatible_or_missing_settings(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(valid(tmp_path, **overrides))


def test_a_diffusers_folder_needs_a_model_index(tmp_path):
    config = valid(tmp_path)
    (tmp_path / "model" / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="no model_index.json"):
        validate(config)


@pytest.mark.parametrize("name, config_folder, message", [
    ("model.bin", None, "not a checkpoint sdlora reads"),
    ("model.safetensors", "missing", "model config folder .* does not exist"),
])
def test_a_model_file_is_checked_before_loading(tmp_path, name, config_folder, message):
    (tmp_path / name).write_bytes(b"x")
    config = valid(tmp_path, model=str(tmp_path / name),
                   model_config=str(tmp_path / config_folder) if config_folder else None)
    with pytest.raises(ConfigError, match=message):
        validate(config)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/model", "--data", "{data}", "--output-dir", "{out}"], "does not exist: give a diffusers folder"),
    (["--model", "{model}", "--data", "{data}", "--output-dir", "{out}"], "no usable images"),
    (["--data", "{data}", "--output-dir", "{out}"], "--model is required"),
])
def test_cli_fails_fast_with_a_message_and_no_traceback(tmp_path, capsys, args, message):
    config = valid(tmp_path)
    args = [a.format(model=config.model, data=config.data, out=config.output_dir) for a in args]
    started = time.time()
    assert cli.main(["train", *args]) == 2
    assert time.time() - started < 5  # no model was loaded
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("sdlora: error:")


def test_help_documents_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
    assert "LoRA rank (default: 16)" in text and "(required)" in text


@pytest.mark.parametrize("optimizer, package, extra", [("adamw8bit", "bitsandbytes", "sdlora[8bit]"),
                                                        ("prodigy", "prodigyopt", "sdlora[prodigy]")])
def test_optional_optimizer_names_the_extra_to_install(tmp_path, monkeypatch, optimizer, package, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"needs the {package} package: pip install '{re.escape(extra)}'"):
        validate(valid(tmp_path, optimizer=optimizer))


IDLE_OPTIONS = [
    ({"warmup_steps": 10}, "warmup_steps is set but acts only with lr_scheduler constant_with_warmup or cosine or "
     "linear (this run has lr_scheduler constant): set lr_scheduler or drop warmup_steps"),
    ({"keep_tokens": 1}, "keep_tokens is set but acts only with --shuffle-tags or --tag-dropout (this run has "
     "neither): add --shuffle-tags or --tag-dropout P or drop keep_tokens"),
    ({"num_workers": 2}, "num_workers is set but acts only with --no-cache-latents (this run has latents cached, "
     "the default): add --no-cache-latents or drop num_workers"),
]


@pytest.mark.parametrize("overrides, message", IDLE_OPTIONS)
def test_an_option_that_would_be_ignored_is_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(valid(tmp_path, **overrides))
    assert str(error.value) == message


@pytest.mark.parametrize("overrides", [
    {"warmup_steps": 10, "lr_scheduler": "constant_with_warmup"}, {"warmup_steps": 10, "lr_scheduler": "cosine"},
    {"keep_tokens": 1, "shuffle_tags": True}, {"keep_tokens": 1, "tag_dropout": 0.1},
    {"num_workers": 2, "cache_latents": False},
])
def test_the_same_options_pass_where_they_act(tmp_path, overrides):
    validate(valid(tmp_path, **overrides))


@pytest.mark.parametrize("overrides, message", IDLE_OPTIONS)
def test_the_command_line_refuses_an_ignored_option_in_one_line_before_loading(tmp_path, capsys, monkeypatch,
                                                                             overrides, message):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdlora.training.setup.load_pipeline", no_model)
    config = valid(tmp_path)
    flags = [part for key, value in overrides.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    code = cli.main(["train", "--model", config.model, "--data", config.data, "--output-dir", config.output_dir,
                     *flags])
    assert code == 2 and capsys.readouterr().err == f"sdlora: error: {message}\n"
