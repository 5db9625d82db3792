"""Weights resolution and strict loading, shared by every teacher and student.

``resolve(spec)`` turns a ``--weights`` value into a local file; ``load_state_dict`` reads it with
clear errors; ``load_strict`` loads a state dict into a module key for key, never partially.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


class WeightsError(Exception):
    """A weights file is missing, corrupt, of the wrong digest or does not fit the module."""


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve(spec: str) -> Path:
    """A local path, an http(s) URL or a known name → a local file (TODO: URLs and known names)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def load_state_dict(path: str | Path) -> dict:
    """Read a torch checkpoint (``weights_only``) with one clear error if it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file…
        raise WeightsError(f"cannot read weights file {path}: {e}") from e


def load_strict(module: nn.Module, state_dict: dict, *, what: str) -> None:
    """Load ``state_dict`` into ``module`` key for key and shape for shape, or raise WeightsError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of the wrong shape (e.g. {shapes[0]})")
        raise WeightsError(f"{what}: state dict does not fit: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
