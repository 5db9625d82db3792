"""The labelling driver: plan shards, skip finished ones, label the rest on Ray (or in-process).

The unit of work, retry and resume is the shard. One Ray actor per GPU (``workers_per_gpu`` of them
sharing it, or ``cpu_workers`` CPU actors when the cluster has no GPU) keeps its teacher loaded; the driver
hands out shards (:mod:`pipeline.label.executors`: where the workers go, and the two ways of running them). The
driver itself never builds a teacher: it resolves and hashes the weights (a missing file fails the run before
any work) and knows the settings every shard records from them (:func:`pipeline.label.config.planned_identity`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipeline.common import images
from pipeline.common.atomic import atomic_path as staged_file, remove_stale_temps, write_json
from pipeline.common.devices import available, resolve_device, use_autocast
from pipeline.common.errors import error_message, root_cause
from pipeline.common.progress import progress as show_progress
from pipeline.common.ray_cluster import connect
from pipeline.common.storage import RemotePath, as_path, local_file, local_place
from pipeline.common.tables import table
from pipeline.label.config import (DECODE_PATHS, LabelConfig, LabelError, OutputRefused, StoreRefused, decode_name,
                                   planned_identity, precision_name, recorded_settings)
from pipeline.label.executors import Placement, cpus_per_gpu, label_here, label_on_ray, place_workers
from pipeline.label.preview import write_preview
from pipeline.label.shards import (ENCODING_VERSION, SOURCE_FIELDS, marker_path, planned_keys, read_marker,
                                   settings_difference, store_versions, tar_path, verify_shard)
from pipeline.label.sources import ImageRecord, ShardPlan, plan_shards
from teachers.registry import teacher_class


@dataclass
class LabelSummary:
    folder: Path
    planned_images: int = 0
    labelled: int = 0
    failed: int = 0
    skipped: int = 0  # images in shards already finished before this run
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: list[str] = field(default_factory=list)
    shard_errors: dict[str, str] = field(default_factory=dict)  # failed shard → why (one line)
    shards_changed: list[str] = field(default_factory=list)  # relabelled or removed by --overwrite-changed
    wall_s: float = 0.0
    failures: list[dict] = field(default_factory=list)
    #: of ``failed``: the failures recorded by shards finished before this run, not tried again (--retry-failed does)
    failed_before: int = 0
    warnings: list[str] = field(default_factory=list)  # what went wrong after the shards, harmlessly
    error: str = ""  # what went wrong after the shards and fails the run (labels.json not written)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.planned_images if self.planned_images else 0.0

    def table(self) -> str:
        rate = self.labelled / self.wall_s if self.wall_s > 0 else 0.0
        rows = [
            ("images labelled", f"{self.labelled}"),
            ("images failed", f"{self.failed} ({100 * self.failure_rate:.2f}%)"
                              + (f", {self.failed_before} of them in shards already done (--retry-failed tries them "
                                 "again)" if self.failed_before else "")),
            ("images skipped (already done)", f"{self.skipped}"),
            ("shards", f"{self.shards_done} written, {self.shards_skipped} already done, "
                       f"{len(self.shards_failed)} failed, {self.shards_total} in all"
                       + (f"; {len(self.shards_changed)} replaced or removed (the source or the settings changed)"
                          if self.shards_changed else "")),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("images/s", f"{rate:.1f}"),
            ("output", str(self.folder)),
        ]
        if not self.error and (self.folder / "preview.png").is_file():  # (where a person looks first)
            rows.append(("preview", f"{self.folder / 'preview.png'} (the first shard's images and labels)"))
        return table(None, rows)


def _lock(folder: Path):
    """Hold an exclusive lock on the output folder for the run (released by the OS on any exit); none on
    object storage, which has no locks: one run at a time there is the user's to keep."""
    if isinstance(folder, RemotePath):
        return None
    f = open(folder / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LabelError(f"another labelling run is writing to {folder}") from None
    return f


def _remove_if_empty(created: list[Path]) -> None:
    """Remove the folders a run created (deepest first) that it left empty but for its lock: a run refused before
    it wrote anything (weights missing, a bad setting) leaves no trace."""
    try:
        if [p.name for p in created[0].iterdir()] == [".lock"]:
            (created[0] / ".lock").unlink()
        for path in created:
            path.rmdir()
    except OSError:  # not empty (something was written), or gone: left as it is
        pass


def prepare_folder(folder: Path) -> None:
    """Create the output folder (a file in its way, or a folder that refuses writes, is an error)."""
    if folder.exists() and not folder.is_dir():
        raise LabelError(f"output path is a file, not a directory: {folder}")
    for parent in folder.parents:
        if parent.exists() and not parent.is_dir():
            raise LabelError(f"output path is a file, not a directory: {parent}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabelError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    if not isinstance(folder, RemotePath) and not os.access(folder, os.W_OK):
        raise LabelError(f"output folder is not writable: {folder}")


class SourceChanged(LabelError):
    """A finished shard holds other images than this run plans for it."""


def _first_difference(plan_keys: list[str], shard_keys: list[str]) -> str:
    for i in range(max(len(plan_keys), len(shard_keys))):
        want = plan_keys[i] if i < len(plan_keys) else None
        have = shard_keys[i] if i < len(shard_keys) else None
        if want != have:
            if want is None:
                return f"the shard also holds {have}, which this run does not plan for it"
            if have is None:
                return f"this run also plans {want}, which the shard does not hold"
            return f"this run plans {want} where the shard holds {have}"
    return "the same keys, one of them twice"


CHANGED_HINT = ("the source changed, or this is another image folder of the same name (a label "
                "folder is <out>/<teacher>/<folder or split name>: give that one another --out); re-run with "
                "--overwrite-changed to relabel only the changed shards, or --overwrite to start over")


@dataclass
class Split:
    """What a run finds in its output folder: finished shards, shards to (re)write, and the rest."""
    done: list[dict] = field(default_factory=list)  # markers of finished shards, reused as they are
    todo: list[ShardPlan] = field(default_factory=list)
    reuse: dict[int, dict] = field(default_factory=dict)  # index → marker: relabel only its failed images
    changed: list[str] = field(default_factory=list)  # finished shards of other images (--overwrite-changed)
    surplus: list[str] = field(default_factory=list)  # finished shards beyond the plan (--overwrite-changed)
    #: beyond the plan, removed: without a whole marker (unfinished), or of failed images alone, all gone since
    strays: list[str] = field(default_factory=list)
    resettled: dict[str, str] = field(default_factory=dict)  # of other settings, relabelled: name -> what differs
    #: finished shards some of whose failed images are gone from the source: their markers as they are now (the
    #: failures and planned keys less those), to be written over the old ones (the tar is unchanged)
    pruned: dict[str, dict] = field(default_factory=dict)


def split_done(plans: list[ShardPlan], folder: Path, identity: dict, *, overwrite_changed: bool = False,
               retry_failed: bool = False, markers: dict[str, dict] | None = None, prune: bool = True) -> Split:
    """Sort the plans into finished shards and shards to do. Labels from other settings are an error, and
    so is a finished shard of other images (the source changed), unless ``overwrite_changed``: then both are
    relabelled (a start-over with new settings that was interrupted carries on so, keeping what it made).

    A shard is finished when its marker's settings and sha256 hold and the images it planned (labelled plus
    failed, as a set) are this plan's; per-image failures are part of a finished shard. ``retry_failed``
    sends finished shards with failures back, to relabel only those images. ``markers``: the folder's whole
    markers by shard name, as :func:`plan_around_finished` read them (else each is read here). ``prune``: drop
    the failed images gone from the source from their markers (not on a folder this run cannot write).
    """
    split = Split()
    expect = {**identity, "encoding_version": ENCODING_VERSION}
    listed = store_versions(folder)
    for plan in plans:
        marker, reason = verify_shard(folder, plan.name, expect, marker=(markers or {}).get(plan.name),
                                      trust_store=True, listed=listed)
        if marker is not None and not reason:
            have = planned_keys(marker)
            had, want = set(have), set(plan.keys)
            # the images it planned, each once, less any gone since that had failed (the tar never held them)
            other = len(had) != len(have) or not (want <= had and had - want <= {
                f["key"] for f in marker.get("failures", [])})
            replaced = "" if other else _replaced(plan, marker, folder)
            if other or replaced:
                if not overwrite_changed:
                    raise SourceChanged(f"{folder / plan.name}.tar " + (
                        f"was labelled from {replaced}" if replaced else
                        f"holds other images than this run plans for it ({_first_difference(plan.keys, have)})")
                        + f": {CHANGED_HINT}")
                split.changed.append(plan.name)
                split.todo.append(plan)
                continue
            gone = had - want  # failed images removed from the source: counted as failures no more
            if gone and prune:
                marker = {**marker, "planned": marker["planned"] - len(gone),
                          "planned_keys": [k for k in have if k not in gone],
                          "failures": [f for f in marker.get("failures", []) if f["key"] not in gone]}
                split.pruned[plan.name] = marker
            if retry_failed and marker.get("failures"):
                split.reuse[plan.index] = marker
                split.todo.append(plan)
            else:
                split.done.append(marker)
            continue
        if marker is not None and "differs" in reason:
            if not overwrite_changed:
                raise LabelError(f"{folder} holds labels made with other settings ({plan.name}: {reason}); "
                                 "use --overwrite-changed to relabel those shards, keeping the ones made with these "
                                 "settings, --overwrite to relabel all, or choose another --out")
            split.changed.append(plan.name)
            split.resettled[plan.name] = reason
        split.todo.append(plan)
    planned = {p.name for p in plans}
    keys = {k for p in plans for k in p.keys}
    for path in sorted(folder.glob("shard-*.json")):
        marker = markers.get(path.stem) if markers is not None else read_marker(folder, path.stem)
        if path.stem not in planned and marker is not None:
            if prune and not marker.get("count") and not keys & set(planned_keys(marker)) and not \
                    settings_difference(marker, expect):  # every image of it failed, and every one is gone
                split.strays.append(path.stem)
                continue
            if not overwrite_changed:
                raise SourceChanged(f"{path} is a shard beyond the {len(plans)} this run plans: {CHANGED_HINT}")
            split.surplus.append(path.stem)
    split.strays += [n for n in beyond_plan(plans, folder) if n not in split.surplus and n not in split.strays]
    return split


def read_markers(folder: Path) -> dict[str, dict]:
    """The whole markers of ``folder``'s shards, by shard name (those :func:`read_marker` reads)."""
    markers = {path.stem: read_marker(folder, path.stem) for path in sorted(folder.glob("shard-*.json"))}
    return {name: m for name, m in markers.items() if m is not None}


def finished_decode(markers: dict[str, dict], identity: dict) -> str | None:
    """Where the photos of the finished shards among ``markers`` that agree with ``identity`` in every other
    setting were decoded, when they all agree on one this version knows (else None): ``--decode auto`` resumes
    a folder on the path its shards were made on, so that a default that changed since does not refuse it."""
    expect = {**identity, "encoding_version": ENCODING_VERSION}
    paths = set()
    for marker in markers.values():
        path = recorded_settings(marker)["decode"]
        if path in DECODE_PATHS and not settings_difference(marker, {**expect, "decode": path}):
            paths.add(path)
    return paths.pop() if len(paths) == 1 else None


def plan_around_finished(records: list[ImageRecord], shard_size: int, folder: Path, identity: dict,
                         markers: dict[str, dict] | None = None) -> tuple[list[ShardPlan], dict[str, dict]]:
    """The shards of ``records``: cut by position (:func:`plan_shards`), but around the shards ``folder`` already
    holds finished with these settings. Each of those keeps the images it planned that are still there, in its
    order, so an image added to or removed from a folder source changes one shard, not the boundary of every
    later one; the images no finished shard planned are cut by position into the indices left free (the gaps
    first, then after the last). With nothing finished, or nothing changed, it is :func:`plan_shards`. Also
    returns the whole markers read, by shard name (:func:`split_done` reads none of them again); ``markers``:
    those, already read (:func:`read_markers`)."""
    expect = {**identity, "encoding_version": ENCODING_VERSION}
    markers = read_markers(folder) if markers is None else markers
    finished = {m["index"]: planned_keys(m) for name, m in markers.items()
                if name == f"shard-{m['index']:06d}" and not settings_difference(m, expect)}
    if not finished:
        return plan_shards(records, shard_size), markers
    by_key = {r.key: r for r in records}
    plans, taken = [], set()
    for index in sorted(finished):
        keys = [k for k in finished[index] if k in by_key and k not in taken]
        if keys:  # (a shard whose images are all gone is beyond the plan)
            plans.append(ShardPlan(index=index, records=tuple(by_key[k] for k in keys)))
            taken.update(keys)
    rest = [r for r in records if r.key not in taken]
    free = (i for i in itertools.count() if i not in finished)
    plans += [ShardPlan(index=next(free), records=tuple(rest[i:i + shard_size]))
              for i in range(0, len(rest), shard_size)]
    return sorted(plans, key=lambda p: p.index), markers


def _replaced(plan: ShardPlan, marker: dict, folder: Path) -> str:
    """"" when every image the marker records still is what it was; else which one was replaced, and how. Its size
    tells most replacements; one of the same size (an uncompressed BMP, TIFF or PPM of the same dimensions) is
    read and its content digest compared, but only when its modification time is not the recorded one. A file
    touched but the same (copied without its times) gets its new time recorded in the marker, so that it is
    read once, not on every run. (The marker alone changes: the tar, ``labels.json`` and so the manifest's
    digest of the folder stay as they are.)"""
    sizes, mtimes, contents = (marker.get(field) or {} for field in SOURCE_FIELDS)
    touched: dict[str, int] = {}
    for record in plan.records:
        if record.key in sizes:
            try:
                st = os.stat(record.path)
            except OSError:
                continue  # gone or unreadable: a per-image failure when labelled, not a change of source
            if st.st_size != sizes[record.key]:
                return f"another version of {record.source_id} ({sizes[record.key]} bytes then, {st.st_size} now)"
            if record.key in contents and mtimes.get(record.key) != st.st_mtime_ns:  # touched since: same bytes?
                try:
                    now = images.content_digest(images.read_file(record.path, max_bytes=None))
                except images.ImageError:
                    continue
                if now != contents[record.key]:
                    return f"another version of {record.source_id} (as many bytes, {st.st_size}, other content)"
                touched[record.key] = st.st_mtime_ns
    if touched:
        try:
            write_json(marker_path(folder, plan.name), {**marker, "mtimes": {**mtimes, **touched}})
        except Exception:  # noqa: BLE001 - a read-only folder, a store that refuses: read again next time
            pass
    return ""


def beyond_plan(plans: list[ShardPlan], folder: Path) -> list[str]:
    """The shards (a marker, a tar or both) of ``folder`` that ``plans`` does not hold, sorted."""
    planned = {p.name for p in plans}
    names = {p.stem for p in folder.glob("shard-*.json")} | {p.stem for p in folder.glob("shard-*.tar")}
    return sorted(n for n in names if n not in planned)


def remove_shard(folder: Path, name: str) -> None:
    """Marker first (a tar without its marker is an unfinished shard), then the tar."""
    marker_path(folder, name).unlink(missing_ok=True)
    tar_path(folder, name).unlink(missing_ok=True)


def label(records: list[ImageRecord], folder: str | Path, config: LabelConfig, *, shard_size: int = 1000,
          overwrite: bool = False, overwrite_changed: bool = False, retry_failed: bool = False,
          executor: str = "ray", address: str | None = None, gpus: int | None = None, cpu_workers: int = 1,
          workers_per_gpu: int | None = None, retries: int = 2, progress: bool = True) -> LabelSummary:
    """Label ``records`` into ``folder``: finished shards are skipped, the rest are (re)done.

    ``workers_per_gpu``: Ray actors sharing each GPU (None: the teacher's ``workers_per_gpu``).
    ``overwrite_changed``: relabel finished shards whose images are not the ones planned (and remove
    finished shards beyond the plan) instead of refusing. ``retry_failed``: relabel the failed images of
    finished shards. Once every shard is finished, ``labels.json`` is written (a failure there is
    ``summary.error``) and ``preview.png`` (a failure there is only a warning).
    """
    folder = local_place(folder) or as_path(folder)  # (file:///abs/path: the local folder, locked as such)
    start = time.perf_counter()
    if workers_per_gpu is None:
        try:
            workers_per_gpu = teacher_class(config.teacher).workers_per_gpu
        except KeyError:  # an unknown teacher: refused below, with the others' names
            workers_per_gpu = 1
    created = [] if isinstance(folder, RemotePath) else [p for p in (folder, *folder.parents) if not p.exists()]
    # a finished folder on a read-only mount (a dataset shared for reading) is checked without writing: no lock
    read_only = not isinstance(folder, RemotePath) and folder.is_dir() and not os.access(folder, os.W_OK)
    if not read_only:
        prepare_folder(folder)
    lock = None if read_only else _lock(folder)
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            summary = _label(records, folder, config, stack, start, read_only=read_only, shard_size=shard_size,
                             overwrite=overwrite,
                             overwrite_changed=overwrite_changed, retry_failed=retry_failed, executor=executor,
                             address=address, gpus=gpus, cpu_workers=cpu_workers, workers_per_gpu=workers_per_gpu,
                             retries=retries, progress=progress)
        finished = True
        return summary
    finally:
        if lock is not None:
            lock.close()
        if not finished and created:
            _remove_if_empty(created)


def _label(records, folder, config: LabelConfig, stack: contextlib.ExitStack, start: float, *, read_only, shard_size,
           overwrite, overwrite_changed, retry_failed, executor, address, gpus, cpu_workers, workers_per_gpu, retries,
           progress) -> LabelSummary:
    if not isinstance(folder, RemotePath) and not read_only:  # remote writes stage locally: no temp names there
        remove_stale_temps(folder)
    plans = plan_shards(records, shard_size)
    resources: dict = {}

    def placement(shards: int | None = None) -> Placement:
        """Where the workers go; on Ray this connects (once) to learn the cluster's GPUs and CPUs."""
        if executor == "ray" and not resources:
            stack.enter_context(connect(address, show=("ShardLabeler",)))
            import ray

            resources.update(ray.cluster_resources(), connected=True,
                             cpus_per_gpu=cpus_per_gpu([n for n in ray.nodes() if n.get("Alive")]))
        return place_workers(config.device, executor=executor, gpus=gpus, cpu_workers=cpu_workers,
                             io_threads=config.io_threads, shards=shards,
                             cluster_gpus=int(resources.get("GPU", 0)), cluster_cpus=int(resources.get("CPU", 0)),
                             cuda_available=executor == "local" and config.device == "auto"
                             and torch.cuda.is_available(), workers_per_gpu=workers_per_gpu,
                             cpus_per_gpu=resources.get("cpus_per_gpu"))

    # the precision the workers will label in and where they decode: only `auto` on Ray GPUs needs the
    # cluster to tell
    use_autocast(torch.device("cpu"), config.precision)  # an unknown --precision is an error here
    if executor == "local":  # a device this machine lacks is an error here, not a change of settings below
        available(resolve_device(config.device))

    def on_gpu() -> bool:
        if executor == "ray" and (config.device == "cpu" or gpus == 0):
            return False
        if executor == "ray" and not (address or os.environ.get("RAY_ADDRESS", "").strip()):
            # the embedded local Ray has this machine's GPUs: no need to start it (finished shards need no Ray)
            return torch.cuda.device_count() > 0
        return placement().device_type == "cuda"

    try:
        gpu_decode = teacher_class(config.teacher).decode_on_gpu
    except KeyError:  # an unknown teacher: refused next, with the others' names
        gpu_decode = True
    gpu = on_gpu() if config.precision == "auto" or (config.decode == "auto" and gpu_decode) else None
    precision = precision_name(config.precision == "bf16" if config.precision != "auto" else gpu)
    decode = own = decode_name(config.decode, bool(gpu), gpu_decode)
    # the weights are resolved and hashed, the teacher is not built: a missing file fails before any work
    identity = planned_identity(config, precision, decode)
    found = None if overwrite else read_markers(folder)
    if config.decode == "auto" and found:  # resumed on the path the finished shards were decoded on
        decode = finished_decode(found, identity) or decode
        identity = {**identity, "decode": decode}
    config = replace(config, decode=decode)  # every worker decodes where the identity says
    if identity["weights_random"]:
        warnings.warn(f"teacher {config.teacher!r} runs with RANDOM weights: its labels are not meaningful "
                      "(marked weights_random in every shard)", stacklevel=3)
    if overwrite:  # every shard written again, each replacing its old one when it is finished: no shard is
        split = Split(todo=list(plans))  # deleted before the run has labelled (a refused run deletes none)
        leftover = beyond_plan(plans, folder)  # ...and those beyond the plan once every new one is there
    else:
        plans, found = plan_around_finished(records, shard_size, folder, identity, found)
        split, leftover = split_done(plans, folder, identity, overwrite_changed=overwrite_changed, prune=not read_only,
                                     retry_failed=retry_failed, markers=found), []
    todo, reuse = split.todo, split.reuse
    if split.resettled:  # said before the work (a setting that resolved otherwise here may mean hours of it)
        n, (first, why) = len(split.resettled), next(iter(split.resettled.items()))
        print(f"note: {n} finished shard{'s' if n > 1 else ''} of {folder} {'were' if n > 1 else 'was'} made with "
              f"other settings ({first}: {why}): relabelling {'them' if n > 1 else 'it'} (--overwrite-changed)",
              file=sys.stderr)
    kept = {m.get("index") for m in split.done}
    larger = sum(1 for p in plans if p.index in kept and len(p.records) > shard_size)
    if larger:  # --shard-size is not a setting of a finished shard's labels: it is kept at its size, and was silently
        many = larger > 1
        print(f"note: {larger} finished shard{'s' if many else ''} of {folder} {'hold' if many else 'holds'} more than "
              f"--shard-size {shard_size} images (labelled with a larger one), kept as made; --overwrite labels every "
              f"image again in shards of {shard_size}", file=sys.stderr)
    if decode != own and todo:
        print(f"note: --decode auto decodes {decode!r}, as the finished shards of {folder} were decoded (on its "
              f"own it would take {own!r}; --decode {'|'.join(DECODE_PATHS)} chooses)", file=sys.stderr)
    if read_only and (todo or split.surplus or split.strays or leftover or split.pruned):
        removed = split.surplus + split.strays + leftover
        n, what = (len(todo), "label") if todo else (len(removed), "remove") if removed else (len(split.pruned),
                                                                                              "update")
        raise LabelError(f"output folder is not writable: {folder} ({n} shard{'' if n == 1 else 's'} to {what})")
    # where the workers go (on Ray: connected, its resources known): a refused run has deleted nothing yet
    where = placement(len(todo)) if todo else None
    if todo or split.surplus or split.strays or split.pruned:
        (folder / "labels.json").unlink(missing_ok=True)  # the dataset is not finished until every shard is
    for name in split.surplus + split.strays:
        remove_shard(folder, name)
    for name, marker in split.pruned.items():  # (its tar as it was: the images gone had failed, it never held them)
        write_json(marker_path(folder, name), marker)
    summary = LabelSummary(folder=folder, planned_images=len(records), shards_total=len(plans),
                           shards_skipped=len(split.done), shards_changed=split.changed + split.surplus)
    for m in split.done:
        summary.skipped += m["planned"]
        summary.failed_before += len(m.get("failures", []))
    kept = sum(len(m["keys"]) for m in reuse.values())
    markers = {m["index"]: m for m in split.done}
    every = max(1, math.ceil(len(todo) / 10))  # progress lines (off a terminal): one per tenth of the shards

    def on_done(plan: ShardPlan, marker: dict | None, error: Exception | None):
        if marker is None:
            cause = root_cause(error)  # (the labeller names a store's refusal as such, in this process or on Ray)
            if isinstance(cause, StoreRefused):  # down, credentials, bucket: every other shard would wait, fail so
                done = len(markers) - len(split.done)
                kept = ("No shard was finished in this run" if not done else
                        f"The {done} shard{'' if done == 1 else 's'} finished in this run "
                        f"{'is' if done == 1 else 'are'} kept")
                raise LabelError(f"shard {plan.name} could not be written to {folder}: {cause}. {kept}: run the same "
                                 "command again"
                                 f"{' without --overwrite' if overwrite else ''} "
                                 + ("once there is room (or write access) there" if isinstance(cause, OutputRefused)
                                    else "when the store answers"))
            summary.shards_failed.append(plan.name)
            summary.shard_errors[plan.name] = error_message(error)
            print(f"shard {plan.name} failed: {summary.shard_errors[plan.name]}", file=sys.stderr)
            return
        markers[plan.index] = marker
        reused = len(reuse[plan.index]["keys"]) if plan.index in reuse else 0
        summary.skipped += reused
        summary.labelled += marker["count"] - reused
        if plan.index in reuse and marker.get("sha256") == reuse[plan.index].get("sha256"):
            summary.shards_skipped += 1  # --retry-failed: its failed images failed again, nothing rewritten
        else:
            summary.shards_done += 1
        bar.set_postfix_str(f"shards {len(markers)}/{len(plans)}")
        finished = len(markers) - len(split.done)
        if finished % every == 0 or len(markers) == len(plans):
            bar.milestone()

    with show_progress(len(records), f"label {identity['teacher']}", initial=summary.skipped + kept,
                       enabled=progress) as bar:
        bar.set_postfix_str(f"shards {len(markers)}/{len(plans)}")
        if todo:
            if where.note:
                warnings.warn(where.note, stacklevel=3)
            run = label_here if executor == "local" else label_on_ray
            run(config, where, identity, todo, reuse, folder, bar, on_done, retries)
    for m in markers.values():
        summary.failures.extend(m.get("failures", []))
    summary.failed = len(summary.failures) + sum(
        len(p.records) for p in plans if p.name in summary.shards_failed)
    if len(markers) == len(plans):
        for name in leftover:  # --overwrite: the old shards beyond the plan, now that the new ones are all there
            remove_shard(folder, name)
        if not isinstance(folder, RemotePath) and not read_only:  # an actor killed mid-shard (out of memory)
            remove_stale_temps(folder)  # left its temp tar; its retry finished the shard (the lock is held)
        finish(folder, plans, markers, identity, summary, read_only=read_only)
    summary.wall_s = time.perf_counter() - start
    return summary


def finish(folder: Path, plans: list[ShardPlan], markers: dict[int, dict], identity: dict,
           summary: LabelSummary, *, read_only: bool = False) -> None:
    """After the last shard: ``labels.json`` (a failure fails the run, with a sentence) and ``preview.png``
    (a failure is a warning: the labels are complete without it). A ``labels.json`` that already says what it
    would say is left as it is, and so is the preview beside it: a finished folder's re-run writes nothing
    (``read_only``: it must not)."""
    index = dataset_index(plans, markers, identity)
    current = read_index(folder) == index
    if current and (folder / "preview.png").is_file():
        return
    if current and read_only:  # the labels are complete; the picture of them cannot be drawn here
        print(f"warning: no {folder / 'preview.png'}: the folder is not writable", file=sys.stderr)
        return
    if read_only:
        summary.error = (f"every shard is finished but {folder / 'labels.json'} is missing or out of date and the "
                         "folder is not writable; run the same command where it is writable to write it")
        return
    try:
        write_json(folder / "labels.json", index)
    except Exception as e:  # noqa: BLE001 - reported as the run's error, the shards stay finished
        summary.error = (f"every shard is finished but {folder / 'labels.json'} could not be written "
                         f"({error_message(e)}); re-run the same command to write it")
        return
    first = next((markers[p.index] for p in plans if markers[p.index]["count"]), None)
    if first is not None:
        try:
            if isinstance(folder, RemotePath):  # made from a local copy of the tar, then uploaded
                with local_file(folder / first["tar"]) as tar, staged_file(folder / "preview.png") as png:
                    write_preview(tar, identity["label_extension"], png)
            else:
                write_preview(folder / first["tar"], identity["label_extension"], folder / "preview.png")
        except Exception as e:  # noqa: BLE001 - the preview is for a person to look at, nothing reads it
            summary.warnings.append(f"preview.png not written: {error_message(e)}")


def dataset_index(plans: list[ShardPlan], markers: dict[int, dict], identity: dict) -> dict:
    """What ``labels.json`` holds: the finished dataset at a glance (shards, counts, settings)."""
    shards = [{"tar": markers[p.index]["tar"], "count": markers[p.index]["count"],
               "sha256": markers[p.index]["sha256"]} for p in plans]
    return {"encoding_version": ENCODING_VERSION, **identity,
            "count": sum(s["count"] for s in shards),
            "failed": sum(len(markers[p.index].get("failures", [])) for p in plans),
            "shards": shards}


def read_index(folder: Path) -> dict | None:
    """The ``labels.json`` of ``folder`` as JSON, or None (none there, unreadable, not JSON)."""
    try:
        return json.loads((folder / "labels.json").read_text())
    except (OSError, ValueError):
        return None


def run_error(summary: LabelSummary, max_failure_rate: float) -> str:
    """Why the run failed, as one sentence ("" when it did not)."""
    if summary.shards_failed:
        reasons = "; ".join(f"{name}: {summary.shard_errors.get(name) or 'failed'}" for name in summary.shards_failed[:5])
        more = f"; and {len(summary.shards_failed) - 5} more" if len(summary.shards_failed) > 5 else ""
        return f"{len(summary.shards_failed)} of {summary.shards_total} shards failed ({reasons}{more})"
    if summary.error:
        return summary.error
    if exit_code(summary, max_failure_rate):
        before, one = summary.failed_before, summary.failed_before == 1
        who = "it" if summary.failed == 1 else "each" if before == summary.failed else f"{before} of them"
        return (f"{summary.failed} of {summary.planned_images} images failed "
                f"(more than --max-failure-rate {max_failure_rate})"
                + (f"; {who} failed in {'a shard' if one or who == 'each' else 'shards'} finished before this run and "
                   f"{'was' if one or who == 'each' else 'were'} not tried again: --retry-failed labels "
                   f"{'it' if one else 'them'} again" if before else ""))
    return ""


def exit_code(summary: LabelSummary, max_failure_rate: float) -> int:
    if summary.shards_failed or summary.error:
        return 1
    return 1 if summary.failure_rate > max_failure_rate and not math.isclose(summary.failure_rate, max_failure_rate) else 0
