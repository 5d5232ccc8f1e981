"""Work the studio runs beside the trainings: a strength grid of a checkpoint, the toy-world scores of an
adapter. Each is a command-line process of its own whose result is a file; the file is the job's state
(there: done; a live process: running; a log and neither: failed, with the log's tail), so nothing is
remembered that a restart could lose.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .facts import tail
from .queue import process_alive


@dataclass
class Job:
    result: Path  # written by the command, atomically, when it succeeds
    log: Path

    @property
    def pid_file(self) -> Path:
        return self.log.with_suffix(".pid")

    def state(self) -> dict:
        if self.result.is_file():
            return {"state": "done"}
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            pid = None
        if pid is not None and process_alive(pid):
            return {"state": "running"}
        if self.log.is_file():
            return {"state": "failed", "log": tail(self.log, 12)}
        return {"state": "none"}

    def start(self, command: list[str], stdout_is_result: bool = False) -> None:
        """Run `sdlora COMMAND...` in the background; with stdout_is_result, what it prints becomes the result
        file once it exits 0 (for commands that print their report)."""
        if self.state()["state"] == "running":
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.result.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "sdlora", *command]
        if stdout_is_result:  # a tiny wrapper process: the report lands whole or not at all
            argv = [sys.executable, "-c", _WRITE_STDOUT, str(self.result), *argv]
        with self.log.open("wb") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid_file.write_text(str(process.pid))


# Runs the command, and writes its standard output to the result path (temp file + rename) if it succeeded.
_WRITE_STDOUT = """
import os, subprocess, sys
result, command = sys.argv[1], sys.argv[2:]
done = subprocess.run(command, stdout=subprocess.PIPE)
if done.returncode == 0:
    with open(result + ".part", "wb") as file:
        file.write(done.stdout)
        file.flush()
        os.fsync(file.fileno())
    os.replace(result + ".part", result)
sys.stdout.buffer.write(done.stdout)
sys.exit(done.returncode)
"""
