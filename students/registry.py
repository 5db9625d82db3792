"""The registry of students: the set of builders, nothing cleverer (like :mod:`teachers.registry`).

A builder is keyword-only, ``builder(*, weights=None, backbone_weights="imagenet", **options) -> Student``:
``weights`` a full student checkpoint (a path, an http(s) URL or a known name; the authors' format or
ours), else the backbone starts from ``backbone_weights`` (``imagenet``, ``none`` or a PATH).
``options`` shape the architecture (e.g. SACT's depth); they are recorded in every checkpoint.
Every CLI choice list, stride check and default comes from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from students.base import Student
from teachers.registry import import_modules

#: modules whose import registers builders; imported on first use
_MODULES = ("students.fastsal", "students.sact")
DEFAULT_STUDENT = "fastsal_a"


@dataclass(frozen=True)
class StudentOption:
    """A keyword option of a student's builder that shapes its architecture or its training loss.

    The CLI offers every registered student's options (``--tau``, ``--tile``…) and passes those given
    to the builder; a checkpoint records them (:meth:`Student.options`).
    """

    name: str  # the builder's keyword; the CLI flag is --name with dashes
    type: type  # int, float or str
    default: object
    help: str
    choices: tuple = ()  # allowed values, when only some are
    minimum: float | None = None  # the smallest value allowed (and a float must be finite)
    training_only: bool = False  # it weights the training loss alone: the same weights infer the same either way
    tensors: bool = False  # it changes the module's tensors (names, shapes): a checkpoint fits its own value alone

    def problem(self, value) -> str:
        """Why ``value`` (of :attr:`type`) is not allowed, or ""."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if self.minimum is not None and value < self.minimum:
            return f"must be at least {self.minimum:g}, got {value!r}"
        return ""


@dataclass(frozen=True)
class StudentInfo:
    name: str
    cls: type[Student]
    builder: Callable[..., Student]
    params: int  # parameters with default options (tests assert it)
    doc: str
    options: tuple[StudentOption, ...] = ()

    @property
    def stride(self) -> int:
        return self.cls.stride

    @property
    def has_hint_stage(self) -> bool:
        return bool(self.cls.hint_channels)


_REGISTRY: dict[str, StudentInfo] = {}


def register(name: str, cls: type[Student], *, params: int, doc: str, options: tuple[StudentOption, ...] = ()):
    """Decorator: register a student builder under ``name`` (its class is ``cls``, its keyword options
    ``options``)."""

    def deco(fn: Callable[..., Student]) -> Callable[..., Student]:
        if name in _REGISTRY and _REGISTRY[name].builder is not fn:
            raise ValueError(f"student {name!r} registered twice")
        _REGISTRY[name] = StudentInfo(name, cls, fn, params, doc, tuple(options))
        return fn

    return deco


def _load_all() -> None:
    import_modules(_MODULES)


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def student_info(name: str) -> StudentInfo:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown student {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def all_options() -> dict[str, StudentOption]:
    """Every registered student's options by name (students that share an option name share its meaning)."""
    _load_all()
    return {o.name: o for info in sorted(_REGISTRY.values(), key=lambda i: i.name) for o in info.options}


def all_maps() -> list[str]:
    """Every extra map a registered student can emit (besides its saliency)."""
    _load_all()
    return sorted({m for info in _REGISTRY.values() for m in info.cls.extra_maps})


def check_options(name: str, options: dict) -> dict:
    """``options`` validated for student ``name``: known to it, of the right type and among its choices.

    Raises ``ValueError`` with one sentence naming the option and what it takes.
    """
    info = student_info(name)
    own = {o.name: o for o in info.options}
    out = {}
    for key, value in options.items():
        if key not in own:
            owners = sorted(n for n in available() if any(o.name == key for o in student_info(n).options))
            where = f"an option of {', '.join(owners)}" if owners else "no student's option"
            raise ValueError(f"--{key.replace('_', '-')} is {where}, not of {name}")
        opt = own[key]
        if opt.type is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError(f"--{key.replace('_', '-')} takes an int, got {value!r}")
        try:
            value = opt.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{key.replace('_', '-')} takes a {opt.type.__name__}, got {value!r}") from None
        if opt.choices and value not in opt.choices:
            raise ValueError(f"--{key.replace('_', '-')} {value!r} is not one of "
                             f"{', '.join(map(str, opt.choices))} for {name}")
        problem = opt.problem(value)
        if problem:
            raise ValueError(f"--{key.replace('_', '-')} {problem}")
        out[key] = value
    return out


def build_student(name: str, *, weights: str | None = None, backbone_weights: str = "imagenet",
                  **options) -> Student:
    """Build student ``name`` with its ``options`` (see the module docstring); ``weights="random"``: untrained,
    nothing loaded (its backbone neither)."""
    if weights == "random":
        weights, backbone_weights = None, "none"
    return student_info(name).builder(weights=weights, backbone_weights=backbone_weights,
                                      **check_options(name, options))


def required_weights(name: str, *, weights: str | None = None, backbone_weights: str = "imagenet",
                     **options) -> tuple[str, ...]:
    """The weights specs (paths, URLs, known names) building student ``name`` with ``options`` loads: its
    ``weights``, else its backbone's (``imagenet``: the URL the student declares; ``none``: nothing; else the
    PATH)."""
    if weights is not None:
        return () if weights == "random" else (weights,)
    if backbone_weights == "none":
        return ()
    if backbone_weights == "imagenet":
        url = student_info(name).cls.imagenet_url(**options)
        return (url,) if url else ()
    return (backbone_weights,)
