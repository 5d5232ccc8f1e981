"""The studio's queue of trainings, kept in RUNS/.studio/queue.sqlite, and the processes it starts.

Each entry holds the config as it was when queued (a snapshot: editing the file later does not change a
queued run). A run starts as its own `sdlora train` process, from an argument list (never a shell
string), in a session of its own so that it outlives the studio; what it prints goes to its
logs/console.log. The queue knows what it launched; whether a run is running is read from the run's
lock (facts.py), so a restarted studio, or one that never saw the run start, tells the same story.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError
from ..reliability.durable import write_text
from .facts import CONSOLE_LOG, lock_holder

STUDIO_FOLDER = ".studio"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STARTING_GRACE_S = 300  # a launched process that holds no lock yet is "starting" (importing, loading the model)


@dataclass
class Entry:
    id: int
    run: str  # the run folder's name inside RUNS
    config: str  # the TOML snapshot
    resume: str | None
    position: float
    state: str  # waiting, launched, done, cancelled
    queued_at: float
    launched_at: float | None = None
    pid: int | None = None
    returncode: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def check_run_name(name: str) -> str:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (up to 100, not starting "
                          "with '.' or '-')")
    return name


class Queue:
    """The entries, persisted; every method is one transaction, safe from several threads."""

    def __init__(self, runs: Path):
        self.runs = runs
        folder = runs / STUDIO_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        self.configs = folder / "configs"
        self.configs.mkdir(exist_ok=True)
        self._db = sqlite3.connect(folder / "queue.sqlite", check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")  # a kill mid-write leaves the last commit intact
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS entries (id INTEGER PRIMARY KEY, run TEXT NOT NULL, config TEXT NOT NULL,"
                " resume TEXT, position REAL NOT NULL, state TEXT NOT NULL, queued_at REAL NOT NULL,"
                " launched_at REAL, pid INTEGER, returncode INTEGER)")

    def _rows(self, where: str = "", args: tuple = ()) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(f"SELECT id, run, config, resume, position, state, queued_at, launched_at, pid, "
                                    f"returncode FROM entries {where} ORDER BY position, id", args).fetchall()
        return [Entry(*row) for row in rows]

    def entries(self, states: tuple[str, ...] = ("waiting", "launched")) -> list[Entry]:
        marks = ",".join("?" * len(states))
        return self._rows(f"WHERE state IN ({marks})", states)

    def get(self, entry_id: int) -> Entry:
        found = self._rows("WHERE id = ?", (entry_id,))
        if not found:
            raise KeyError(entry_id)
        return found[0]

    def add(self, run: str, config: str, resume: str | None = None) -> Entry:
        check_run_name(run)
        if any(entry.run == run for entry in self.entries()):
            raise ConfigError(f"run {run!r} is already queued or starting: wait for it, or cancel that entry")
        with self._lock:
            last = self._db.execute("SELECT COALESCE(MAX(position), 0) FROM entries").fetchone()[0]
            cursor = self._db.execute("INSERT INTO entries (run, config, resume, position, state, queued_at) "
                                      "VALUES (?, ?, ?, ?, 'waiting', ?)", (run, config, resume, last + 1, time.time()))
        return self.get(cursor.lastrowid)

    def cancel(self, entry_id: int) -> Entry:
        entry = self.get(entry_id)
        if entry.state != "waiting":
            raise ConfigError(f"queue entry {entry_id} ({entry.run}) is {entry.state}, not waiting: stop the run "
                              "instead")
        self.update(entry_id, state="cancelled")
        return self.get(entry_id)

    def move(self, entry_id: int, index: int) -> list[Entry]:
        """Put a waiting entry at `index` among the waiting ones (0 = next to start)."""
        waiting = [entry for entry in self.entries(("waiting",)) if entry.id != entry_id]
        moved = self.get(entry_id)
        if moved.state != "waiting":
            raise ConfigError(f"queue entry {entry_id} is {moved.state}: only waiting entries move")
        waiting.insert(max(0, min(index, len(waiting))), moved)
        with self._lock:
            self._db.execute("BEGIN")
            for position, entry in enumerate(waiting, start=1):
                self._db.execute("UPDATE entries SET position = ? WHERE id = ?", (position + 0.0, entry.id))
            self._db.execute("COMMIT")
        return self.entries(("waiting",))

    def update(self, entry_id: int, **values) -> None:
        names = ", ".join(f"{name} = ?" for name in values)
        with self._lock:
            self._db.execute(f"UPDATE entries SET {names} WHERE id = ?", (*values.values(), entry_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ starting runs

    def launch(self, entry: Entry) -> subprocess.Popen:
        """Start `entry` as `sdlora train`: its snapshot as the config, its run folder as the output."""
        snapshot = self.configs / f"{entry.id}.toml"
        write_text(snapshot, entry.config)
        output = self.runs / entry.run
        (output / "logs").mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "sdlora", "train", "--config", str(snapshot), "--output-dir", str(output)]
        if entry.resume:
            command += ["--resume", entry.resume]
        with (output / "logs" / CONSOLE_LOG).open("ab") as console:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.update(entry.id, state="launched", launched_at=time.time(), pid=process.pid)
        return process


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a child that ended but was not reaped yet is a zombie: not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True


class Scheduler:
    """Starts waiting entries while fewer than `parallel` runs are running or starting; `tick` once a second."""

    def __init__(self, queue: Queue, parallel: int = 1):
        self.queue = queue
        self.parallel = parallel
        self.processes: dict[int, subprocess.Popen] = {}  # the ones this studio started, to reap them

    def starting(self) -> dict[str, Entry]:
        """Launched entries whose process lives and has not taken its run's lock yet, by run name."""
        found = {}
        for entry in self.queue.entries(("launched",)):
            if lock_holder(self.queue.runs / entry.run) is None and self._alive(entry) and \
                    time.time() - (entry.launched_at or 0) < STARTING_GRACE_S:
                found[entry.run] = entry
        return found

    def _alive(self, entry: Entry) -> bool:
        process = self.processes.get(entry.id)
        if process is not None:
            return process.poll() is None
        return entry.pid is not None and process_alive(entry.pid)

    def retire(self) -> None:
        """Mark launched entries whose process ended as done (with its exit status when this studio started it)."""
        for entry in self.queue.entries(("launched",)):
            if not self._alive(entry):
                process = self.processes.pop(entry.id, None)
                self.queue.update(entry.id, state="done", returncode=process.returncode if process else None)

    def tick(self, running: int) -> list[Entry]:
        """Retire what ended, then start what fits; `running` counts runs whose lock is held (started here or
        anywhere else)."""
        self.retire()
        busy = running + len(self.starting())
        started = []
        for entry in self.queue.entries(("waiting",)):
            if busy >= self.parallel:
                break
            if lock_holder(self.queue.runs / entry.run) is not None:
                continue  # its folder is busy (a run started from the command line): wait for it
            self.processes[entry.id] = self.queue.launch(entry)
            started.append(entry)
            busy += 1
        return started
