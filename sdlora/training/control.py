"""How another process (the studio) steers a run and follows it, through files in the run's folder alone.

Requests: `OUT/control/<time_ns>-<action>.request`, one empty file per request, published whole
(`request` writes a temporary and renames it), taken and removed by the trainer after an optimizer
step (`take_requests`), oldest first. The actions:

    stop    write a checkpoint at this step and end the run (TrainingStopped; `sdlora train` exits 3)
    save    write a checkpoint at this step now
    sample  write the sample sheet of this step now (refused without sample prompts)

Events: `OUT/logs/events.jsonl`, one JSON object per line, appended by the main process and fsynced
(`record_event`); never trimmed, so a resumed run's history stays whole. Every event has "event",
"step" (the optimizer steps done when it happened) and "time" (Unix seconds):

    started     total_steps, pid
    checkpoint  (a periodic one or a requested one)
    refused     action, message (a request that cannot be done, and why)
    stopped     reason ("requested")
    failed      message (the error that ended the run)
    finished    adapter (the adapter file's name in OUT)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..reliability.durable import append_line, write_file

CONTROL_FOLDER = "control"  # in the run's output folder
ACTIONS = ("stop", "save", "sample")
REQUEST_SUFFIX = ".request"
EVENTS_FILE = "events.jsonl"  # in the run's logs folder


def request(root: Path, action: str) -> Path:
    """Ask the run in output folder `root` to `action` after its current step; returns the request file."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}: give one of {', '.join(ACTIONS)}")
    # The nanosecond stamp orders requests; write_file's temporary name does not end in .request, so
    # the trainer never takes a request that is not complete.
    return write_file(Path(root) / CONTROL_FOLDER / f"{time.time_ns()}-{action}{REQUEST_SUFFIX}", b"")


def take_requests(root: Path) -> list[str]:
    """The actions requested of the run in `root`, oldest first; each request file is removed as it is
    taken. Runs after every step: one scandir when there is no control folder."""
    try:
        with os.scandir(Path(root) / CONTROL_FOLDER) as entries:
            names = [entry.name for entry in entries if entry.name.endswith(REQUEST_SUFFIX)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        stamp, _, action = name.removesuffix(REQUEST_SUFFIX).partition("-")
        found.append((int(stamp) if stamp.isdigit() else -1, name, action))
    actions = []
    for _, name, action in sorted(found):
        try:
            os.unlink(Path(root) / CONTROL_FOLDER / name)
        except FileNotFoundError:  # another taker had it: acting on it twice would save twice
            continue
        if action in ACTIONS:  # an unknown one is removed all the same, or it would be read every step
            actions.append(action)
    return actions


def record_event(logs: Path, event: dict) -> None:
    """Append `event` (stamped with the time, unless it has one) to logs/events.jsonl, durably."""
    record = dict(event)
    record.setdefault("time", time.time())
    append_line(Path(logs) / EVENTS_FILE, json.dumps(record))


def read_events(logs: Path) -> list[dict]:
    """The events of the run whose logs are in `logs`, oldest first; [] before the first one."""
    try:
        text = (Path(logs) / EVENTS_FILE).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines(keepends=True):
        # A kill can cut the last line short: it lacks its newline, or, once append_line has ended
        # it with one before the next event, it does not parse. Either way it is skipped.
        try:
            event = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict):
            events.append(event)
    return events
