"""Crash- and race-safe file writes shared by the kernel cache and the tuned tables."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

ORPHAN_TEMP_AGE_S = 3600.0  # a temp file without a readable writer pid is stale after this long


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder (fsync, then rename), so
    readers and concurrent writers only ever see a whole file. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(p)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Remove temp files of `path` (`.<name>.<pid>.*.tmp`) left by writers that died mid-write:
    those whose pid is no longer running, and those without a pid older than ORPHAN_TEMP_AGE_S.
    Returns how many were removed."""
    p = Path(path)
    n = 0
    for tmp in p.parent.glob(f".{p.name}.*.tmp"):
        middle = tmp.name[len(p.name) + 2:-len(".tmp")]
        pid_text = middle.split(".", 1)[0]
        try:
            if pid_text.isdigit() and "." in middle:
                if int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
                    continue
            elif time.time() - tmp.stat().st_mtime < ORPHAN_TEMP_AGE_S:
                continue
            tmp.unlink()
            n += 1
        except OSError:
            continue
    return n
