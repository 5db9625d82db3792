"""The registry of students: the set of builders, nothing cleverer (like :mod:`teachers.registry`).

A builder is keyword-only, ``builder(*, weights=None, backbone_weights="imagenet", **options) -> Student``:
``weights`` a full student checkpoint (a path, an http(s) URL or a known name; the authors' format or
ours), else the backbone starts from ``backbone_weights`` (``imagenet``, ``none`` or a PATH).
``options`` shape the architecture (e.g. SACT's depth); they are recorded in every checkpoint.
Every CLI choice list, stride check and default comes from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from students.base import Student

#: modules whose import registers builders; imported on first use
_MODULES = ("students.fastsal", "students.sact")
DEFAULT_STUDENT = "fastsal_a"


@dataclass(frozen=True)
class StudentInfo:
    name: str
    cls: type[Student]
    builder: Callable[..., Student]
    params: int  # parameters with default options (tests assert it)
    doc: str

    @property
    def stride(self) -> int:
        return self.cls.stride

    @property
    def has_hint_stage(self) -> bool:
        return bool(self.cls.hint_channels)


_REGISTRY: dict[str, StudentInfo] = {}


def register(name: str, cls: type[Student], *, params: int, doc: str):
    """Decorator: register a student builder under ``name`` (its class is ``cls``)."""

    def deco(fn: Callable[..., Student]) -> Callable[..., Student]:
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"student {name!r} registered twice")
        _REGISTRY[name] = StudentInfo(name, cls, fn, params, doc)
        return fn

    return deco


def _load_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:  # a student module not written yet
            if e.name != module:
                raise


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def student_info(name: str) -> StudentInfo:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown student {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_student(name: str, *, weights: str | None = None, backbone_weights: str = "imagenet",
                  **options) -> Student:
    """Build student ``name`` (see the module docstring); its ``name`` attribute is the registry name."""
    model = student_info(name).builder(weights=weights, backbone_weights=backbone_weights, **options)
    return model
