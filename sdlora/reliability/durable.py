"""Writing files so that a kill, a power cut or a full disk never leaves half of one.

A file is written to a hidden temporary name beside its final one, flushed to the disk (fsync), and
renamed over the final name; then the folder itself is fsynced, so that the rename survives a power
cut too (without it, ext4 and xfs can show an empty file after a crash). A failed write removes its
temporary file and raises `WriteFailed`, which names the file, the reason and what to do.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import WriteFailed
from .faults import kill_point

TEMPORARY_SUFFIX = ".sdlora-tmp"  # what `remove_temporaries` may delete: never a user's own file

HINTS = {
    errno.ENOSPC: "the disk is full: free some space",
    errno.EDQUOT: "the disk quota is used up: free some space",
    errno.EROFS: "the folder is on a read-only file system: choose another --output-dir",
    errno.EACCES: "permission denied: make the folder writable or choose another --output-dir",
    errno.EPERM: "permission denied: make the folder writable or choose another --output-dir",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EIO: "the disk reported an input/output error",
}




def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable. Not every platform can open a folder."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened, and NTFS journals renames itself
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):  # file systems without folder fsync
            raise
    finally:
        os.close(descriptor)


def _write(descriptor: int, data: memoryview) -> None:
    while data:
        data = data[os.write(descriptor, data[: 1 << 24]):]


def _write_all(descriptor: int, data: bytes, name: str) -> None:
    view = memoryview(data)
    middle = len(view) // 2
    _write(descriptor, view[:middle])
    kill_point("write", name)  # half of the file is written
    _write(descriptor, view[middle:])


def failure(path: Path, error: OSError) -> WriteFailed:
    reason = HINTS.get(error.errno, error.strerror or str(error))
    return WriteFailed(error.errno, f"could not write {path}: {reason} ({error.strerror or error})")


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably: afterwards `path` holds either all of it or
    what it held before, also after a kill or a power cut."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
        try:
            _write_all(descriptor, data, path.name)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        kill_point("rename", path.name)
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except BaseException as error:  # a Ctrl-C halfway through too
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, WriteFailed):
            raise failure(path, error) from error
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_file(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> Path:
    """Append `line` and a newline to the text file `path` (made if missing), fsynced before it returns.

    A kill halfway through leaves a last line without its newline; the next append ends that line
    first, so that the new one is a line of its own and only the cut one is lost.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
        try:
            size = os.lseek(descriptor, 0, os.SEEK_END)
            cut = False
            if size:
                os.lseek(descriptor, size - 1, os.SEEK_SET)
                cut = os.read(descriptor, 1) != b"\n"
            # O_APPEND: the write goes to the end wherever the read left the offset
            _write(descriptor, memoryview((b"\n" if cut else b"") + line.encode("utf-8") + b"\n"))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if size == 0:
            fsync_folder(path.parent)  # the new file's entry, so that it survives a power cut too
    except OSError as error:
        if isinstance(error, WriteFailed):
            raise
        raise failure(path, error) from error
    return path


def publish_folder(partial: Path, final: Path) -> None:
    """Rename a completely written folder into place, replacing `final` if it exists.

    Replacing is two renames (the old folder aside, the new one in) because no portable call swaps
    two folders. Between them the old one is complete under its aside name, and `recover_folder`
    puts it back, so at every moment a whole folder, old or new, can be found.
    """
    recover_folder(final)  # an earlier replacement that a kill cut short
    aside = final.with_name(f".{final.name}.previous")
    try:
        fsync_folder(partial)
        if final.exists():
            os.replace(final, aside)
            kill_point("publish", final.name)
        os.replace(partial, final)
        fsync_folder(final.parent)
    except OSError as error:
        recover_folder(final)
        raise failure(final, error) from error
    remove_tree(aside)


def recover_folder(final: Path) -> None:
    """Finish a `publish_folder` that a kill interrupted: the old folder back if the new one is
    not in place, else the old one removed."""
    aside = final.with_name(f".{final.name}.previous")
    if not aside.exists():
        return
    if final.exists():
        remove_tree(aside)
    else:
        os.replace(aside, final)
        fsync_folder(final.parent)


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete what killed writers left in `folder` (ours only, by suffix); call it holding the run lock."""
    if not folder.is_dir():
        return []
    left = [path for path in folder.iterdir() if path.name.startswith(".") and path.name.endswith(TEMPORARY_SUFFIX)]
    for path in left:
        if path.is_dir():
            remove_tree(path)
        else:
            path.unlink(missing_ok=True)
    return left
