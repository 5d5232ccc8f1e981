"""The command line sets torch's OpenMP thread policy before torch loads (sdlora/threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdlora import threads
from sdlora.threads import cpu_cores, use_cpu_policy

ROOT = Path(__file__).resolve().parents[1]
OURS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")

# Runs the real entry point (`sdlora inspect` of a missing file: quick, and it loads torch), then
# reports what torch ended up with.
PROBE = """
import json, os, sys
import sdlora.__main__
torch_before_main = "torch" in sys.modules
sys.argv = ["sdlora", "inspect", "missing.safetensors"]
sdlora.__main__.main()
import torch
env = {key: os.environ.get(key) for key in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
print(json.dumps({"torch_before_main": torch_before_main, "env": env, "threads": torch.get_num_threads()}))
"""


def run_probe(env: dict[str, str], one_cpu: bool = False) -> tuple[dict, str]:
    clean = {key: value for key, value in os.environ.items() if key not in OURS}
    # libgomp (torch's Linux CPU wheel) prints the settings it read when it loaded: what really applied.
    clean["OMP_DISPLAY_ENV"] = "VERBOSE"
    first_cpu = min(os.sched_getaffinity(0)) if one_cpu else None
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env}, capture_output=True,
                            text=True, preexec_fn=(lambda: os.sched_setaffinity(0, {first_cpu})) if one_cpu else None)
    assert result.stdout, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


def busy_sdlora(*words: str) -> subprocess.Popen:
    """A process that looks like a running `sdlora train` in /proc (it only sleeps)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "sdlora", *words])


@pytest.mark.parametrize("one_cpu", [False, True])
def test_beside_another_run_the_command_sets_a_short_spin_and_one_thread_per_core(one_cpu):
    if one_cpu and not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    other = busy_sdlora("train", "--config", "x.toml")
    try:
        report, stderr = run_probe({}, one_cpu)
    finally:
        other.kill()
        other.wait()
    cores = 1 if one_cpu else cpu_cores()
    assert not report["torch_before_main"]  # `import sdlora` must stay torch-free for this to work
    assert report["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cores), "GOMP_SPINCOUNT": "1000"}
    assert report["threads"] == cores
    if "GOMP_SPINCOUNT = " in stderr:  # libgomp: it saw the policy, so it was set before torch loaded
        assert "GOMP_SPINCOUNT = '1000'" in stderr


def test_the_command_keeps_the_users_settings():
    user = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}
    report, stderr = run_probe(user)
    assert report["env"] == {**user, "GOMP_SPINCOUNT": None}
    assert report["threads"] == 1
    if "GOMP_SPINCOUNT = " in stderr:
        assert "OMP_WAIT_POLICY = 'ACTIVE'" in stderr


def test_a_users_spin_count_is_a_wait_policy(monkeypatch):
    for key in OURS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    with pytest.warns(UserWarning, match="after torch was imported"):  # this test process has torch
        use_cpu_policy()
    assert "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == str(cpu_cores())


def test_the_spin_is_chosen_from_the_situation_at_start(monkeypatch):
    for key in OURS:
        monkeypatch.delenv(key, raising=False)
    cores = cpu_cores()
    for others, runnable, spin in ((0, 0, "300000"), (1, 0, "1000"), (0, cores, "1000"), (0, cores - 1, "300000")):
        monkeypatch.setattr(threads, "other_busy_commands", lambda others=others: others)
        monkeypatch.setattr(threads, "runnable_others", lambda runnable=runnable: runnable)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        with pytest.warns(UserWarning, match="after torch was imported"):
            use_cpu_policy()
        assert os.environ["GOMP_SPINCOUNT"] == spin, (others, runnable)


def test_busy_sdlora_commands_are_counted_and_the_studio_is_not():
    before = threads.other_busy_commands()
    started = [busy_sdlora("train"), busy_sdlora("generate", "--adapter", "a"), busy_sdlora("studio")]
    try:
        # A process just started may not be readable in /proc yet on a loaded machine (CI once saw 1):
        # wait a little for both, and never count the studio
        deadline, found = time.monotonic() + 10, None
        while found != before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            found = threads.other_busy_commands()
        assert found == before + 2
    finally:
        for process in started:
            process.kill()
            process.wait()
    assert threads.other_busy_commands() == before
