"""Atomic file writes: temp name in the same folder, fsync, rename, fsync the folder."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from pathlib import Path
from typing import IO, Iterator

from pipeline.common.files import fsync_dir, temp_name
from pipeline.common.locks import process_alive


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """For writers that open files by name (h5py): yield a temp path beside ``final``; on success
    fsync it and rename it to ``final``; on error remove it."""
    from pipeline.common.storage import RemotePath, staged

    if isinstance(final, RemotePath) or "://" in str(final):  # object storage: written locally, then uploaded
        with staged(final if isinstance(final, RemotePath) else RemotePath.parse(str(final))) as tmp:
            yield tmp
        return
    final = Path(final)
    tmp = temp_name(final)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_open(final: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temp file; on success fsync and rename it to ``final``; on error remove it."""
    with atomic_path(final) as tmp, open(tmp, mode) as f:
        yield f


def write_json(path: str | Path, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def remove_stale_temps(folder: Path) -> int:
    """Delete temp files left by killed writers; returns how many."""
    n = 0
    for p in folder.glob(".*.tmp-*"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def remove_orphaned_temps(final: str | Path) -> int:
    """Delete the temp files of ``final`` (``.NAME.tmp-PID-…`` beside it) whose writer, a process of this machine,
    is gone: killed mid-write (SIGKILL, out of memory), it left a hidden file as large as what it had written. A
    live writer's temp is left alone, and so is a URL's. (A writer on another machine sharing the folder looks gone
    from here: two machines writing the same file at once race anyway.) Returns how many were deleted."""
    if "://" in str(final):
        return 0
    final = Path(final)
    prefix = temp_name(final).name.rsplit(".tmp-", 1)[0]  # (the name as temp_name cuts it)
    n = 0
    for p in final.parent.glob(f"{glob.escape(prefix)}.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            p.unlink(missing_ok=True)
            n += 1
    return n

