"""The registry of teachers: the set of builders, nothing cleverer.

Each builder is keyword-only, ``builder(*, weights=None) -> Teacher`` where ``weights`` is a
local path, an ``http(s)`` URL, a known name (see :mod:`teachers.weights`), ``"random"``
(architecture only; labels are then meaningless), or ``None`` for the teacher's default.
"""

from __future__ import annotations

import importlib
from typing import Callable

from teachers.base import LABEL_EXTENSION, Teacher
from teachers.weights import WeightsError, resolve, resolve_all

_BUILDERS: dict[str, Callable[..., Teacher]] = {}
#: the class each builder returns: what its labels are (kind, label version, weights digest) without building it
_CLASSES: dict[str, type[Teacher]] = {}
# modules whose import registers builders; imported on first use so that `import teachers` stays cheap
_MODULES = ("teachers.classic", "teachers.salgan", "teachers.deepgaze")


def register(name: str, cls: type[Teacher]):
    """Decorator: register a teacher builder under ``name``; it returns a ``cls`` named ``name``."""

    def deco(fn: Callable[..., Teacher]) -> Callable[..., Teacher]:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"teacher {name!r} registered twice")
        _BUILDERS[name] = fn
        _CLASSES[name] = cls
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


#: files a teacher loads besides its ``--weights`` (DeepGaze's MIT1003 centre bias), unless ``--weights random``
EXTRA_WEIGHTS: dict[str, tuple[str, ...]] = {
    "deepgaze": ("centerbias_mit1003",),
    "deepgaze2e": ("centerbias_mit1003",),
    "deepgaze2": ("centerbias_mit1003",),
}

#: teachers without a default download whose authors' release `pipeline weights fetch NAME` still gets:
#: (known name of the release, how to turn it into a ``--weights`` file, with {src} and {dst})
RELEASES: dict[str, tuple[str, str]] = {
    "salgan": ("salgan_lasagne", "pipeline weights convert {src} {dst}"),
}


def required_weights(name: str, weights: str | None = None) -> tuple[str, ...] | None:
    """The weights specs (known names, URLs or paths) teacher ``name`` loads with ``--weights weights``:
    ``()`` when none (the classic teacher, ``random``), ``None`` when ``weights`` is required and missing."""
    if weights == "random" or DEFAULT_WEIGHTS.get(name) == ():
        return ()
    if weights is None:
        return DEFAULT_WEIGHTS.get(name)
    return (weights, *EXTRA_WEIGHTS.get(name, ()))


def fetchable_weights(name: str) -> tuple[str, ...]:
    """What ``pipeline weights fetch NAME`` downloads for teacher ``name``: its default files, else its
    authors' release (to convert), else nothing."""
    defaults = DEFAULT_WEIGHTS.get(name)
    if defaults:
        return defaults
    if name in RELEASES:
        return (RELEASES[name][0], *EXTRA_WEIGHTS.get(name, ()))
    return EXTRA_WEIGHTS.get(name, ())


def teacher_class(name: str) -> type[Teacher]:
    """The class of the teacher registered as ``name`` (nothing is built)."""
    _load_all()
    if name not in _CLASSES:
        raise KeyError(f"unknown teacher {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _CLASSES[name]


def teacher_identity(name: str, weights: str | None = None, *, resolver=None) -> dict:
    """What the labels of teacher ``name`` with ``--weights weights`` depend on, without building its network:
    ``teacher``, ``weights_digest``, ``weights_random``, ``label_kind``, ``label_extension``, ``label_version``
    -- the values a teacher built by :func:`build_teacher` reports. The weights are resolved (``resolver``
    replaces :func:`teachers.weights.resolve`, e.g. to never download) and hashed: one WeightsError names
    every file that cannot be had."""
    cls = teacher_class(name)
    cls.check_weights(name, weights)
    specs = required_weights(name, weights)
    if specs is None:
        raise WeightsError(f"teacher {name} needs --weights PATH (it has no published default)")
    if weights == "random":
        digest, random = "random", True
    else:
        hint = f"pipeline weights fetch {name}" if weights is None and fetchable_weights(name) else ""
        paths = resolve_all(specs, who=f"teacher {name}", fetch_hint=hint, resolver=resolver or (lambda s: resolve(s)))
        digest, random = cls.weights_digest_of(paths), False
    return {
        "teacher": name,
        "weights_digest": digest,
        "weights_random": random,
        "label_kind": cls.output_kind,
        "label_extension": f"{name}.{LABEL_EXTENSION[cls.output_kind]}",
        "label_version": cls.label_version,
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
