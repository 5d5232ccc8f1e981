"""Whole training runs under faults: kills at the worst moments, a second run, a full disk, a NaN."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sdlora
from sdlora import cli
from sdlora.reliability import durable
from sdlora.reliability.durable import TEMPORARY_SUFFIX
from sdlora.reliability.runlock import LOCK_FILE
from sdlora.training.loop import TrainingDiverged, diverged_message, run_training, setup_run, train
from test_train import assert_adapters_close, config

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
SETTINGS = dict(max_steps=STEPS, save_every=5, keep_checkpoints=2, flip=0.5, shuffle_tags=True,
                lr_scheduler="cosine", warmup_steps=5)


def cli_args(tiny_dir, images, out, **options) -> list[str]:
    """`sdlora train` arguments equal to test_train's config(...) with the same options."""
    values = dict(model=tiny_dir, data=images, output_dir=out, resolution=16, batch_size=4, lr=2e-3, rank=4, seed=7,
                  log_every=1, save_dtype="fp32", max_steps=12)
    values.update(options)
    args = ["train", "--quiet"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def command(tiny_dir, images, out, **options) -> list[str]:
    return [sys.executable, "-m", "sdlora", *cli_args(tiny_dir, images, out, **options)]


def is_temporary(path: Path, root: Path) -> bool:
    return any(part.endswith(TEMPORARY_SUFFIX) for part in path.relative_to(root).parts)


def check_every_file(out: Path) -> list[Path]:
    """Every file a run publishes is complete and valid; returns the temporaries a kill left."""
    temporaries = []
    for path in sorted(out.rglob("*")):
        if is_temporary(path, out):
            temporaries.append(path)
        elif path.is_dir():
            if path.parent.name == "checkpoints":
                assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "state.pt"], path
        elif path.suffix == ".safetensors":
            sdlora.read_adapter(path)  # complete, parsable, finite
        elif path.name == "state.pt":
            assert "optimizer" in torch.load(path, weights_only=True)
        elif path.suffix == ".toml":
            tomllib.loads(path.read_text())
        elif path.suffix == ".jsonl":
            assert all(json.loads(line) for line in path.read_text().splitlines())
        elif path.name == LOCK_FILE:
            json.loads(path.read_text())
        else:
            raise AssertionError(f"unexpected file {path}")
    return temporaries


def fault_plan(seed: int) -> list[tuple[str | None, str]]:
    """(resume from, kill at) for each run: kills at moments chosen at random (seeded).

    Always included: a kill halfway through a checkpoint's file, one between the two renames that
    replace a checkpoint of the same step (reached by resuming from the older of two checkpoints),
    and one halfway through the final adapter. Each run is resumed from where the last one died.
    """
    rng = random.Random(seed)
    middle = [
        ("latest", f"kill:step:{rng.randint(6, 14)}"),
        ("latest", f"kill:write:{rng.randint(1, 2)}:state.pt"),
        ("latest", f"kill:rename:{rng.randint(1, 2)}:adapter.safetensors"),
        ("latest", f"kill:write:{rng.randint(1, 2)}:adapter.safetensors"),
    ]
    rng.shuffle(middle)
    return [(None, f"kill:step:{rng.randint(10, 14)}"), *middle[:2], ("older", "kill:publish:1"), *middle[2:],
            ("latest", "kill:write:1:lora.safetensors")]


def test_kills_at_random_moments_lose_nothing(tiny_dir, images, tmp_path):
    reference = train(config(tiny_dir, images, tmp_path / "reference", **SETTINGS), quiet=True)
    out = tmp_path / "killed"
    for resume, fault in fault_plan(seed=2026):
        folders = sorted((out / "checkpoints").glob("step-*"))
        start = folders[0] if resume == "older" else resume
        environment = {**os.environ, "SDLORA_TEST_FAULT": fault}
        resume = {"resume": start} if start else {}
        done = subprocess.run(command(tiny_dir, images, out, **SETTINGS, **resume), env=environment,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == -signal.SIGKILL, (fault, done.stderr)
        check_every_file(out)
    done = subprocess.run(command(tiny_dir, images, out, **SETTINGS, resume="latest"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert check_every_file(out) == []  # the resumed runs removed what the kills left
    assert_adapters_close(out / "lora.safetensors", reference, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # each step logged once, as in an uninterrupted run
    assert not (out / LOCK_FILE).exists()


def test_a_second_run_on_the_same_folder_refuses_to_start(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(command(tiny_dir, images, out, max_steps=100000),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "logs" / "metrics.jsonl").is_file():  # it holds the lock and trains
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        assert cli.main(cli_args(tiny_dir, images, out)) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and error.startswith(f"sdlora: error: {out} is in use by another sdlora run")
        assert f"pid {first.pid} on host " in error
    finally:
        first.kill()
        first.wait()
    # The first one was killed: the next run takes its lock over and says so.
    done = subprocess.run(command(tiny_dir, images, out, max_steps=2), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"the run that held it (pid {first.pid} on host " in done.stderr and "ended without releasing" in done.stderr


def failing_write(monkeypatch, name: str, occurrence: int, code: int):
    """The `occurrence`-th write of a file called `name` gets half-way, then fails with `code`."""
    real = durable._write_all
    seen = []

    def write(descriptor, data, file_name):
        if file_name == name:
            seen.append(1)
            if len(seen) == occurrence:
                os.write(descriptor, bytes(data[: len(data) // 2]))
                raise OSError(code, os.strerror(code))
        real(descriptor, data, file_name)

    monkeypatch.setattr(durable, "_write_all", write)


@pytest.mark.parametrize("name, occurrence, code, hint", [
    ("state.pt", 1, errno.ENOSPC, "the disk is full"),  # inside the first new checkpoint
    ("lora.safetensors", 1, errno.ENOSPC, "the disk is full"),  # inside the final adapter
    ("adapter.safetensors", 2, errno.EROFS, "read-only file system"),  # the second new checkpoint
])
def test_a_failed_write_stops_the_run_and_keeps_what_was_written(tiny_dir, images, tmp_path, monkeypatch, capsys,
                                                                   name, occurrence, code, hint):
    out = tmp_path / "out"
    earlier = train(config(tiny_dir, images, out, max_steps=6, save_every=3), quiet=True)
    earlier_bytes = earlier.read_bytes()
    failing_write(monkeypatch, name, occurrence, code)
    args = cli_args(tiny_dir, images, out, max_steps=12, save_every=3, resume="latest")
    assert cli.main(args) == 1  # resumed at step 6 towards 12, and the disk fails on the way
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("sdlora: training stopped: could not write ")
    assert hint in error and "--resume latest" in error
    assert earlier.read_bytes() == earlier_bytes  # the adapter from before is untouched
    assert check_every_file(out) == []  # no temporary left; every checkpoint complete and loadable
    monkeypatch.undo()
    resumed = train(config(tiny_dir, images, out, max_steps=12, save_every=3, resume="latest"), quiet=True)
    uninterrupted = train(config(tiny_dir, images, tmp_path / "uninterrupted", max_steps=12), quiet=True)
    assert_adapters_close(resumed, uninterrupted, atol=1e-5)


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tiny_dir, images, tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("SDLORA_TEST_FAULT", "nan:5")
    assert cli.main(cli_args(tiny_dir, images, out, max_steps=9, save_every=3)) == 1
    error = capsys.readouterr().err
    assert error.startswith("sdlora: training stopped: the loss became nan at step 5;") and error.count("\n") == 1
    assert "--mixed-precision bf16" not in error  # the run was fp32: no precision advice
    assert check_every_file(out) == [] and not (out / "lora.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]


def test_the_nan_message_suggests_bf16_only_for_fp16():
    assert "--mixed-precision bf16" in diverged_message("the loss became nan", 7, "fp16")
    assert "--mixed-precision bf16" not in diverged_message("the loss became nan", 7, "bf16")
    assert diverged_message("the loss became inf", 7, "no").startswith("the loss became inf at step 7;")


def test_nan_weights_are_never_saved(tiny_dir, images, tmp_path):
    """An update that breaks the weights but not yet the loss (an fp16 overflow, say) stops the run
    before the checkpoint of that step is written."""
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=9, save_every=3), quiet=True)
    real_step, steps = run.optim.optimizer.step, []

    def breaking_step(*args, **kwargs):
        real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 6:  # after the update of step 6, before its checkpoint
            with torch.no_grad():
                run.optim.parameters[0].view(-1)[0] = float("inf")

    run.optim.optimizer.step = breaking_step
    with pytest.raises(TrainingDiverged, match="the adapter's weights became NaN or infinite at step 6;"):
        run_training(run)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]
    assert check_every_file(tmp_path) == []


def test_a_fresh_run_never_mixes_with_an_earlier_runs_checkpoints(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    train(config(tiny_dir, images, out, max_steps=6, save_every=3), quiet=True)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert cli.main(cli_args(tiny_dir, images, out, max_steps=6, save_every=3)) == 2  # no --resume
    error = capsys.readouterr().err
    assert error == (f"sdlora: error: {out / 'checkpoints'} holds checkpoints of an earlier run (newest step-000006): "
                     "continue it with --resume latest, or choose another --output-dir\n")
    assert all(path.read_bytes() == content for path, content in before.items())


def test_a_fresh_run_never_overwrites_a_finished_runs_adapter(tiny_dir, images, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    earlier = train(config(tiny_dir, images, out, max_steps=2), quiet=True)  # finished: no checkpoint is left
    assert not (out / "checkpoints").exists()
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    capsys.readouterr()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdlora.training.setup.load_pipeline", no_model)
    assert cli.main(cli_args(tiny_dir, images, out, max_steps=3)) == 2
    assert capsys.readouterr().err == (f"sdlora: error: {earlier} holds the adapter of an earlier run: choose another "
                                       "--output-dir or --name, or move that file away\n")
    assert all(path.read_bytes() == content for path, content in before.items())
