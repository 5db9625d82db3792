"""Progress of long work: a tqdm bar on a terminal, plain lines in a log.

:func:`progress` gives an object with tqdm's few methods the stages use (``update``, ``set_postfix_str``,
``close``, a context manager) plus :meth:`LineProgress.milestone`, which marks a point worth a line of its
own (an epoch ended, a group of shards finished). On a terminal that is tqdm's bar, with each milestone
written above it. Elsewhere (``pipeline run`` reading a step's output, a log file, CI) a bar redrawn with
``\\r`` is noise, so it is :class:`LineProgress`: one line per milestone, and one at most every
``every_s`` seconds in between, each with the count, images/s and the ETA::

    train fastsal_a (stage 1): 512/5120 img (10%), 84.2 img/s, ETA 55s; epoch 2/20 loss 0.412

``PIPELINE_PROGRESS=bar`` or ``=lines`` chooses regardless of the terminal.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO

from tqdm import tqdm

#: seconds between two progress lines when no milestone comes (a long epoch still shows it is alive)
EVERY_S = 60.0


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LineProgress:
    """tqdm's interface for logs: a line per milestone, and one every ``every_s`` seconds in between."""

    def __init__(self, total: int | None, desc: str, *, unit: str = "img", initial: int = 0,
                 every_s: float = EVERY_S, file: IO[str] | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every_s, self.file, self.clock = every_s, file or sys.stderr, clock
        self.start = self.last = clock()
        self.postfix = ""

    # tqdm's interface ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.every_s:
            self.line()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:  # noqa: ARG002 - tqdm's signature
        self.postfix = text

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # lines ----------------------------------------------------------------------------------------
    def rate(self) -> float:
        """Units per second in this run (units done before it, ``initial``, do not count)."""
        elapsed = self.clock() - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def status(self) -> str:
        rate = self.rate()
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {duration((self.total - self.n) / rate)}")
        elif self.total and self.n >= self.total:
            parts.append(f"done in {duration(self.clock() - self.start)}")
        return f"{self.desc}: " + ", ".join(parts)

    def line(self, note: str = "") -> None:
        note = note or self.postfix
        self.write(self.status() + (f"; {note}" if note else ""))
        self.last = self.clock()

    def milestone(self, note: str = "") -> None:
        self.line(note)


class BarProgress(tqdm):
    """tqdm's bar; a milestone is a line written above it."""

    def milestone(self, note: str = "") -> None:
        if note:
            self.write(f"{self.desc}: {note}", file=self.fp)


class NoProgress(LineProgress):
    """``--no-progress``: counts, prints nothing."""

    def write(self, text: str) -> None:
        pass


def progress(total: int | None, desc: str, *, unit: str = "img", initial: int = 0, enabled: bool = True,
             file: IO[str] | None = None) -> LineProgress | BarProgress:
    """The progress display for ``total`` units of work (None: unknown), as the output calls for."""
    file = file or sys.stderr
    if not enabled:
        return NoProgress(total, desc, unit=unit, initial=initial, file=file)
    mode = os.environ.get("PIPELINE_PROGRESS", "")
    if mode == "bar" or (mode != "lines" and file.isatty()):
        return BarProgress(total=total, initial=initial, unit=unit, desc=desc, file=file, dynamic_ncols=True)
    return LineProgress(total, desc, unit=unit, initial=initial, file=file)
