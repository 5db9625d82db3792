"""One line that says what went wrong, whatever raised it (a Ray task in another process included)."""

from __future__ import annotations

import re

#: terminal escape sequences (colours, cursor moves, OSC titles) that Ray and others put in messages
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_TRACEBACK = "Traceback (most recent call last):"


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def root_cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from ``RayTaskError`` (which keeps it as ``.cause``)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException) or not any(
                c.__name__ == "RayTaskError" for c in type(error).__mro__):
            break
        error = cause
    return error


def _meaningful_line(text: str) -> str:
    """The line of a (possibly multi-line, traceback-holding) message that says what happened."""
    lines = [line.strip() for line in strip_ansi(text).splitlines() if line.strip()]
    if not lines:
        return ""
    if any(_TRACEBACK in line for line in lines):  # a formatted traceback: its last line is the error
        return lines[-1]
    return lines[0]


def error_message(error: BaseException) -> str:
    """A one-line description of ``error``: never empty, never a traceback, no terminal colour codes.

    An ``OSError`` with an OS reason reads ``No space left on device: /path``; other built-in
    exceptions are prefixed with their type (``KeyError: 'x'``); an exception with an empty message
    becomes its type name (``OSError``); the project's own errors are already sentences.
    """
    error = root_cause(error)
    name = type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        line = strip_ansi(str(error.strerror)).strip()
        if error.filename:
            line += f": {error.filename}"
        return line
    line = _meaningful_line(str(error))
    if not line:
        return name
    if type(error).__module__ == "builtins" and not line.startswith(name):
        return f"{name}: {line}"
    return line
