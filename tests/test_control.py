"""Steering a run through files (sdlora/training/control.py): requests in, events out, and what the loop
does with them: stop (and resume exactly), save, sample, and the events of a run that fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from sdlora import cli
from sdlora.errors import TrainingStopped
from sdlora.reliability.runlock import LOCK_FILE
from sdlora.training import control
from sdlora.training.control import read_events, record_event, request, take_requests
from sdlora.training.loop import TrainingDiverged, run_training, setup_run, train
from test_reliability import check_every_file, cli_args
from test_train import assert_adapters_close, config


def request_at(monkeypatch, root, action: str, step: int) -> None:
    """Place a real request file just before the loop looks for requests after `step` (it looks after
    every step of a one-process run, so its n-th look follows step n)."""
    real_take, looks = control.take_requests, []

    def take(folder):
        looks.append(1)
        if len(looks) == step:
            request(root, action)
        return real_take(folder)

    monkeypatch.setattr(control, "take_requests", take)


def events(out) -> list[tuple]:
    """The run's events without their times: (event, step)."""
    return [(e["event"], e["step"]) for e in read_events(out / "logs")]


def step_records_only(out) -> bool:
    return all("step" in r and ("loss" in r or "val_loss" in r) for r in map(json.loads, (
        out / "logs" / "metrics.jsonl").read_text().splitlines()))


# ---------------------------------------------------------------- the contract's files


def test_requests_are_taken_oldest_first_and_once(tmp_path):
    folder = tmp_path / control.CONTROL_FOLDER
    assert take_requests(tmp_path) == [] and not folder.exists()  # nothing is made by looking
    first = request(tmp_path, "sample")
    second = request(tmp_path, "stop")
    assert first.parent == folder and first.name.endswith("-sample.request") and second.name.endswith("-stop.request")
    # Older stamps with fewer digits: the order is the stamp's number, not the name's letters
    (folder / "999-save.request").write_bytes(b"")
    (folder / "1000-stop.request").write_bytes(b"")
    (folder / "998-dance.request").write_bytes(b"")  # an action this trainer does not know
    (folder / "997-save.request.partial").write_bytes(b"")  # another writer's temporary
    (folder / ".5-save.request.42.sdlora-tmp").write_bytes(b"")
    assert take_requests(tmp_path) == ["save", "stop", "sample", "stop"]
    assert sorted(p.name for p in folder.iterdir()) == [".5-save.request.42.sdlora-tmp", "997-save.request.partial"]
    assert take_requests(tmp_path) == []


def test_an_unknown_action_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown action 'pause': give one of stop, save, sample"):
        request(tmp_path, "pause")
    assert not (tmp_path / control.CONTROL_FOLDER).exists()


def test_events_are_lines_and_a_half_written_one_is_skipped(tmp_path):
    record_event(tmp_path, {"event": "started", "step": 0})
    record_event(tmp_path, {"event": "checkpoint", "step": 3, "time": 12.5})
    path = tmp_path / control.EVENTS_FILE
    with path.open("a") as file:
        file.write('{"event": "finished", "st')  # a kill halfway through a line
    assert [e["event"] for e in read_events(tmp_path)] == ["started", "checkpoint"]
    first, second = read_events(tmp_path)
    assert isinstance(first["time"], float) and second["time"] == 12.5  # stamped unless it has a time
    record_event(tmp_path, {"event": "started", "step": 3})  # the resumed run appends after the cut line
    assert [e["event"] for e in read_events(tmp_path)] == ["started", "checkpoint", "started"]
    assert len(path.read_text().splitlines()) == 4  # the cut line kept apart, not glued to the next
    assert read_events(tmp_path / "nowhere") == []


# ---------------------------------------------------------------- the loop


def test_a_stop_request_checkpoints_ends_the_run_and_resume_finishes_it_exactly(tiny_dir, images, tmp_path):
    out = tmp_path / "stopped"
    request(out, "stop")  # before the run starts: taken after step 1
    with pytest.raises(TrainingStopped) as stopped:
        train(config(tiny_dir, images, out, max_steps=4), quiet=True)
    assert str(stopped.value) == ("stopped at step 1 on request; the checkpoint is "
                                  f"{out / 'checkpoints' / 'step-000001'}: continue with --resume latest")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert not (out / "lora.safetensors").exists() and not (out / LOCK_FILE).exists()
    assert events(out) == [("started", 0), ("checkpoint", 1), ("stopped", 1)]
    assert read_events(out / "logs")[-1]["reason"] == "requested"
    assert check_every_file(out) == []

    resumed = train(config(tiny_dir, images, out, max_steps=4, resume="latest"), quiet=True)
    uninterrupted = train(config(tiny_dir, images, tmp_path / "uninterrupted", max_steps=4), quiet=True)
    assert_adapters_close(resumed, uninterrupted, atol=1e-6)
    assert events(out) == [("started", 0), ("checkpoint", 1), ("stopped", 1), ("started", 1), ("finished", 4)]
    started, finished = read_events(out / "logs")[3], read_events(out / "logs")[4]
    assert started["total_steps"] == 4 and isinstance(started["pid"], int) and finished["adapter"] == "lora.safetensors"
    assert step_records_only(out)  # events never go into the metrics


def test_a_save_request_writes_a_checkpoint_at_its_step_once(tiny_dir, images, tmp_path, monkeypatch):
    request_at(monkeypatch, tmp_path, "save", step=2)
    train(config(tiny_dir, images, tmp_path, max_steps=3, save_every=2, keep_checkpoints=5), quiet=True)
    assert events(tmp_path) == [("started", 0), ("checkpoint", 2), ("finished", 3)]  # step 2's own, not twice
    monkeypatch.undo()

    out = tmp_path / "unscheduled"
    request_at(monkeypatch, out, "save", step=2)
    train(config(tiny_dir, images, out, max_steps=3), quiet=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert events(out) == [("started", 0), ("checkpoint", 2), ("finished", 3)]
    assert (out / "lora.safetensors").is_file()  # the run went on to its end


def test_a_sample_request_writes_the_sheet_of_its_step_or_is_refused(tiny_dir, images, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "prompts"
    request_at(monkeypatch, out, "sample", step=2)
    train(config(tiny_dir, images, out, max_steps=3, sample_prompts=str(prompts), sample_steps=2), quiet=True)
    sheets = sorted(p.name for p in (out / "samples").iterdir())
    assert sheets == ["step-000002.png", "step-000003.png"]  # the requested one, and the end's
    assert Image.open(out / "samples" / "step-000002.png").size == (16, 16)
    monkeypatch.undo()

    out = tmp_path / "no-prompts"
    request_at(monkeypatch, out, "sample", step=2)
    train(config(tiny_dir, images, out, max_steps=3), quiet=True)
    assert not (out / "samples").exists()
    refused = read_events(out / "logs")[1]
    assert {k: v for k, v in refused.items() if k != "time"} == {
        "event": "refused", "action": "sample", "step": 2, "message": "no sample prompts configured"}
    assert events(out)[-1] == ("finished", 3)


def test_a_run_that_diverges_records_why_it_failed(tiny_dir, images, tmp_path, monkeypatch):
    monkeypatch.setenv("SDLORA_TEST_FAULT", "nan:3")
    run = setup_run(config(tiny_dir, images, tmp_path, max_steps=5), quiet=True)
    with pytest.raises(TrainingDiverged) as diverged:
        run_training(run)
    failed = read_events(tmp_path / "logs")[-1]
    assert (failed["event"], failed["step"]) == ("failed", 2)  # two steps were done; the third's loss was NaN
    assert failed["message"] == str(diverged.value) and failed["message"].startswith("the loss became nan at step 3;")
    assert step_records_only(tmp_path)


def test_the_command_exits_3_on_a_stop_request(tiny_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    request(out, "stop")
    assert cli.main(cli_args(tiny_dir, images, out, max_steps=3)) == 3
    assert capsys.readouterr().err == (f"sdlora: stopped at step 1 on request; the checkpoint is "
                                       f"{out / 'checkpoints' / 'step-000001'}: continue with --resume latest\n")
    assert cli.main(cli_args(tiny_dir, images, out, max_steps=3, resume="latest")) == 0
    assert events(out)[-1] == ("finished", 3)


def test_two_processes_stop_together_on_a_logged_step(tiny_dir, images, tmp_path):
    """torchrun with two CPU processes: the main one takes the request on a logged step and broadcasts
    it, so both stop after the same step (a rank left behind would hang in the next all-reduce)."""
    out = tmp_path / "ddp"
    request(out, "stop")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "sdlora", "train",
               "--quiet", "--model", str(tiny_dir), "--data", str(images), "--output-dir", str(out),
               "--resolution", "16", "--batch-size", "2", "--max-steps", "6", "--log-every", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    # torchrun reports any child's error status as its own 1; each process exited 3 with the message
    assert result.returncode != 0 and not (out / "lora.safetensors").exists()
    message = (f"sdlora: stopped at step 2 on request; the checkpoint is {out / 'checkpoints' / 'step-000002'}: "
               "continue with --resume latest\n")
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert events(out) == [("started", 0), ("checkpoint", 2), ("stopped", 2)]  # step 1 is not logged: not looked at
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
