"""Files written atomically: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """`with atomic_path(path) as tmp:` write the file at `tmp` (a new name in path's directory, with path's
    extension, so that writers choosing a format by extension, like matplotlib's savefig, still do); at a
    clean exit it is fsynced and renamed over `path`, and the directory fsynced so that the rename survives a
    crash; on an exception it is removed and `path` is unchanged."""
    directory = os.path.dirname(os.path.abspath(path))
    stem, ext = os.path.splitext(os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=f".tmp{ext}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)                    # mkstemp's 0600 would hide the file from the group
        os.replace(tmp, path)
        fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fsync_directory(directory) -> None:
    """fsync a directory, so that a rename in it survives a crash; a no-op where that is not possible."""
    with contextlib.suppress(OSError):      # not every file system lets a directory be opened or synced
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
