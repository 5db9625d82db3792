"""Below :mod:`pipeline.common.atomic` and :mod:`pipeline.common.storage`, which both write files by renaming a
temp file: the temp file's name, and the fsync of a folder that makes a rename last."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

#: the longest file name most filesystems take (bytes)
NAME_MAX = 255


def temp_name(final: Path) -> Path:
    """A hidden name beside ``final``, unique to this writer (readers never glob it); ``final``'s name is cut
    short in it where the whole would be longer than a file name may be."""
    tail = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # (bytes as the filesystem has them: a name that is not UTF-8 keeps its undecodable bytes)
    name = os.fsdecode(os.fsencode(final.name)[:NAME_MAX - 1 - len(tail)])
    return final.with_name(f".{name}{tail}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: room an HDF5 file needs when it closes beyond its datasets' data (its index, the datasets' names)
HDF5_CLOSING = 32 * 2**20


def ensure_room(folder: str | Path, nbytes: int, what: str) -> None:
    """An ``OSError`` (ENOSPC) saying so when ``folder``'s filesystem has less than ``nbytes`` free, before
    ``what`` is written: for a writer that cannot fail cleanly on a full disk (h5py crashes the process when
    HDF5 cannot close its file, after a page of errors). Free space as the filesystem reports it: a user's
    quota is not seen."""
    usage = shutil.disk_usage(folder)
    if usage.total == 0:  # a filesystem that reports no size (some FUSE and object-store mounts): not known
        return
    if usage.free < nbytes:
        raise OSError(errno.ENOSPC, f"No space left on device: {usage.free / 2**20:.0f} MiB free, {what} needs "
                                    f"{nbytes / 2**20:.0f} MiB", str(folder))
