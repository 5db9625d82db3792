"""Plain-text tables for the terminal: the one printer every command's and benchmark's summary uses."""

from __future__ import annotations

from typing import Sequence


def table(headers: Sequence[str] | None, rows: Sequence[Sequence[object]], *, align: str = "left",
          indent: str = "", rule: bool = False) -> str:
    """Columns padded to their widest cell, two spaces apart.

    ``headers`` None: rows only (a key/value list). ``align``: "left", "right", or one letter per
    column ("lrr": the first left, the others right). ``rule``: a line of dashes under the headers.
    """
    cells = [[str(c) for c in line] for line in ([headers] if headers is not None else []) + list(rows)]
    if not cells:
        return ""
    n = max(map(len, cells))
    widths = [max(len(line[i]) for line in cells if i < len(line)) for i in range(n)]
    sides = {"left": "l" * n, "right": "r" * n}.get(align, align.ljust(n, align[-1:] or "l"))
    if rule and headers is not None:
        cells.insert(1, ["-" * w for w in widths])

    def line(row: list[str]) -> str:
        padded = (c.rjust(w) if side == "r" else c.ljust(w) for c, w, side in zip(row, widths, sides))
        return (indent + "  ".join(padded)).rstrip()

    return "\n".join(line(row) for row in cells)


def plural(n: int, word: str) -> str:
    """``n`` and ``word``, with an ``s`` unless ``n`` is 1: "1 image", "3 images"."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fixed(value: float, places: int = 4) -> str:
    """``value`` with ``places`` decimals, and no minus sign on a value that rounds to 0 (not "-0.0000")."""
    text = f"{value:.{places}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text
