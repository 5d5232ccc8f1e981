"""The studio as its own process: killing it (SIGKILL) while a run trains changes nothing for the run, and
a restarted studio tells the same story from the files: the queue and every status as before."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from studio_process import StudioProcess, end_runs, tiny_run_toml, wait_for

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette", reason="the studio extra: pip install 'sdlora[studio]'")

from sdlora.studio.app import NICENESS  # noqa: E402


def wait_for_studio(predicate, timeout: float, what: str):
    """wait_for, looking again while the studio is not listening (started, or killed, a moment ago)."""
    return wait_for(predicate, timeout, what, step=0.2, retry_on=(httpx.TransportError,))


def runs_of(studio: StudioProcess) -> dict:
    answer = httpx.get(studio.url + "/api/runs", timeout=10).json()
    return {"runs": {row["name"]: row for row in answer["runs"]}, "queue": answer["queue"]}


def test_killing_the_studio_leaves_the_run_alone_and_a_restart_shows_the_same(tiny_dir, images, tmp_path):
    runs = tmp_path / "runs"
    studio = StudioProcess(runs, [], tmp_path / "studio.log").start()
    try:
        for name, steps in (("first", 40), ("second", 6)):
            body = tiny_run_toml(tiny_dir, images, max_steps=steps, save_every=10)
            answer = httpx.post(f"{studio.url}/api/runs?run={name}", content=body,
                                headers={"content-type": "application/toml", "origin": studio.url}, timeout=30)
            assert answer.status_code == 201, answer.text
        wait_for_studio(lambda: runs_of(studio)["runs"]["first"]["status"] == "running", 120, "the first run to train")
        wait_for_studio(lambda: runs_of(studio)["runs"]["first"]["step"] >= 2, 120, "a few steps")
        before = runs_of(studio)
        assert before["runs"]["second"]["status"] == "queued"  # one run at a time
        if sys.platform.startswith("linux"):  # the studio's threads yield to trainings, the trainings do not
            ours = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.getpriority(os.PRIO_PROCESS, before["runs"]["first"]["pid"]) == ours
            assert os.getpriority(os.PRIO_PROCESS, studio.process.pid) == min(19, ours + NICENESS)
        studio.kill()
        # The run goes on without the studio and finishes.
        adapter = runs / "first" / "lora.safetensors"
        wait_for_studio(lambda: adapter.is_file() and not (runs / "first" / ".sdlora.lock").exists(), 240,
                 "the first run to finish without the studio")
        assert not (runs / "second").joinpath("logs", "metrics.jsonl").exists()  # nobody started it meanwhile

        studio = StudioProcess(runs, [], tmp_path / "studio.log").start()
        after = runs_of(studio)
        assert after["runs"]["first"]["status"] == "finished"
        assert [entry["run"] for entry in after["queue"]] == ["second"]
        assert after["runs"]["second"]["status"] in ("queued", "starting", "running")
        # The restarted studio starts what was still waiting, and it finishes too.
        wait_for_studio(lambda: runs_of(studio)["runs"]["second"]["status"] == "finished", 180, "the second run")
    finally:
        studio.stop()
        end_runs(runs)
    config = tmp_path / "unwatched.toml"
    config.write_text(tiny_run_toml(tiny_dir, images, max_steps=40, save_every=10))
    done = subprocess.run([sys.executable, "-m", "sdlora", "train", "--quiet", "--config", str(config),
                           "--output-dir", str(tmp_path / "unwatched")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = load_file(runs / "first" / "lora.safetensors")
    reference = load_file(tmp_path / "unwatched" / "lora.safetensors")
    assert ours.keys() == reference.keys()
    for key in ours:  # the run that lost its studio equals one that never had one
        assert (ours[key] - reference[key]).abs().max() <= 1e-6, key
