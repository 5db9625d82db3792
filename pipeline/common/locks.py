"""One writer per folder: a lock file created with ``O_CREAT | O_EXCL`` that names its holder.

``<folder>/.lock`` (or any path) is created exclusively and holds one JSON line: host, pid, the
process's start time (to tell a reused pid from its holder), the command and when it was taken.
It is removed when the holder lets go; a holder killed with SIGKILL leaves it behind, and then:

* same host, pid not running (or running but started at another time: a reused pid) -> stale: the
  next taker removes it and takes the lock, with a note;
* same host, pid running -> refused, naming the holder;
* another host -> refused: this host cannot tell whether that process still runs, so the message
  says which file to delete once the user knows it does not.

Why a lock file and not ``flock``: the run folders of multi-node runs live on a shared filesystem.
``open(O_CREAT | O_EXCL)`` is atomic on NFSv3 and later (and on every local filesystem), while
``flock`` on NFS is either local to one client (old kernels, ``local_lock``) or emulated with byte-range
locks that depend on the lock daemon. The holder also keeps an ``flock`` on the file it created: it
costs nothing and lets a same-host check tell a live lock from a leftover without reading pids.

A stale lock is broken by renaming it to a unique name first and checking that the renamed file is
the one judged stale, so two processes breaking the same stale lock at once cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

#: the name of the lock file in a folder (``pipeline train``'s run folder)
LOCK_NAME = ".lock"
#: an unreadable lock file younger than this may be one being written: wait for it
_WRITE_WINDOW_S = 1.0


class LockHeld(Exception):
    """The lock is held by another process (``holder``), or cannot be judged (``holder`` is None)."""

    def __init__(self, message: str, holder: "Holder | None" = None):
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str = ""  # the process's start time as /proc says (clock ticks since boot), "" where unknown
    command: str = ""
    since: str = ""

    def describe(self) -> str:
        where = f"this host ({self.host})" if self.host == socket.gethostname() else f"host {self.host}"
        return f"pid {self.pid} on {where}" + (f", since {self.since}" if self.since else "")


def process_start(pid: int) -> str:
    """The start time of process ``pid`` (field 22 of /proc/PID/stat), "" where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie does not; another user's does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a zombie has exited: it holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def me(command: str = "") -> Holder:
    pid = os.getpid()
    return Holder(socket.gethostname(), pid, process_start(pid), command or " ".join(sys.argv[:2]),
                  datetime.now().astimezone().isoformat(timespec="seconds"))


def read_holder(path: Path) -> Holder | None:
    """The holder written in the lock file ``path``, or None when it is missing, empty or unreadable."""
    try:
        doc = json.loads(Path(path).read_text())
        return Holder(str(doc["host"]), int(doc["pid"]), str(doc.get("start", "")), str(doc.get("command", "")),
                      str(doc.get("since", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flocked(path: Path) -> bool:
    """Whether a process on this host holds an flock on ``path``."""
    try:
        f = open(path)
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False


def stale(holder: Holder) -> bool:
    """Whether ``holder`` (read from a lock file) is known to be gone: same host, and its process is not
    running or is another process under a reused pid."""
    if holder.host != socket.gethostname():
        return False
    if not process_alive(holder.pid):
        return True
    return bool(holder.start) and process_start(holder.pid) not in ("", holder.start)


def status(path: Path) -> tuple[str, Holder | None]:
    """("free" | "held" | "stale" | "unknown", holder) for the lock file ``path``, read only."""
    path = Path(path)
    if not path.exists():
        return "free", None
    holder = read_holder(path)
    if holder is None:
        if _flocked(path):
            return "held", None
        try:
            young = time.time() - path.stat().st_mtime < _WRITE_WINDOW_S
        except OSError:
            return "free", None
        # a leftover of an flock-only lock (an empty file or a bare pid) is not held; a fresh empty file is
        # a lock being written
        return ("unknown" if young else "stale"), None
    # (this process's own pid is no exception: a container restarted in place runs as the same pid, 1, on the
    # same host, and its killed predecessor's lock has another start time)
    return ("stale" if stale(holder) else "held"), holder


class FolderLock:
    """An exclusive lock file; ``acquire`` raises :class:`LockHeld` with a message naming the holder.

    ``what`` names the folder in messages ("run folder runs/x"); ``command`` what holds it.
    """

    def __init__(self, path: str | Path, what: str = "", command: str = ""):
        self.path = Path(path)
        self.what = what or str(self.path.parent)
        self.command = command
        self.notes: list[str] = []  # e.g. a stale lock taken over
        self._fd: int | None = None
        self._written = b""

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with contextlib.suppress(OSError):  # first: while the holder is being written, the flock says "held"
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._written = (json.dumps(me(self.command).__dict__) + "\n").encode()
            os.write(fd, self._written)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        return True

    def _break(self, seen: bytes) -> None:
        """Remove the stale lock file whose content was ``seen`` (rename first: only one breaker wins)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process broke it first
        try:
            if aside.read_bytes() == seen:
                aside.unlink()
            else:  # a fresh lock was taken between reading and renaming: put it back
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                aside.unlink()
        except OSError:
            pass

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + 2 * _WRITE_WINDOW_S
        while True:
            if self._create():
                return self
            try:
                seen = self.path.read_bytes()
            except FileNotFoundError:
                continue  # let go of just now: try again
            state, holder = status(self.path)
            if state == "stale":
                self.notes.append(f"note: took over the stale lock {self.path} of "
                                  + (f"{holder.describe()} (no longer running)" if holder else "a finished process"))
                self._break(seen)
                continue
            if state == "unknown" and time.monotonic() < deadline:
                time.sleep(0.05)  # being written by its taker
                continue
            raise LockHeld(self._refusal(holder), holder)

    def take(self, error: type[Exception]) -> "FolderLock":
        """:meth:`acquire`, or ``error`` with one sentence (another process holds it, or the lock file cannot be
        made); a stale lock taken over is noted on stderr."""
        try:
            self.acquire()
        except LockHeld as e:
            raise error(str(e)) from None
        except OSError as e:
            raise error(f"cannot lock {self.what} ({self.path}: {e.strerror or e})") from None
        for note in self.notes:
            print(note, file=sys.stderr)
        return self

    def _refusal(self, holder: Holder | None) -> str:
        if holder is None:
            return (f"{self.what} is locked ({self.path} exists but names no holder); if no other process uses "
                    f"it, delete {self.path}")
        by = f"`{holder.command}`, " if holder.command else ""
        if holder.host == socket.gethostname():
            return f"{self.what} is in use by another process ({by}{holder.describe()}); wait for it to finish or stop it"
        return (f"{self.what} is in use by another process ({by}{holder.describe()}); this host cannot tell "
                f"whether it still runs: if it does not, delete {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self._written:  # still ours (not broken and retaken by another)
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def folder_lock(path: str | Path, what: str = "", command: str = "") -> Iterator[FolderLock]:
    """Hold the lock file ``path`` for the block (see :class:`FolderLock`)."""
    lock = FolderLock(path, what, command)
    with lock:
        yield lock
