"""Where and how the shards of a labelling run are labelled: the placement of the workers (pure), and the two
executors that hand them shards: in this process, or on Ray actors (one per GPU, or several sharing one, or CPU
actors), each keeping its teacher loaded and decoding its next shard while it finishes the current one.

A shard that fails is retried (``retries`` times; an actor that died is replaced), then recorded as failed
through ``on_done``; the driver (:mod:`pipeline.label.driver`) writes the markers' index and the summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.common.devices import resolve_device
from pipeline.common.errors import error_message, root_cause, strip_ansi
from pipeline.common.tables import plural
from pipeline.label.config import LabelConfig, LabelError, StoreRefused
from pipeline.label.sources import ShardPlan
from pipeline.label.worker import ShardLabeler


def pending_images(plan: ShardPlan, reuse: dict[int, dict]) -> int:
    """Images of ``plan`` this run labels (all, or only the failed ones of a shard it reuses)."""
    return len(plan.records) - len(reuse[plan.index]["keys"]) if plan.index in reuse else len(plan.records)


@dataclass(frozen=True)
class Placement:
    """Where the labelling workers run: what each is handed as ``--device``, and how many of them."""
    device: str  # the device string each worker resolves (a Ray GPU actor's own GPU is its cuda:0)
    device_type: str  # cuda or cpu: what --precision auto resolves on
    workers: int = 1
    options: dict = field(default_factory=dict)  # ray.remote(...) resources of one actor ({} in-process)
    note: str = ""  # a sentence for the user when the device asked for is not the one used as given


def cpus_per_gpu(nodes: list[dict]) -> float | None:
    """The fewest CPUs per GPU of the nodes (``ray.nodes()`` entries) that have GPUs; None when none has."""
    shares = [r.get("CPU", 0) / r["GPU"] for r in (n.get("Resources") or {} for n in nodes) if r.get("GPU", 0) > 0]
    return min(shares) if shares else None


def place_workers(device: str, *, executor: str, gpus: int | None = None, cpu_workers: int = 1,
                  io_threads: int = 4, shards: int | None = None, cluster_gpus: int = 0, cluster_cpus: int = 0,
                  cuda_available: bool = False, workers_per_gpu: int = 1,
                  cpus_per_gpu: float | None = None) -> Placement:
    """Pure: where the workers of a run with ``--device device`` go.

    In-process (``executor="local"``) the one worker gets ``device`` as given (``cuda:1`` stays GPU 1 of
    this machine; ``auto`` is CUDA when ``cuda_available``). On Ray, GPU actors are used when the cluster
    has GPUs, ``device`` is not ``cpu`` and ``gpus`` is not 0: one actor per GPU (``gpus`` of them, at most
    the cluster's), each reserving one GPU, which Ray makes its only visible one, so every actor is handed
    ``cuda`` (``cuda:N`` names a GPU of the driver's machine and means nothing inside an actor), and the CPUs
    its I/O threads use (``io_threads``, at most the cluster's CPUs per GPU). ``workers_per_gpu`` actors
    share each GPU (each reserving that fraction of it and of its CPUs): one worker process keeps about two
    cores busy (its main thread and its one tar-writing thread are single stages), which a light teacher on
    a fast GPU outruns. Otherwise ``cpu_workers`` CPU actors. Never more workers than ``shards``.

    ``cpus_per_gpu``: the fewest CPUs per GPU of a node that has GPUs (None: not known). A GPU actor reserves its
    CPUs on its GPU's node, so where the cluster's CPUs are elsewhere (a CPU-only head beside GPU nodes), the
    cluster-wide share would ask a GPU node for more CPUs than it has, and the actor would wait for ever.
    """
    kind = None if device == "auto" else resolve_device(device).type  # an unknown device is an error here
    if executor == "local":
        return Placement(device=device, device_type=kind or ("cuda" if cuda_available else "cpu"))
    cap = (lambda n: max(1, min(n, shards))) if shards is not None else (lambda n: max(1, n))
    if device != "cpu" and gpus != 0 and cluster_gpus > 0:
        used = min(gpus if gpus is not None else cluster_gpus, cluster_gpus)
        k = max(1, workers_per_gpu)
        notes = [f"--device {device}: on Ray each GPU actor labels on the one GPU Ray gives it (its cuda:0), not on "
                 "that GPU of this machine" if device.startswith("cuda:") and device != "cuda:0" else "",
                 f"--gpus {gpus}: the Ray cluster has {plural(cluster_gpus, 'GPU')}, labelling on {used}"
                 if gpus is not None and gpus > cluster_gpus else ""]
        if cluster_cpus and used * k > cluster_cpus:  # each actor holds a CPU: more would wait for one for ever
            k = max(1, cluster_cpus // used)
            notes.append(f"{workers_per_gpu} workers per GPU: the Ray cluster has {cluster_cpus} CPUs for {used} "
                         f"GPUs, labelling with {k} per GPU")
        if cpus_per_gpu is not None and k > max(1, int(cpus_per_gpu)):  # ... on its GPU's node
            k = max(1, int(cpus_per_gpu))
            notes.append(f"{workers_per_gpu} workers per GPU: the Ray cluster's GPU nodes have {cpus_per_gpu:g} CPUs "
                         f"per GPU, labelling with {k} per GPU")
        cpus = max(1, min(io_threads, cluster_cpus // (cluster_gpus * k) if cluster_cpus else io_threads,
                          int(cpus_per_gpu // k) if cpus_per_gpu is not None else io_threads))
        return Placement(device="cuda", device_type="cuda", workers=cap(used * k),
                         options={"num_gpus": 1 / k, "num_cpus": cpus}, note="; ".join(n for n in notes if n))
    workers = min(cpu_workers, cluster_cpus) if cluster_cpus else cpu_workers  # each actor holds a CPU at least
    cpus = max(1, min(io_threads // 2, cluster_cpus // max(1, workers) if cluster_cpus else io_threads))
    notes = [f"--device {device}: the Ray cluster has no GPU, labelling on {workers} CPU actor(s)"
             if device.startswith("cuda") and gpus != 0 else
             f"--gpus {gpus}: the Ray cluster has no GPU, labelling on {workers} CPU actor(s)"
             if gpus and device != "cpu" else
             f"--gpus {gpus}: --device cpu labels on {workers} CPU actor(s)" if gpus else "",
             f"--cpu-workers {cpu_workers}: the Ray cluster has {cluster_cpus} CPUs, labelling on {workers} CPU actors"
             if workers < cpu_workers else ""]
    return Placement(device="cpu", device_type="cpu", workers=cap(workers), options={"num_cpus": cpus},
                     note="; ".join(n for n in notes if n))


def label_here(config: LabelConfig, placement: Placement, identity: dict, todo, reuse, folder, bar, on_done,
               retries):
    """Label ``todo`` in this process, with one labeller on ``config``'s device (``placement`` is for
    :func:`label_on_ray`'s signature: in-process, the device is the one asked for)."""
    labeler = ShardLabeler(config)
    try:
        if labeler.identity() != identity:
            raise LabelError("the labeller would label with other settings than planned: "
                             f"{_differences(labeler.identity(), identity)}")
        for i, plan in enumerate(todo):
            following = todo[i + 1] if i + 1 < len(todo) else None  # decoded while this shard finishes
            for attempt in range(retries + 1):
                counted = []  # the images this attempt showed as done: taken back when it fails

                def progress(n: int) -> None:
                    counted.append(n)
                    bar.update(n)

                try:
                    marker = labeler.label_shard(plan, folder, progress=progress, reuse=reuse.get(plan.index),
                                                 next_plan=following)
                except Exception as e:  # noqa: BLE001 - a shard-level failure is retried, then recorded
                    bar.update(-sum(counted))
                    if attempt == retries:
                        bar.update(pending_images(plan, reuse))  # counted once, as done (failed), as on Ray
                        on_done(plan, None, e)
                    continue
                on_done(plan, marker, None)
                break
    finally:
        labeler.close()


def _differences(have: dict, want: dict) -> str:
    return ", ".join(f"{k} {have.get(k)!r} (expected {want.get(k)!r})" for k in sorted(set(have) | set(want))
                     if have.get(k) != want.get(k))


def _start_error(error: Exception) -> str:
    """What made a Ray actor's ``__init__`` fail: Ray gives its traceback as text, whose last line is the error
    (``teachers.weights.WeightsError: cannot read …`` → ``cannot read …``)."""
    lines = [line.strip() for line in strip_ansi(str(error)).splitlines() if line.strip()]
    if "creation task" in (lines[0] if lines else "") and len(lines) > 1:
        return re.sub(r"^(?:[A-Za-z_][\w]*\.)+[A-Za-z_]\w*(?:Error|Exception): ", "", lines[-1])
    return error_message(error)


class RayShardLabeler:
    """A :class:`ShardLabeler` as a Ray actor. A failure to start (weights that do not load) is kept as its
    sentence and handed to the driver by :meth:`started`, not raised from ``__init__``: Ray would print that
    traceback on the driver's terminal before the run's one error line."""

    def __init__(self, config: LabelConfig):
        self.labeler, self.failure = None, ""
        try:
            self.labeler = ShardLabeler(config)
        except Exception as e:  # noqa: BLE001 - reported by started(), as one line
            self.failure = error_message(e)

    def started(self) -> tuple[dict | None, str]:
        """(the identity it labels with, "") once its teacher is built; (None, why) when it could not start."""
        return (None, self.failure) if self.labeler is None else (self.labeler.identity(), "")

    def label_shard(self, *args, **kwargs) -> dict:
        if self.labeler is None:  # (a replacement of an actor that died, which could not start either)
            raise LabelError(f"the labelling worker could not start: {self.failure}")
        return self.labeler.label_shard(*args, **kwargs)


def label_on_ray(config: LabelConfig, placement: Placement, identity: dict, todo, reuse, folder, bar, on_done,
                 retries):
    """Label ``todo`` on ``placement.workers`` Ray actors, after checking that each built the teacher the shards
    are planned with (``identity``); a shard goes to the actor that decoded it ahead when it can."""
    import ray

    actor_cls = ray.remote(**placement.options)(RayShardLabeler)
    actor_config = LabelConfig(**{**config.__dict__, "device": placement.device})
    actors = [actor_cls.remote(actor_config) for _ in range(placement.workers)]
    try:  # every actor built its teacher and labels with the settings the shards are checked against
        started = ray.get([a.started.remote() for a in actors])
    except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
        raise LabelError(f"the labelling workers could not start: {_start_error(e)}") from None
    failed = next((why for _, why in started if why), "")
    if failed:
        raise LabelError(f"the labelling workers could not start: {failed}")
    for have, _ in started:
        if have != identity:
            raise LabelError(f"a labelling worker would label with other settings than planned: "
                             f"{_differences(have, identity)}")
    queue = list(todo)
    attempts: dict[int, int] = {}
    running = {}
    idle = list(actors)
    promised: dict[int, int] = {}  # id(actor) → index of the shard it decodes ahead and gets next
    # shards the store refused (down, credentials): tried again before any other, and nothing new is started
    # meanwhile, so that a store that is down stops the run after one shard's retries (each waits for the store's
    # own retries), as in-process, not after every queued shard has waited for it in turn
    refused: set[int] = set()

    def take(actor) -> ShardPlan:
        mine = promised.pop(id(actor), None)
        others = set(promised.values())
        plan = next((p for p in queue if p.index in refused), None) or next(
            (p for p in queue if p.index == mine), None) or next(
            (p for p in queue if p.index not in others), queue[0])  # the last shards: another's promise is taken
        queue.remove(plan)
        return plan

    def promise(actor) -> ShardPlan | None:
        others = set(promised.values())
        following = next((p for p in queue if p.index not in others), None)
        if following is not None:
            promised[id(actor)] = following.index
        return following

    while queue or running:
        while queue and idle and (not refused or any(p.index in refused for p in queue)):
            actor = idle.pop()
            plan = take(actor)
            running[actor.label_shard.remote(plan, str(folder), reuse=reuse.get(plan.index),
                                             next_plan=promise(actor))] = (plan, actor)
        ready, _ = ray.wait(list(running), num_returns=1)
        plan, actor = running.pop(ready[0])
        try:
            marker = ray.get(ready[0])
            refused.clear()  # the store answers
            bar.update(pending_images(plan, reuse))
            on_done(plan, marker, None)
            idle.append(actor)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            attempts[plan.index] = attempts.get(plan.index, 0) + 1
            if isinstance(e, ray.exceptions.RayActorError):  # the actor died: replace it
                actor = actor_cls.remote(actor_config)
            idle.append(actor)
            if isinstance(root_cause(e), StoreRefused):
                refused.add(plan.index)
            else:
                refused.discard(plan.index)
            if attempts[plan.index] <= retries:
                queue.append(plan)
            else:
                refused.discard(plan.index)  # given up: it no longer holds back the others
                bar.update(pending_images(plan, reuse))
                on_done(plan, None, e)
