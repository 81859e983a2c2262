"""Files written atomically: a reader (or a crash) sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """`with atomic_path(path) as tmp:` write the file at `tmp` (a new name in path's directory, with path's
    extension, so that writers choosing a format by extension, like matplotlib's savefig, still do); at a
    clean exit it is fsynced and renamed over `path`; on an exception it is removed and `path` is unchanged."""
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
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
