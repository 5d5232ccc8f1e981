"""One training run per output folder.

The lock is an advisory lock (flock) on `OUT/.sdlora.lock`, which also holds who took it (pid, host,
start time) for the message a second run prints. The operating system drops the lock when its
process dies, however it dies, so a lock left by a killed run is told apart from a live one without
guessing from pids; the file it leaves behind is only reported and taken over.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from ..errors import OutputFolderBusy

LOCK_FILE = ".sdlora.lock"




def _try_lock(descriptor: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def describe(owner: dict) -> str:
    return (f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started "
            f"{owner.get('started', '?')}")


def _read_owner(descriptor: int) -> dict:
    os.lseek(descriptor, 0, os.SEEK_SET)
    raw = os.read(descriptor, 4096)
    try:
        owner = json.loads(raw.decode("utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


class RunLock:
    """Held while a run writes into `folder`; `with RunLock(folder, say):` or acquire()/release()."""

    def __init__(self, folder: str | os.PathLike, say=print):
        self.path = Path(folder) / LOCK_FILE
        self.say = say
        self.descriptor: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(descriptor):
                owner = _read_owner(descriptor)
                os.close(descriptor)
                raise OutputFolderBusy(f"{self.path.parent} is in use by another sdlora run ({describe(owner)}): "
                                       "wait for it to end, stop it, or choose another --output-dir")
            if _same_file(descriptor, self.path):
                break
            os.close(descriptor)  # the holder removed the file as we opened it: lock the new one
        previous = _read_owner(descriptor)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")}
        if previous and (previous.get("pid"), previous.get("host")) != (me["pid"], me["host"]):
            self.say(f"taking over {self.path}: the run that held it ({describe(previous)}) ended without "
                     "releasing it (killed or crashed)")
        os.ftruncate(descriptor, 0)
        os.lseek(descriptor, 0, os.SEEK_SET)
        os.write(descriptor, json.dumps(me).encode("utf-8"))
        os.fsync(descriptor)
        self.descriptor = descriptor
        return self

    def release(self) -> None:
        """Remove the file, then drop the lock: a run that starts in between takes a fresh file."""
        if self.descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
