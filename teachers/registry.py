"""The registry of teachers: the set of builders, nothing cleverer.

Each builder is keyword-only, ``builder(*, weights=None) -> Teacher`` where ``weights`` is a
local path, an ``http(s)`` URL, a known name (see :mod:`teachers.weights`), ``"random"``
(architecture only; labels are then meaningless), or ``None`` for the teacher's default.
"""

from __future__ import annotations

import importlib
from typing import Callable

from teachers.base import Teacher

_BUILDERS: dict[str, Callable[..., Teacher]] = {}
# modules whose import registers builders; imported on first use so that `import teachers` stays cheap
_MODULES = ("teachers.classic", "teachers.salgan", "teachers.deepgaze")


def register(name: str):
    """Decorator: register a teacher builder under ``name``."""

    def deco(fn: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"teacher {name!r} registered twice")
        _BUILDERS[name] = fn
        return fn

    return deco


def import_modules(modules: tuple[str, ...]) -> None:
    """Import the modules whose import registers builders (one not written yet is skipped)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def _load_all() -> None:
    import_modules(_MODULES)


#: known weights names (see :mod:`teachers.weights`) a teacher loads when ``--weights`` is not given;
#: ``None``: the teacher has no published default and needs ``--weights PATH``
DEFAULT_WEIGHTS: dict[str, tuple[str, ...] | None] = {
    "classic": (),
    "deepgaze": ("deepgaze2e", "centerbias_mit1003"),
    "deepgaze2e": ("deepgaze2e", "centerbias_mit1003"),
    "deepgaze2": None,
    "salgan": None,
}


def available() -> list[str]:
    _load_all()
    return sorted(_BUILDERS)


def build_teacher(name: str, *, weights: str | None = None) -> Teacher:
    """Build the teacher ``name`` with ``weights`` (see module docstring), in eval mode on CPU."""
    _load_all()
    if name not in _BUILDERS:
        raise KeyError(f"unknown teacher {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name](weights=weights).eval()
