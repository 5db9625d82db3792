"""Checkpoints of ``pipeline train``: what one holds, writing and finding them, RNG state, ``--init``.

A checkpoint is ``<run>/checkpoints/epoch-NNNN.pt`` (written atomically) and ``latest.json`` names the newest;
the two newest are kept, and the one ``best.json`` names (lowest validation loss). It holds the student's
state dict under ``model`` with its registry name (``student``) and builder options (``student_options``), the
optimizer and scheduler, epoch and global step, every RNG state, the settings it must be resumed with, and
what its labels were (teacher, label kind, image size). Only tensors, numbers, strings and containers (the
scheduler's milestones are a ``Counter``, which torch accepts from 2.4, the floor): it loads with
``weights_only``.
A checkpoint or run folder to load (``--checkpoint``, ``--init``) may be a URL (``s3://…``): the pointer is
read there and the one checkpoint file downloaded to a temporary file.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.common.atomic import atomic_open, write_json
from pipeline.common.storage import as_path, is_url, local_file
from pipeline.label.shards import digest
from pipeline.train.config import TrainError
from students import Student, build_student, student_info
from teachers.weights import WeightsError, load_state_dict, load_strict

LATEST = "latest.json"
#: the pointer to the epoch of lowest validation loss (kept beside the two newest), as the FastSal authors keep theirs
BEST = "best.json"


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
    if "cuda" in state and torch.cuda.is_available():  # a run saved where more GPUs were visible: those there are
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# -- files ----------------------------------------------------------------------------------------
def _read_pointer(ckpt_dir: Path, pointer: str = LATEST) -> tuple[dict | None, str]:
    """(the record of ``latest.json``, or of another pointer (``best.json``), or None; "" or why it cannot be
    read)."""
    marker = as_path(ckpt_dir) / pointer
    if not marker.is_file():
        return None, ""
    try:
        record = json.loads(marker.read_text())
        name, epoch = record["checkpoint"], record["epoch"]
        if not isinstance(name, str) or "/" in name or not isinstance(epoch, int):
            raise ValueError("not a checkpoint name and an epoch")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        what = f"no {e.args[0]!r}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        return None, f"{marker} is unreadable ({what})"
    return record, ""


def _point_at(ckpt_dir: Path, path: Path, epoch: int, sha256: str | None = None) -> None:
    """``latest.json`` naming ``path`` (its epoch and sha256, read from the file unless given): the run's pointer,
    written after the checkpoint."""
    write_json(ckpt_dir / LATEST, {"checkpoint": path.name, "epoch": epoch, "sha256": sha256 or digest(path)})


class _Hashing:
    """A binary file that hashes (sha256) what is written through it: a checkpoint's digest without reading it
    back."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _first_error(error: RuntimeError) -> BaseException:
    """What made ``torch.save`` fail: after an error in a write, or Ctrl-C anywhere in it, torch's zip writer ends
    the file and raises "unexpected pos" in its place, the first error as its context; that one (an ``OSError``:
    a full disk, a file-size limit; a ``KeyboardInterrupt``) is the one to raise. Without one, ``error``."""
    cause: BaseException | None = error
    for _ in range(8):  # (a short chain: the writer's error, over what it was handling)
        if cause is None or isinstance(cause, (OSError, KeyboardInterrupt)):
            break
        cause = cause.__context__
    return cause if isinstance(cause, (OSError, KeyboardInterrupt)) else error


def latest_record(ckpt_dir: Path, pointer: str = LATEST) -> dict | None:
    """``latest.json`` (``{"checkpoint": name, "epoch": N, "sha256": hex}``; older runs' hold no sha256), or
    ``pointer`` (``best.json``: also ``val_loss``), or None before the first finished epoch;
    :class:`CheckpointError` when it is there but unreadable."""
    record, problem = _read_pointer(ckpt_dir, pointer)
    if problem:
        if pointer != LATEST:
            raise CheckpointError(f"{problem}; give a checkpoint file")
        raise CheckpointError(f"{problem}: re-running `pipeline train` on {as_path(ckpt_dir).parent} resumes from its "
                              "newest readable checkpoint and rewrites it; or give a checkpoint file")
    return record


def latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or None before the first finished epoch."""
    record = latest_record(ckpt_dir)
    return None if record is None else as_path(ckpt_dir) / record["checkpoint"]


#: what a checkpoint must hold to be resumed from
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config")


def resumes(run: str | Path, restart: bool = False) -> bool:
    """Whether ``pipeline train`` on the local run folder ``run`` will resume: it holds checkpoints and no
    ``--restart`` clears them (it then loads the newest readable one, or refuses). Such a run reads its
    checkpoint instead of its start (``--init``, ``--backbone-weights``); a run URL is listed on its store."""
    return not restart and any((as_path(run) / "checkpoints").glob("epoch-*.pt"))


def load_resumable(path: str | Path) -> dict:
    """A checkpoint that holds all a resume needs (:data:`RESUME_KEYS`); else :class:`CheckpointError`."""
    ckpt = load_checkpoint(path)
    lacking = [k for k in RESUME_KEYS if k not in ckpt]
    if lacking:
        raise CheckpointError(f"{path} holds no {', '.join(lacking)}: not a checkpoint to resume from")
    return ckpt


def newest_readable(ckpt_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The checkpoint to resume from and its content: the one ``latest.json`` names, else (it is unreadable, or
    its checkpoint is missing or truncated) the newest of the others (the two newest are kept, and the best), each
    one passed over with a ``warning:`` line, and ``latest.json`` rewritten to name the one found (so that the run
    folder names a readable checkpoint even when no epoch is left to train); None before the first finished epoch;
    :class:`CheckpointError` when there are checkpoints but none can be read."""
    ckpt_dir = Path(ckpt_dir)
    record, problem = _read_pointer(ckpt_dir)
    problems = [problem] if problem else []
    named = ckpt_dir / record["checkpoint"] if record is not None else None
    candidates = [named] if named is not None else []
    candidates += [p for p in sorted(ckpt_dir.glob("epoch-*.pt"), key=epoch_of, reverse=True) if p != named]
    if not candidates:
        if problems:
            raise CheckpointError(f"{problems[0]}, but there is no checkpoint in {ckpt_dir}: start over with --restart")
        return None
    for path in candidates:
        try:
            ckpt = load_resumable(path)  # (a truncated file is said to be so)
            if path == named and record.get("sha256") and digest(path) != record["sha256"]:
                raise CheckpointError(f"{path} is not the checkpoint {LATEST} recorded (its sha256 differs: "
                                      "changed since it was written)")
        except (CheckpointError, OSError) as e:
            problems.append(str(e) if isinstance(e, CheckpointError) else f"{path}: {e}")
            continue
        for problem in problems:
            warn(f"warning: {problem}; resuming from {path.name} (epoch {ckpt['epoch'] + 1}) instead")
        if path != named:
            _point_at(ckpt_dir, path, ckpt["epoch"])
        return path, ckpt
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be read ({'; '.join(problems)}): start over with "
                          "--restart")


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder of ``pipeline train`` (→ its latest checkpoint), or that folder's
    ``checkpoints/latest.json`` (the same); each may be a URL (a :class:`~pipeline.common.storage.RemotePath`
    then: a folder is a prefix holding objects)."""
    path = as_path(path)
    if path.name in (LATEST, BEST) and path.is_file():  # the run's pointer (or its best epoch's), named
        found = _recorded(path.parent, path.name)
        if found is None:
            raise CheckpointError(f"{path} names no checkpoint")
        return found
    if path.is_file():
        return path
    if path.exists() if is_url(path) else path.is_dir():
        found = _recorded(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} is a folder without checkpoints/{LATEST}: not a finished "
                                  "`pipeline train` run (give a checkpoint file or a run folder)")
        return found
    raise CheckpointError(f"checkpoint not found: {path}")


def _recorded(ckpt_dir, pointer: str = LATEST):
    """The checkpoint ``latest.json`` (or ``pointer``) names (None before the first finished epoch), when its
    bytes are those it recorded (a local file; one on object storage is read as it is); else
    :class:`CheckpointError`."""
    record = latest_record(ckpt_dir, pointer)
    if record is None:
        return None
    found = as_path(ckpt_dir) / record["checkpoint"]
    if record.get("sha256") and not is_url(found) and Path(found).is_file() and digest(found) != record["sha256"]:
        raise CheckpointError(f"{found} is not the checkpoint {pointer} recorded (its sha256 differs: changed since "
                              "it was written)" + (f"; `pipeline train` on {as_path(ckpt_dir).parent} resumes from the "
                                                   "one before it" if pointer == LATEST else "")
                              + ", or give a checkpoint file")
    return found


def read_weights(path) -> dict:
    """:func:`teachers.weights.load_state_dict` of a local file, or of an object downloaded to a temporary file
    (its errors name the URL)."""
    if not is_url(path):
        return load_state_dict(path)
    try:
        with local_file(path) as tmp:
            try:
                return load_state_dict(tmp)
            except WeightsError as e:
                raise WeightsError(str(e).replace(str(tmp), str(path))) from None
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None


def epoch_of(path) -> int:
    """The epoch an ``epoch-NNNN.pt`` name gives (by number: past 9999 the names are longer, not later);
    -1 for another name."""
    digits = path.name[len("epoch-"):-len(".pt")]
    return int(digits) if digits.isdigit() else -1


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this module (tensors, numbers and strings only: read with ``weights_only``)."""
    try:
        ckpt = read_weights(path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    if "model" not in ckpt or "student" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of `pipeline train` (no 'model'/'student')")
    problem = _record_problem(ckpt)
    if problem:
        raise CheckpointError(f"{path} is not a checkpoint of `pipeline train` ({problem})")
    return ckpt


def _record_problem(ckpt: dict) -> str:
    """What is wrong with the fields a checkpoint's readers build from (a file of another shape, or edited by
    hand, was a traceback or a map of 10^12 pixels), or ""."""
    if not isinstance(ckpt["student"], str):
        return f"its student is {str(ckpt['student'])[:40]!r}, not a name"
    if not isinstance(ckpt.get("student_options", {}), dict):
        return "its student_options are not a mapping"
    labels = ckpt.get("labels")
    if labels is None:
        return ""
    size = labels.get("image_size", (192, 256)) if isinstance(labels, dict) else None
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and 0 < v <= 1 << 14 for v in size)):
        return f"its labels' image_size is {str(size)[:40]!r}, not [height, width]"
    return ""


def save_checkpoint(ckpt_dir: Path, epoch: int, ckpt: dict, val_loss: float | None = None) -> Path:
    """Write ``epoch-NNNN.pt`` atomically, then ``latest.json``; with a ``val_loss`` below the one ``best.json``
    records (or none recorded), then ``best.json`` naming it too; keep the two newest checkpoints and the one
    ``best.json`` names (each pointer is written before an older file it named is deleted)."""
    path = ckpt_dir / f"epoch-{epoch:04d}.pt"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as f:
            hashing = _Hashing(f)
            try:
                torch.save(ckpt, hashing)
            except RuntimeError as e:
                raise _first_error(e) from None
        _point_at(ckpt_dir, path, epoch, hashing.sha256.hexdigest())
        best, _ = _read_pointer(ckpt_dir, BEST)
        if best is not None and best["epoch"] >= epoch:  # this epoch trained again (after a fallback): the record
            best = None  # names weights no longer there
        if val_loss is not None and math.isfinite(val_loss) and (
                best is None or not isinstance(best.get("val_loss"), (int, float)) or val_loss < best["val_loss"]):
            best = {"checkpoint": path.name, "epoch": epoch, "val_loss": val_loss, "sha256": hashing.sha256.hexdigest()}
            write_json(ckpt_dir / BEST, best)
    except (OSError, RuntimeError) as e:  # a full disk: torch's zip writer says "[enforce fail …] unexpected pos"
        if isinstance(e, RuntimeError) and "inline_container" not in str(e):
            raise
        import shutil

        from pipeline.common.errors import error_message

        why = error_message(e) if isinstance(e, OSError) else (
            f"the write failed with {shutil.disk_usage(ckpt_dir).free / 2**20:.0f} MiB free on its filesystem")
        raise CheckpointError(f"cannot write {path} ({why}); the run resumes after its last saved epoch once the "
                              "same command runs again") from None
    kept = best["checkpoint"] if best else None
    for old in ckpt_dir.glob("epoch-*.pt"):  # by number: past epoch 9999 the names are longer, not later
        if epoch_of(old) < epoch - 1 and old.name != kept:
            old.unlink()
    return path


def student_from_checkpoint(checkpoint: str | Path) -> tuple[Student, dict, Path]:
    """(the student with its trained weights, in eval mode as for inference, the checkpoint, its path) from a
    checkpoint or run folder."""
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
    return model.eval(), ckpt, path


def init_from(model: Student, path: str) -> str:
    """Start ``model`` from the weights of checkpoint ``path`` (or a run folder's latest checkpoint)
    where names and shapes agree.

    Every tensor under the student's ``backbone_prefix`` must be there (a FastSal C hint checkpoint
    starts FastSal A's encoder); returns a line saying what was taken.
    """
    try:
        path = checkpoint_path(path)
        obj = read_weights(path)
    except (WeightsError, CheckpointError) as e:
        raise TrainError(f"--init: {e}") from None
    student, options = obj.get("student"), obj.get("student_options")
    what = f"a {student} checkpoint" if student else "a weights file"
    if isinstance(obj.get("student_model"), dict) and hasattr(model, "variant"):  # the FastSal authors' file
        from students.fastsal import from_authors_keys

        variant = "A" if any(k.startswith("adp1.inv_block") for k in obj["student_model"]) else "C"
        sd, what = from_authors_keys(obj["student_model"], variant), f"the FastSal authors' {variant} file"
        student = f"fastsal_{variant.lower()}"  # of the other variant: its encoder alone, as our checkpoints'
    else:
        sd = obj.get("model", obj)
    own = model.state_dict()
    if student == model.name and (set(sd) != set(own) or any(tuple(sd[k].shape) != tuple(own[k].shape)
                                                              for k in own if k in sd)):
        shaping = {o.name for o in student_info(model.name).options if o.tensors}  # (not --tau, --tile: no tensor)
        differ = ", ".join(f"{k} {options.get(k)!r} there, {v!r} here" for k, v in model.options().items()
                           if isinstance(options, dict) and k in shaping and options.get(k) != v)
        raise TrainError(f"--init {path} is {what} whose tensors are not this run's "
                         f"({differ or 'other names or shapes'}): give this run the same options")
    # another student's checkpoint gives its backbone alone: a tensor of its decoder may match one of ours in
    # name and shape by chance (FastSal C's last hint adapter is FastSal A's), which is no reason to take it
    shared = (lambda k: True) if student in (None, model.name) else (lambda k: k.startswith(model.backbone_prefix))
    take = {k: v for k, v in sd.items() if k in own and shared(k) and tuple(v.shape) == tuple(own[k].shape)}
    part = model.backbone_prefix.rstrip(".") or "backbone"
    missing = [k for k in own if k.startswith(model.backbone_prefix) and k not in take]
    if missing:
        raise TrainError(f"--init {path} ({what}): its {part} does not fit {model.name}'s "
                         f"({len(missing)} tensors missing or of another shape, e.g. {missing[0]})")
    model.load_state_dict(take, strict=False)
    if len(take) == len(own):
        return f"init from {path} ({what}): all {len(own)} tensors"
    return (f"init from {path} ({what}): {len(take)} of {len(own)} tensors, its {part}"
            + ("" if student in (None, model.name) else " alone") + " (the rest keep their initialisation)")
