"""Checkpoints of ``pipeline train``: what one holds, writing and finding them, RNG state, ``--init``.

A checkpoint is ``<run>/checkpoints/epoch-NNNN.pt`` (written atomically) and ``latest.json`` names the
newest; the two newest are kept. It holds the student's state dict under ``model`` with its registry
name (``student``) and builder options (``student_options``), the optimizer and scheduler, epoch and
global step, every RNG state, the settings it must be resumed with, and what its labels were
(teacher, label kind, image size). Only tensors, numbers and strings: it loads with ``weights_only``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.common.atomic import atomic_open, write_json
from pipeline.train.config import TrainError
from students import Student, build_student
from teachers.weights import WeightsError, load_state_dict, load_strict

LATEST = "latest.json"


class CheckpointError(TrainError):
    """A checkpoint cannot be found or read, or is not one of ``pipeline train``."""


# -- RNG state, kept loadable with torch.load(weights_only=True) --------------------------------
def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- files ----------------------------------------------------------------------------------------
def latest_record(ckpt_dir: Path) -> dict | None:
    """``latest.json`` (``{"checkpoint": name, "epoch": N}``), or None before the first finished epoch."""
    marker = Path(ckpt_dir) / LATEST
    return json.loads(marker.read_text()) if marker.is_file() else None


def latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None before the first finished epoch."""
    record = latest_record(ckpt_dir)
    return None if record is None else Path(ckpt_dir) / record["checkpoint"]


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder of ``pipeline train`` (→ its latest checkpoint)."""
    path = Path(path)
    if path.is_dir():
        found = latest(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} is a folder without checkpoints/{LATEST}: not a finished "
                                  "`pipeline train` run (give a checkpoint file or a run folder)")
        return found
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this module (tensors, numbers and strings only: read with ``weights_only``)."""
    try:
        ckpt = load_state_dict(path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    if "model" not in ckpt or "student" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of `pipeline train` (no 'model'/'student')")
    return ckpt


def save_checkpoint(ckpt_dir: Path, epoch: int, ckpt: dict) -> Path:
    """Write ``epoch-NNNN.pt`` atomically, then ``latest.json``; keep the two newest checkpoints."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"epoch-{epoch:04d}.pt"
    with atomic_open(path, "wb") as f:
        torch.save(ckpt, f)
    write_json(ckpt_dir / LATEST, {"checkpoint": path.name, "epoch": epoch})
    for old in ckpt_dir.glob("epoch-*.pt"):
        if old.name < f"epoch-{epoch - 1:04d}.pt":
            old.unlink()
    return path


def student_from_checkpoint(checkpoint: str | Path) -> tuple[Student, dict, Path]:
    """(the student with its trained weights, the checkpoint, its path) from a checkpoint or run folder."""
    path = checkpoint_path(checkpoint)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("labels"), dict) or "kind" not in ckpt["labels"]:
        raise CheckpointError(f"{path} is not a checkpoint of `pipeline train` (no labels record); "
                              f"a plain weights file goes with --student NAME --weights {path}")
    try:
        model = build_student(ckpt["student"], backbone_weights="none", **ckpt.get("student_options", {}))
        load_strict(model, ckpt["model"], what=f"checkpoint {path}")
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    return model, ckpt, path


def init_from(model: Student, path: str) -> str:
    """Start ``model`` from the weights of checkpoint ``path`` (or a run folder's latest checkpoint)
    where names and shapes agree.

    Every tensor under the student's ``backbone_prefix`` must be there (a FastSal C hint checkpoint
    starts FastSal A's encoder); returns a line saying what was taken.
    """
    try:
        path = checkpoint_path(path)
        obj = load_state_dict(path)
    except (WeightsError, CheckpointError) as e:
        raise TrainError(f"--init: {e}") from None
    sd = obj.get("model", obj)
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k.startswith(model.backbone_prefix) and k not in take]
    if missing:
        raise TrainError(f"--init {path}: its {model.backbone_prefix.rstrip('.') or 'backbone'} does not fit "
                         f"({len(missing)} tensors missing or of another shape, e.g. {missing[0]}); is it a "
                         f"{model.name} checkpoint?")
    model.load_state_dict(take, strict=False)
    return f"init from {path}: {len(take)} of {len(own)} tensors (the rest keep their initialisation)"
