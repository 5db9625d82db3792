"""The labelling driver: plan shards, skip finished ones, label the rest on Ray (or in-process).

The unit of work, retry and resume is the shard. One Ray actor per GPU (or ``cpu_workers`` CPU
actors when the cluster has no GPU) keeps its teacher loaded; the driver hands out shards.
"""

from __future__ import annotations

import fcntl
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.common.atomic import remove_stale_temps, write_json
from pipeline.common.tables import table
from pipeline.label.worker import LabelConfig, ShardLabeler
from pipeline.label.preview import write_preview
from pipeline.label.shards import ENCODING_VERSION, verify_shard
from pipeline.label.sources import ImageRecord, ShardPlan, plan_shards


class LabelError(Exception):
    """The run cannot start (bad output folder, conflicting earlier labels…)."""


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
    wall_s: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.planned_images if self.planned_images else 0.0

    def table(self) -> str:
        rate = self.labelled / self.wall_s if self.wall_s > 0 else 0.0
        rows = [
            ("images labelled", f"{self.labelled}"),
            ("images failed", f"{self.failed} ({100 * self.failure_rate:.2f}%)"),
            ("images skipped (already done)", f"{self.skipped}"),
            ("shards", f"{self.shards_done} written, {self.shards_skipped} already done, "
                       f"{len(self.shards_failed)} failed, {self.shards_total} in all"),
            ("wall time", f"{self.wall_s:.1f} s"),
            ("images/s", f"{rate:.1f}"),
            ("output", str(self.folder)),
        ]
        return table(None, rows)


def _lock(folder: Path):
    """Hold an exclusive lock on the output folder for the run (released by the OS on any exit)."""
    f = open(folder / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LabelError(f"another labelling run is writing to {folder}") from None
    return f


def prepare_folder(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise LabelError(f"output path is a file, not a directory: {folder}")
    for parent in folder.parents:
        if parent.exists() and not parent.is_dir():
            raise LabelError(f"output path is a file, not a directory: {parent}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabelError(f"cannot create output folder {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK):
        raise LabelError(f"output folder is not writable: {folder}")
    if overwrite:
        for p in list(folder.glob("shard-*.tar")) + list(folder.glob("shard-*.json")) + [folder / "labels.json"]:
            p.unlink(missing_ok=True)


def split_done(plans: list[ShardPlan], folder: Path, identity: dict) -> tuple[list[dict], list[ShardPlan]]:
    """Markers of finished shards, and the plans still to do. Labels from other settings are an error."""
    done, todo = [], []
    expect = {**identity, "encoding_version": ENCODING_VERSION}
    for plan in plans:
        marker, reason = verify_shard(folder, plan.name, expect)
        if marker is not None and not reason:
            if marker.get("keys", []) + [f["key"] for f in marker.get("failures", [])] != plan.keys:
                # identical settings but other images: the source changed under the same folder
                raise LabelError(f"{folder / plan.name}.json lists other images than this run plans; "
                                 "the source changed: use --overwrite or another --out")
            done.append(marker)
            continue
        if marker is not None and "differs" in reason:
            raise LabelError(f"{folder} holds labels made with other settings ({plan.name}: {reason}); "
                             "use --overwrite to replace them or choose another --out")
        todo.append(plan)
    return done, todo


def _run_local(labeler: ShardLabeler, todo, folder, bar, on_done, retries):
    for plan in todo:
        for attempt in range(retries + 1):
            try:
                on_done(plan, labeler.label_shard(plan, folder, progress=bar.update), None)
                break
            except Exception as e:  # noqa: BLE001 - a shard-level failure is retried, then recorded
                if attempt == retries:
                    on_done(plan, None, e)


def _run_ray(config: LabelConfig, todo, folder, bar, on_done, retries, address, gpus, cpu_workers):
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 configure_logging=False, **({} if address or os.environ.get("RAY_ADDRESS") else
                                             {"object_store_memory": 256 * 1024**2}))
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = config.device != "cpu" and cluster_gpus > 0
    n = min(gpus if gpus is not None else cluster_gpus, cluster_gpus) if use_gpu else cpu_workers
    if use_gpu and gpus == 0:
        use_gpu, n = False, cpu_workers
    n = max(1, min(n, len(todo)))
    options = {"num_gpus": 1} if use_gpu else {"num_cpus": max(1, config.io_threads // 2)}
    actor_cls = ray.remote(**options)(ShardLabeler)
    actor_config = config if use_gpu else LabelConfig(**{**config.__dict__, "device": "cpu"})
    actors = [actor_cls.remote(actor_config) for _ in range(n)]
    queue = list(todo)
    attempts: dict[int, int] = {}
    running = {}
    idle = list(actors)
    while queue or running:
        while queue and idle:
            plan, actor = queue.pop(0), idle.pop()
            running[actor.label_shard.remote(plan, str(folder))] = (plan, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        plan, actor = running.pop(ready[0])
        try:
            marker = ray.get(ready[0])
            bar.update(marker["planned"])
            on_done(plan, marker, None)
            idle.append(actor)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            attempts[plan.index] = attempts.get(plan.index, 0) + 1
            if isinstance(e, ray.exceptions.RayActorError):  # the actor died: replace it
                actor = actor_cls.remote(actor_config)
            idle.append(actor)
            if attempts[plan.index] <= retries:
                queue.append(plan)
            else:
                bar.update(len(plan.records))
                on_done(plan, None, e)


def label(records: list[ImageRecord], folder: str | Path, config: LabelConfig, *, shard_size: int = 1000,
          overwrite: bool = False, executor: str = "ray", address: str | None = None, gpus: int | None = None,
          cpu_workers: int = 1, retries: int = 2, progress: bool = True) -> LabelSummary:
    """Label ``records`` into ``folder``: finished shards are skipped, the rest are (re)done."""
    folder = Path(folder)
    start = time.perf_counter()
    prepare_folder(folder, overwrite)
    lock = _lock(folder)
    try:
        remove_stale_temps(folder)
        plans = plan_shards(records, shard_size)
        # build the teacher here first: a missing weights file fails before any work starts
        labeler = ShardLabeler(config if executor == "local" else LabelConfig(**{**config.__dict__, "device": "cpu"}))
        identity = labeler.identity()
        if identity["weights_random"]:
            warnings.warn(f"teacher {config.teacher!r} runs with RANDOM weights: its labels are not meaningful "
                          "(marked weights_random in every shard)", stacklevel=2)
        done, todo = split_done(plans, folder, identity)
        summary = LabelSummary(folder=folder, planned_images=len(records), shards_total=len(plans),
                               shards_skipped=len(done))
        for m in done:
            summary.skipped += m["planned"]
        markers = {m["index"]: m for m in done}

        def on_done(plan: ShardPlan, marker: dict | None, error: Exception | None):
            if marker is None:
                summary.shards_failed.append(plan.name)
                print(f"shard {plan.name} failed: {type(error).__name__}: {str(error).splitlines()[0]}",
                      file=sys.stderr)
                return
            markers[plan.index] = marker
            summary.shards_done += 1
            summary.labelled += marker["count"]
            bar.set_postfix_str(f"shards {len(markers)}/{len(plans)}")

        with tqdm(total=len(records), initial=summary.skipped, unit="img", disable=not progress,
                  dynamic_ncols=True, desc=f"label {identity['teacher']}", file=sys.stderr) as bar:
            bar.set_postfix_str(f"shards {len(markers)}/{len(plans)}")
            if todo:
                if executor == "local":
                    _run_local(labeler, todo, folder, bar, on_done, retries)
                else:
                    _run_ray(config, todo, folder, bar, on_done, retries, address, gpus, cpu_workers)
        labeler.close()
        for m in markers.values():
            summary.failures.extend(m.get("failures", []))
        summary.failed = len(summary.failures) + sum(
            len(p.records) for p in plans if p.name in summary.shards_failed)
        if len(markers) == len(plans):
            write_index(folder, plans, markers, identity)
            first = next((markers[p.index] for p in plans if markers[p.index]["count"]), None)
            if first is not None:
                write_preview(folder / first["tar"], identity["label_extension"], folder / "preview.png")
        summary.wall_s = time.perf_counter() - start
        return summary
    finally:
        lock.close()


def write_index(folder: Path, plans: list[ShardPlan], markers: dict[int, dict], identity: dict) -> None:
    """``labels.json``: the finished dataset at a glance (shards, counts, settings)."""
    shards = [{"tar": markers[p.index]["tar"], "count": markers[p.index]["count"],
               "sha256": markers[p.index]["sha256"]} for p in plans]
    write_json(folder / "labels.json", {
        "encoding_version": ENCODING_VERSION, **identity,
        "count": sum(s["count"] for s in shards),
        "failed": sum(len(markers[p.index].get("failures", [])) for p in plans),
        "shards": shards,
    })


def exit_code(summary: LabelSummary, max_failure_rate: float) -> int:
    if summary.shards_failed:
        return 1
    return 1 if summary.failure_rate > max_failure_rate and not math.isclose(summary.failure_rate, max_failure_rate) else 0
