"""What the manifest runner knows about each ``pipeline`` command: one table entry per command.

Adding a command to manifests (train, eval…) means adding one :class:`CommandSpec` to
:data:`COMMANDS`: where its outputs go when the manifest does not say, which folder is "the
step's output" (what ``${steps.NAME.out}`` names), how to tell that folder is complete, the digest
of its content (what the steps below it are fingerprinted with), which lock file keeps a second
writer out of it, which options do not change the outputs, which arguments make it start over
instead of resuming, and which settings it may grow without starting over.
A command without an entry can still be used in a manifest: its outputs are just not verified
and ``${steps.NAME.out}`` cannot name it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from pipeline.common.locks import LOCK_NAME
from pipeline.common.storage import RemotePath, as_path
from pipeline.label.shards import digest, verify_dataset
from pipeline.label.sources import IMAGE_SUFFIXES, hidden, pipeline_outputs
from pipeline.score.serving import DEFAULT_CALIBRATION_IMAGES
from pipeline.train.checkpoints import (LATEST, CheckpointError, epoch_of, latest, latest_record, load_checkpoint,
                                         load_resumable)


@dataclass(frozen=True)
class CommandSpec:
    #: option (click name) -> value from (workdir, step name), set when the manifest leaves the option out
    defaults: Mapping[str, Callable[[Path, str], object]] = field(default_factory=dict)
    #: the step's output folder from its validated click parameters (``ctx.params``)
    output: Callable[[Mapping[str, object]], Path] | None = None
    #: (output folder, check checksums) -> "" when the folder holds complete outputs, else why not
    verify: Callable[[Path, bool], str] | None = None
    #: options that do not change the outputs (how, where or how loudly it runs): not in the fingerprint
    volatile: frozenset[str] = frozenset()
    #: options added to the command after steps of it were recorded, with the value that keeps the command's
    #: earlier behaviour: left out of the fingerprint while at that value, so adding an option re-runs nothing
    added: Mapping[str, object] = field(default_factory=dict)
    #: arguments that make the command start over rather than resume; added when the step's fingerprint
    #: changed since its last run, or it is forced
    fresh: tuple[str, ...] = ()
    #: arguments used instead of ``fresh`` when the start-over is not forced (the step's settings or inputs
    #: changed): the command keeps what its output already holds of the new settings and redoes the rest, so a
    #: start-over interrupted at any point carries on by the same arguments (``label --overwrite-changed``)
    changed: tuple[str, ...] = ()
    #: the settings whose change ``changed`` redoes (its outputs record them, or they change what is read); a
    #: change of any other setting starts over with ``fresh``
    redoes: frozenset[str] = frozenset()
    #: the digest of a complete output's content ("kind:hex"): the steps below it are fingerprinted with it
    digest: Callable[[Path], str] | None = None
    #: the same digest taken from what a complete output records of itself, without reading its content (a
    #: run's ``latest.json`` sha256, a label folder's index), or None where it records none: compared on every
    #: plan, so an output that a command run by hand has changed since the step made it is noticed without
    #: ``--checksums``
    recorded_digest: Callable[[Path], str | None] | None = None
    #: the lock file the command holds on its output while it writes it (another process holding it: the step
    #: does not start)
    lock: Callable[[Path], Path] | None = None
    #: settings that may grow with the command carrying on from where it stopped (``train``'s epochs): a step
    #: whose only change is a larger value resumes instead of starting over
    grows: tuple[str, ...] = ()
    #: options that take an fsspec URL (``s3://…``) as well as a local path; a URL anywhere else is refused
    urls: frozenset[str] = frozenset()
    #: (output folder) -> whether the command can carry on from what an incomplete output holds; when it
    #: cannot, the step starts over (``fresh``) instead of failing on every run (None: it always can)
    resumes: Callable[[Path], bool] | None = None
    #: (output folder) -> (the folder holding the finished pieces of its output, their name pattern): shard
    #: markers, checkpoints. A start-over interrupted after it wrote one carries on instead of starting over again
    #: (:func:`made_since`)
    pieces: Callable[[Path | RemotePath], tuple[Path | RemotePath, str]] | None = None
    #: (validated click parameters) -> {option: (path, digest of what the command reads there, or None when it
    #: is missing)}: inputs the command reads that the manifest need not declare (a folder source's images)
    reads: Callable[[Mapping[str, object]], dict[str, tuple[str, Callable[[], str | None]]]] | None = None
    #: (validated click parameters) -> the options whose local paths must exist, as the command's own
    #: ``must_exist`` checks them when it starts: ``pipeline run`` checks them before it starts any step
    #: (one not made by an upstream step), so that a mistyped path is not found after hours of its upstream work
    must_exist: Callable[[Mapping[str, object]], tuple[str, ...]] | None = None


def _label_output(params: Mapping[str, object]) -> Path | RemotePath:
    if params["source"] == "coco":
        name = str(params["split"])
    else:
        if params.get("images") is None:
            raise ValueError("source 'folder' needs images: DIR")
        name = Path(params["images"]).resolve().name  # as `pipeline label` names it
    return as_path(params["out"]) / str(params["teacher"]) / name


def _listing(folder: Path, skip: Callable[[], set[str]] = set) -> str | None:
    """Every file with an image suffix below ``folder`` (its subfolders in ``skip()`` and the hidden files and folders
    left out, as a folder source leaves them), by name, size and mtime; None when the folder is missing."""
    if not folder.is_dir():
        return None
    left_out = skip()
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):  # an os.walk and a stat per image: 1e5 images in about a second
        dirs[:] = sorted(d for d in dirs
                         if not hidden(d) and os.path.realpath(os.path.join(root, d)) not in left_out)
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES or hidden(name):
                continue
            path = os.path.join(root, name)
            try:
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, folder)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            except OSError:  # a broken link: a per-image failure when labelled
                h.update(f"{os.path.relpath(path, folder)}\0-\0".encode())
    return "images:" + h.hexdigest()


def _label_reads(params: Mapping[str, object]) -> dict[str, tuple[str, Callable[[], str | None]]]:
    """A folder source's images: every file with an image suffix below it (as `pipeline label` lists them, its
    own label folders and other runs' outputs left out), by name, size and mtime: an image added, removed or
    replaced makes the step stale. (For a COCO source, declare its annotation file in ``inputs``.)"""
    if params["source"] != "folder" or params.get("images") is None:
        return {}
    images = Path(params["images"])

    def label_folders() -> set[str]:  # (and other runs' outputs there, which `pipeline label` leaves out too)
        from teachers.registry import available

        outputs = {os.path.realpath(p) for p in pipeline_outputs(images)}
        return outputs if "://" in str(params["out"]) else outputs | {
            os.path.realpath(Path(str(params["out"])) / t) for t in available()}

    return {"images": (str(images), lambda: _listing(images, label_folders))}


def _train_reads(params: Mapping[str, object]) -> dict[str, tuple[str, Callable[[], str | None]]]:
    """``--gt-maps``' human maps (a local folder; on object storage, declare it in ``inputs``), as a folder
    source's images: a map added, removed or replaced makes the step stale."""
    maps = params.get("gt_maps")
    if maps is None or "://" in str(maps):
        return {}
    return {"gt_maps": (str(maps), lambda: _listing(Path(str(maps))))}


def _verify_train(run: Path | RemotePath, checksums: bool) -> str:
    """A run folder is complete when its latest checkpoint is the last epoch of the settings it recorded."""
    try:
        record = latest_record(run / "checkpoints")
    except CheckpointError as e:
        return str(e)
    config = run / "config.json"
    if record is None or not config.is_file():
        return f"no finished epoch in {run}"
    try:
        epochs = int(json.loads(config.read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):  # cut short, emptied or edited: made again
        return f"{config} is not the settings `pipeline train` writes"
    epoch, path = record["epoch"], run / "checkpoints" / record["checkpoint"]
    if epoch + 1 < epochs:
        return f"{epoch + 1} of {epochs} epochs trained"
    if not path.is_file():
        return f"checkpoint named by {run / 'checkpoints' / LATEST} is missing"
    if checksums:  # against the sha256 latest.json records (an older run's records none: read whole instead)
        if record.get("sha256"):
            if digest(path) != record["sha256"]:
                return f"{path} is not the checkpoint {LATEST} recorded (its sha256 differs)"
            return ""
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            return str(e)
    return ""


def pieces_now(spec: CommandSpec, output: Path | RemotePath) -> dict[str, str] | None:
    """For an output on object storage: its finished pieces as the store has them now (name → version), to be
    recorded when a start-over begins; None for a local output, whose files' mtimes say when they were written."""
    if spec.pieces is None or not isinstance(output, RemotePath):
        return None
    folder, pattern = spec.pieces(output)
    return folder.versions(pattern)


def made_since(spec: CommandSpec, output: Path | RemotePath, since: float, before: dict[str, str] | None) -> bool:
    """Whether the command wrote a finished piece of ``output`` after its start-over began: a local file written
    at or after ``since`` (seconds); on object storage, a piece that is not the version recorded at the start
    (``before``: the store's clock, not this machine's, says when)."""
    if spec.pieces is None:
        return False
    folder, pattern = spec.pieces(output)
    if isinstance(output, RemotePath):
        return before is not None and any(before.get(n) != v for n, v in folder.versions(pattern).items())
    for path in folder.glob(pattern):
        try:
            if path.stat().st_mtime >= since:
                return True
        except OSError:
            continue
    return False


def _train_resumes(run: Path | RemotePath) -> bool:
    """Whether some checkpoint of the run folder can be resumed from (`pipeline train` takes the newest that can)."""
    for path in sorted((run / "checkpoints").glob("epoch-*.pt"), key=epoch_of, reverse=True):
        try:
            load_resumable(path)
            return True
        except CheckpointError:
            continue
    return False


def _verify_file(path: Path, checksums: bool) -> str:
    return "" if path.is_file() else f"{path} not written"


def _verify_json(path: Path | RemotePath, checksums: bool) -> str:
    """A JSON report (eval's metrics, profile's): there, and an object (one emptied or cut short is made again)."""
    if not path.is_file():
        return f"{path} not written"
    try:
        ok = isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    return "" if ok else f"{path} is not the JSON object the command writes"


def _verify_predict(out: Path, checksums: bool) -> str:
    """A file of maps (.npz, .h5), or a folder of them finished by its ``predictions.json``."""
    if out.is_file():
        return ""
    mark = out / "predictions.json"
    return _verify_json(mark, checksums) if mark.is_file() else f"{out} not complete"


def _digest_label(folder: Path) -> str:
    """What a label folder holds: its index's shards (tar, images, sha256) and label settings."""
    index = json.loads((folder / "labels.json").read_text())
    doc = {k: index.get(k) for k in ("teacher", "weights_digest", "label_kind", "label_extension", "image_size",
                                      "count")}
    doc["shards"] = [[s["tar"], s["count"], s["sha256"]] for s in index["shards"]]
    return "labels:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _recorded_digest_train(run: Path | RemotePath) -> str | None:
    """A run folder's latest checkpoint by the sha256 its ``latest.json`` records (None for an older run's, which
    records none)."""
    record = latest_record(run / "checkpoints") or {}
    return "checkpoint:" + record["sha256"] if record.get("sha256") else None


def _digest_train(run: Path | RemotePath) -> str:
    """:func:`_recorded_digest_train`, written by the step that has just finished; an older run's checkpoint is
    read."""
    return _recorded_digest_train(run) or "checkpoint:" + digest(latest(run / "checkpoints"))


def _digest_file(path: Path | RemotePath) -> str:
    return "sha256:" + digest(path)


def _digest_tree(path: Path | RemotePath) -> str:
    """A file, or every file of a folder (names and contents)."""
    if path.is_file():
        return _digest_file(path)
    h = hashlib.sha256()
    for rel, p in _tree(path):
        h.update(rel.encode() + b"\0" + digest(p).encode() + b"\0")
    return "tree:" + h.hexdigest()


def _tree(path: Path | RemotePath) -> Iterator[tuple[str, Path | RemotePath]]:
    """(relative name, file) of every file under ``path``: a local folder's walked folder by folder, in sorted
    order; an object-storage folder's sorted by name."""
    if isinstance(path, RemotePath):
        yield from sorted((f.relative_to(path), f) for f in path.files())
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(root, name)
            yield p.relative_to(path).as_posix(), p


def _lock_file(folder: Path | RemotePath) -> Path | None:
    """The lock ``label``, ``train`` and ``predict`` hold on a local output folder (object storage has none)."""
    return None if isinstance(folder, RemotePath) else folder / LOCK_NAME


_MODEL_VOLATILE = frozenset({"device", "precision", "batch_size", "io_threads", "progress"})
#: --runtime onnx-int8's options (stop 10): absent, a step runs as before
_CALIBRATION_ADDED = {"calibration": None, "calibration_images": DEFAULT_CALIBRATION_IMAGES}

COMMANDS: dict[str, CommandSpec] = {
    "label": CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step},
        output=_label_output,
        verify=lambda folder, checksums: verify_dataset(folder, check_digest=checksums),
        volatile=frozenset({"executor", "address", "gpus", "workers_per_gpu", "cpu_workers", "io_threads",
                            "retries", "max_failure_rate", "progress", "overwrite_changed", "retry_failed"}),
        added={"allow_outside_root": False, "max_image_bytes": 64 * 1024**2, "decode": "auto"},
        fresh=("--overwrite",),
        changed=("--overwrite-changed",),
        # in every marker (weights by digest; device and precision as the precision, decode as the path used), or
        # where the images come from and go to (another folder: nothing there to keep); batch_size changes nothing.
        # Not shard_size (finished shards keep their images), max_image_bytes, allow_outside_root: --overwrite
        redoes=frozenset({"weights", "image_size", "jpeg_quality", "device", "precision", "decode", "batch_size",
                          "source", "coco_root", "split", "images", "teacher", "out"}),
        digest=_digest_label,
        recorded_digest=_digest_label,  # (its index: the shards' sha256s as labelling recorded them)
        urls=frozenset({"out"}),
        lock=_lock_file,  # `pipeline label` holds an flock on <folder>/.lock
        pieces=lambda folder: (folder, "shard-*.json"),
        reads=_label_reads,
        must_exist=lambda params: ("coco_root",) if params["source"] == "coco" else ("images",),
    ),
    "train": CommandSpec(
        defaults={"run_dir": lambda workdir, step: workdir / step},
        output=lambda params: as_path(params["run_dir"]),
        verify=_verify_train,
        volatile=frozenset({"workers", "device", "address", "progress", "verify", "max_bad_samples"}),
        fresh=("--restart",),
        digest=_digest_train,
        recorded_digest=_recorded_digest_train,
        lock=_lock_file,  # pipeline.train.loop.run_lock
        grows=("epochs",),
        added={"gt_maps": None},
        urls=frozenset({"run_dir", "labels", "val_labels", "init_ckpt", "gt_maps"}),
        reads=_train_reads,
        must_exist=lambda params: ("labels", "val_labels", "gt_maps"),  # (--init: only read when not resuming)
        resumes=_train_resumes,
        pieces=lambda run: (run / "checkpoints", "epoch-*.pt"),
    ),
    "eval": CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step / "metrics.json"},
        output=lambda params: as_path(params["out"]),
        verify=_verify_json,
        volatile=_MODEL_VOLATILE - {"precision"},
        digest=_digest_file,
        urls=frozenset({"checkpoint", "labels", "fixations", "out"}),
        must_exist=lambda params: ("labels", "fixations"),
    ),
    "predict": CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step},
        output=lambda params: as_path(params["out"]),
        verify=_verify_predict,
        volatile=_MODEL_VOLATILE - {"precision"},
        added=_CALIBRATION_ADDED,
        digest=_digest_tree,
        urls=frozenset({"checkpoint", "out"}),
        lock=_lock_file,  # pipeline.score.predict: a png folder's
        must_exist=lambda params: ("images", "calibration"),
    ),
    "fixations": CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step / "fixations.h5"},
        output=lambda params: as_path(params["out"]),
        verify=_verify_file,
        digest=_digest_file,
        urls=frozenset({"out"}),
        must_exist=lambda params: ("root",),
    ),
    "export": CommandSpec(  # (without an entry, a deleted .onnx was never made again: its step stayed up to date)
        defaults={"out": lambda workdir, step: workdir / step / "model.onnx"},
        output=lambda params: as_path(params["out"]),
        verify=_verify_file,
        digest=_digest_file,
        urls=frozenset({"checkpoint", "out"}),
        must_exist=lambda params: ("calibration",),
    ),
    "profile": CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step / "profile.json"},
        output=lambda params: as_path(params["out"]),
        verify=_verify_json,
        added={**_CALIBRATION_ADDED, "images": None, "max_images": 100},  # --images: stop 14
        digest=_digest_file,
        urls=frozenset({"checkpoint", "images", "out"}),
        must_exist=lambda params: ("images", "calibration"),
    ),
}
