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


#: the modules whose errors are object storage's own (credentials, endpoint, permissions)
STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "google.cloud", "google.api_core",
                   "adlfs", "azure")


def storage_error(error: BaseException) -> str:
    """One sentence for an object store's own error (botocore's ``NoCredentialsError``…, or one it caused), ""
    for any other."""
    for cause in (error, error.__cause__, error.__context__):
        module = type(cause).__module__ if cause is not None else ""
        if any(module == m or module.startswith(m + ".") for m in STORAGE_MODULES):
            line = _meaningful_line(str(cause)) or type(cause).__name__
            rest = [t.strip() for t in strip_ansi(str(cause)).splitlines() if t.strip()]
            if line.endswith(":") and line in rest[:-1]:  # botocore's "Parameter validation failed:" says why next
                line += " " + rest[rest.index(line) + 1]
            return (f"object storage refused the request ({type(cause).__name__}: {line}); its credentials and "
                    "endpoint come from the usual variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS) or the provider's config files")
    return ""


def error_message(error: BaseException) -> str:
    """A one-line description of ``error``: never empty, never a traceback, no terminal colour codes.

    An ``OSError`` with an OS reason reads ``No space left on device: /path``; other built-in
    exceptions are prefixed with their type (``KeyError: 'x'``); an exception with an empty message
    becomes its type name (``OSError``); an object store's own error says where credentials come from
    (:func:`storage_error`); the project's own errors are already sentences.
    """
    error = root_cause(error)
    if storage_error(error):
        return storage_error(error)
    name = type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        line = " ".join(strip_ansi(str(error.strerror)).split())  # (h5py's reasons span lines)
        if error.filename:
            line += f": {error.filename}"
        return line
    line = _meaningful_line(str(error))
    if not line:
        return name
    if type(error).__module__ == "builtins" and not line.startswith(name):
        return f"{name}: {line}"
    return line
