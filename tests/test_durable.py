"""Writes that survive kills, power cuts and full disks; one run per output folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdlora.reliability import durable
from sdlora.training.checkpoint import checkpoint_folders
from sdlora.reliability.durable import TEMPORARY_SUFFIX, WriteFailed, append_line, publish_folder, write_file
from sdlora.reliability.runlock import LOCK_FILE, OutputFolderBusy, RunLock

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None, wait: bool = True):
    """Run code in a fresh interpreter (a process we can kill, or that holds a lock)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        process.wait(timeout=60)
    return process


def leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(TEMPORARY_SUFFIX)]


def test_write_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        calls.append(("fsync", "folder" if Path(f"/proc/self/fd/{descriptor}").resolve().is_dir() else "file"))
        real_fsync(descriptor)

    def replace(source, target):
        calls.append(("rename", Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_file(tmp_path / "a.bin", b"x" * 1000)
    assert calls == [("fsync", "file"), ("rename", "a.bin"), ("fsync", "folder")]
    assert (tmp_path / "a.bin").read_bytes() == b"x" * 1000 and not leftovers(tmp_path)


@pytest.mark.parametrize("code, hint", [(errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"),
                                        (errno.EIO, "input/output error")])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, code, hint):
    target = tmp_path / "adapter.safetensors"
    write_file(target, b"old content")
    real_write = os.write

    def write_then_fail(descriptor, data):  # some bytes reach the disk, then it is full
        real_write(descriptor, bytes(data[:10]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", write_then_fail)
    with pytest.raises(WriteFailed) as caught:
        write_file(target, b"new content, much longer than the old one")
    assert str(target) in str(caught.value) and hint in str(caught.value)
    assert caught.value.errno == code
    assert target.read_bytes() == b"old content" and not leftovers(tmp_path)


def test_a_read_only_folder_is_named_with_what_to_do(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args):  # what a read-only mount answers, also to root
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(WriteFailed, match="read-only file system: choose another --output-dir"):
        write_file(tmp_path / "config.toml", b"x")
    assert list(tmp_path.iterdir()) == []



def test_a_failed_append_names_the_file_and_the_fix(tmp_path, monkeypatch):
    log = tmp_path / "events.jsonl"
    append_line(log, "first")

    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed, match=f"could not write {log}: the disk is full: free some space"):
        append_line(log, "second")

def test_kill_halfway_through_a_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "lora.safetensors"
    write_file(target, b"complete old file")
    process = run_python(f"""
        from sdlora.reliability.durable import write_file
        write_file({str(target)!r}, b"n" * 100000)
    """, env={"SDLORA_TEST_FAULT": "kill:write:1:lora.safetensors"})
    assert process.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"complete old file"
    (half,) = leftovers(tmp_path)  # the temporary, half written, under a name no reader looks at
    assert half.stat().st_size == 50000
    assert durable.remove_temporaries(tmp_path) == [half] and not leftovers(tmp_path)


def make_checkpoint(folder: Path, content: str) -> None:
    folder.mkdir(parents=True)
    for name in ("adapter.safetensors", "state.pt"):
        (folder / name).write_text(content)


def test_replacing_a_checkpoint_never_leaves_neither(tmp_path):
    """Killed between the two renames, the old checkpoint comes back; once done, the new one is there."""
    checkpoints = tmp_path / "checkpoints"
    make_checkpoint(checkpoints / "step-000010", "old")
    make_checkpoint(checkpoints / ".new", "new")
    process = run_python(f"""
        from pathlib import Path
        from sdlora.reliability.durable import publish_folder
        publish_folder(Path({str(checkpoints / '.new')!r}), Path({str(checkpoints / 'step-000010')!r}))
    """, env={"SDLORA_TEST_FAULT": "kill:publish:1:step-000010"})
    assert process.returncode == -signal.SIGKILL
    assert not (checkpoints / "step-000010").exists()  # the moment between the renames ...
    (found,) = checkpoint_folders(checkpoints)  # ... and the old checkpoint is found all the same
    assert found.name == "step-000010" and (found / "state.pt").read_text() == "old"

    publish_folder(checkpoints / ".new", checkpoints / "step-000010")
    (found,) = checkpoint_folders(checkpoints)
    assert (found / "state.pt").read_text() == "new"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000010"]


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path):
    holder = run_python(f"""
        import sys, time
        from sdlora.reliability.runlock import RunLock
        with RunLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """, wait=False)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderBusy) as caught:
            RunLock(tmp_path).acquire()
        message = str(caught.value)
        assert str(tmp_path) in message and f"pid {holder.pid} on host " in message and "started 20" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path):
    holder = run_python(f"""
        import os, signal
        from sdlora.reliability.runlock import RunLock
        RunLock({str(tmp_path)!r}).acquire()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert holder.returncode == -signal.SIGKILL and (tmp_path / LOCK_FILE).exists()
    messages = []
    with RunLock(tmp_path, say=messages.append):
        assert len(messages) == 1
        assert f"pid {holder.pid}" in messages[0] and "ended without releasing it" in messages[0]
    assert not (tmp_path / LOCK_FILE).exists()
    with RunLock(tmp_path, say=messages.append):  # released cleanly: nothing to report
        pass
    assert len(messages) == 1
