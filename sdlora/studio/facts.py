"""What a run folder says about its run, read from the files alone.

A run's status is never a flag the studio stored: a flag is what goes stale when a process dies (a run
shown "Stopping..." forever). It is worked out on every look:

    running    the folder's lock is held by a live process (the operating system drops a lock when its
               holder dies, however it dies, so a run killed with SIGKILL stops being "running" at once)
    finished   the lock is free and the adapter is there, written after the last metrics record
    failed     the lock is free and the trainer's last event says it failed (with its message)
    stopped    otherwise: stopped on request, or ended without a word (killed, or the machine went down)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from ..reliability.runlock import LOCK_FILE
from ..training.checkpoint import checkpoint_folders
from ..training.config import read_toml
from ..training.control import read_events

CONSOLE_LOG = "console.log"  # what a run the studio started printed, in its logs/ folder


def lock_holder(folder: Path) -> int | None:
    """The pid holding the run lock of `folder`, or None when nobody holds it.

    Taking the lock to test it would make a run that starts at that moment fail as "in use", so the lock
    is looked up instead: in /proc/locks on Linux, by the lock file's inode. Elsewhere the pid written in
    the lock file is checked for a live process (the trainer removes the file when it ends cleanly).
    """
    path = folder / LOCK_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    if sys.platform.startswith("linux") and os.path.exists("/proc/locks"):
        device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:567 0 EOF" (a blocked waiter has a "->" field first)
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device:
                    return int(fields[4])
        return None
    owner = _owner(path)
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _owner(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def is_run_folder(folder: Path) -> bool:
    """A folder a training wrote into, or is writing into: it has a config, a log or a lock."""
    return folder.is_dir() and any((folder / name).exists() for name in ("config.toml", "logs", LOCK_FILE))


def last_step_record(metrics: Path) -> dict | None:
    """The metrics file's last complete step record, read from its end (the file may be large)."""
    try:
        with metrics.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            chunk = min(size, 64 * 1024)
            file.seek(size - chunk)
            lines = file.read(chunk).split(b"\n")
    except FileNotFoundError:
        return None
    for line in reversed(lines[:-1] if lines and lines[-1] else lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record:
            return record
    return None


def tail(path: Path, lines: int = 40) -> list[str]:
    """The last `lines` lines of a text file (a progress bar's carriage returns count as line ends)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 32 * 1024))
            text = file.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    shown = [line.rstrip() for line in text.replace("\r", "\n").split("\n")]
    return [line for line in shown if line][-lines:]


@dataclass
class RunFacts:
    name: str
    status: str  # running, finished, failed, stopped
    detail: str  # one line on how it got there
    step: int = 0
    total_steps: int | None = None
    loss_smoothed: float | None = None
    lr: float | None = None
    seconds_per_step: float | None = None
    eta_s: float | None = None
    adapter: str | None = None  # file name inside the run folder
    checkpoints: list[str] = field(default_factory=list)
    pid: int | None = None
    adapter_name: str = "lora"
    updated: float = 0.0  # the newest of the run's files, for sorting

    def to_json(self) -> dict:
        return asdict(self)


def run_facts(folder: Path) -> RunFacts:
    """The status and progress of the run in `folder` (see the module docstring for the rules)."""
    config = _config(folder)
    adapter_name = str(config.get("name", "lora"))
    logs = folder / "logs"
    metrics = logs / "metrics.jsonl"
    events = read_events(logs)
    record = last_step_record(metrics)
    pid = lock_holder(folder)
    adapter = folder / f"{adapter_name}.safetensors"
    started = [event for event in events if event.get("event") == "started"]
    facts = RunFacts(name=folder.name, status="stopped", detail="", pid=pid, adapter_name=adapter_name,
                     checkpoints=[path.name for path in checkpoint_folders(folder / "checkpoints")])
    facts.total_steps = started[-1].get("total_steps") if started else config.get("max_steps")
    if record:
        facts.step, facts.loss_smoothed, facts.lr = record["step"], record.get("loss_smoothed"), record.get("lr")
    facts.updated = max([_mtime(path) for path in (metrics, logs / "events.jsonl", adapter, folder)])
    last = events[-1] if events else {}
    if pid is not None:
        facts.status, facts.detail = "running", f"pid {pid}"
        facts.seconds_per_step = _seconds_per_step(metrics, started[-1] if started else None)
        if facts.seconds_per_step and facts.total_steps:
            facts.eta_s = max(0.0, (facts.total_steps - facts.step) * facts.seconds_per_step)
    elif adapter.is_file() and (last.get("event") in (None, "finished") and _mtime(adapter) >= _mtime(metrics)):
        facts.status, facts.detail, facts.adapter = "finished", f"{facts.step} steps", adapter.name
    elif last.get("event") == "failed":
        facts.status, facts.detail = "failed", str(last.get("message", ""))
    elif last.get("event") == "stopped":
        facts.detail = f"stopped on request at step {last.get('step', facts.step)}"
    else:
        facts.detail = (f"ended without a word at step {facts.step} (killed, or the machine stopped)"
                        if started or record else "not started")
    if facts.status != "finished" and adapter.is_file():
        facts.adapter = adapter.name  # an earlier finish's file, still there
    return facts


def _seconds_per_step(metrics: Path, started: dict | None) -> float | None:
    """From the records since the run (re)started: their times count from that start."""
    record = last_step_record(metrics)
    if not record or "time" not in record:
        return None
    first = started.get("step", 0) if started else 0
    done = record["step"] - first
    return record["time"] / done if done > 0 else None


def _config(folder: Path) -> dict:
    path = folder / "config.toml"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    return dict(_parsed_config(str(path), stat.st_mtime_ns, stat.st_size))


@lru_cache(maxsize=256)
def _parsed_config(path: str, mtime_ns: int, size: int) -> dict:
    """A config file's values, parsed once per version of the file (a page asks several times a second)."""
    try:
        return read_toml(path)
    except ConfigError:  # a config edited by hand into something wrong: the run is shown all the same
        return {}


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def all_runs(root: Path) -> list[RunFacts]:
    """Every run folder directly inside `root`, the most recently active first."""
    if not root.is_dir():
        return []
    found = [run_facts(folder) for folder in root.iterdir()
             if not folder.name.startswith(".") and is_run_folder(folder)]
    return sorted(found, key=lambda facts: -facts.updated)
