"""``pipeline train --ray-workers N``: the training loop of :mod:`pipeline.train.loop` on N Ray Train workers.

Ray Train's ``TorchTrainer`` starts one process per worker (one GPU each when the cluster has GPUs, else
CPUs: :func:`use_gpus` decides, and refuses ``--device cuda`` on a cluster with fewer GPUs than workers), joins them in a ``torch.distributed`` group (NCCL on GPUs, Gloo on CPUs) and runs
:func:`pipeline.train.train` in each; the loop wraps the student in DistributedDataParallel, splits the
shards by worker and lets worker 0 validate, log and checkpoint into the run folder, so the run folder,
its resume and its outputs are those of a single-process run. On a multi-node cluster (``--address``)
the label folders and the run folder must be on a filesystem every node sees, or URLs on object storage
(``s3://…``: the workers read the shards there, worker 0 mirrors the run folder there and every worker
resumes from it), and this package installed on every node. Needs Ray Train (``pip install 'ray[train]'``).
"""

from __future__ import annotations

import signal
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.common.ray_cluster import RayClusterError, check_given, connect
from pipeline.common.storage import as_path, is_url
from pipeline.train.checkpoints import CheckpointError, latest_record
from pipeline.train.config import EpochResult, TrainConfig, TrainError
from pipeline.train.data import verify_shards
from pipeline.train.logs import curves_behind, plot_curves, read_metrics
from pipeline.train.loop import Trainer, finished_run, lock_run, train


#: Ray Train (2.60) patches ``print`` in its workers to also log each line; with the worker's stderr
#: redirected, as Ray's workers have it, every line then reached the terminal twice
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def _worker(loop_config: dict) -> None:
    """One Ray Train worker: the ordinary training loop on this worker's device."""
    import ray.train.torch

    c = TrainConfig(**loop_config["config"])
    c = replace(c, device=str(ray.train.torch.get_device()), labels=tuple(c.labels), milestones=tuple(c.milestones),
                loss_weights=tuple(c.loss_weights))
    # the driver holds the run folder's lock and verified the shards
    train(c, restart=loop_config["restart"], progress=loop_config["progress"], verify=False, lock=False)


def _absolute(config: TrainConfig) -> TrainConfig:
    """Paths as the workers will see them (Ray Train runs them in another working directory)."""
    def absolute(p):
        return str(Path(p).resolve()) if p and not is_url(p) else p

    def weights(spec):  # a local file (not a name: imagenet, none, random, a known name; not a URL)
        local = spec and "://" not in spec and spec not in ("imagenet", "none", "random") and Path(spec).exists()
        return str(Path(spec).resolve()) if local else spec

    return replace(config, labels=tuple(absolute(p) for p in config.labels), run=absolute(config.run),
                   val_labels=absolute(config.val_labels), init=absolute(config.init),
                   gt_maps=absolute(config.gt_maps), teacher_weights=weights(config.teacher_weights),
                   backbone_weights=weights(config.backbone_weights))


def _finished_epochs(run) -> int:
    try:
        record = latest_record(run / "checkpoints")
    except CheckpointError:
        return 0  # the workers resume from the newest readable checkpoint and say so
    return record["epoch"] + 1 if record is not None else 0


def train_on_ray(config: TrainConfig, *, workers: int, address: str | None = None, restart: bool = False,
                 progress: bool = True, verify: bool = True) -> list[EpochResult]:
    """Train on ``workers`` Ray Train workers (a local Ray unless ``address``); returns this call's epochs.

    This driver holds the run folder's lock for the whole run and checks the shards' sha256 (``verify``) once,
    before any worker starts."""
    try:
        import ray.train.torch  # noqa: F401 - here: one clear error before anything else
    except ImportError as e:
        raise TrainError(f"--ray-workers needs Ray Train ({e}): pip install 'ray[train]'") from None
    try:  # a wrong address or token: said before the shards' check (minutes on COCO) and the model's build
        check_given(address)
    except RayClusterError as e:
        raise TrainError(str(e)) from None
    config = _absolute(config)
    *_, shards = Trainer.check(replace(config, amp="auto"))  # one clear error here, before any worker starts (the
    # workers, not this driver, may have the GPUs that --amp bf16 needs: that is checked on them)
    run = as_path(config.run)
    lock = None if is_url(config.run) else lock_run(run)  # object storage has no lock (see pipeline.train.loop)
    try:
        done = None if restart else finished_run(config)
        if done is not None:  # nothing to train: no Ray Train started (its start-up takes half a minute)
            print(f"resuming {config.run} after epoch {done[0]} (step {done[1]})", file=sys.stderr)
            if lock is not None and curves_behind(run):  # (its last plot never drawn: a kill, a full disk)
                plot_curves(run)
            return []
        if verify:
            verify_shards(shards)
        return _fit(config, run, workers=workers, address=address, restart=restart, progress=progress)
    finally:
        if lock is not None:
            lock.release()


def use_gpus(device: str, workers: int, cluster_gpus: float) -> bool:
    """Whether the ``workers`` Ray Train workers each take a GPU (NCCL) or run on CPUs (Gloo).

    ``--device cpu``: CPUs, whatever the cluster has. ``cuda``/``cuda:N``: GPUs, and a cluster with fewer GPUs
    than workers is refused (silently training on CPUs with Gloo is not what was asked). ``auto``: GPUs when the
    cluster has one per worker, else CPUs."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return False
    if kind == "cuda" and cluster_gpus < workers:
        have = f"{cluster_gpus:g} GPU{'' if cluster_gpus == 1 else 's'}"
        raise TrainError(f"--device {device} with --ray-workers {workers} needs {workers} GPUs (one per worker, NCCL) "
                         f"but the Ray cluster has {have}: use fewer workers, a cluster with more GPUs, or --device cpu "
                         "(Gloo on CPUs)")
    return cluster_gpus >= workers


def _fit(config: TrainConfig, run, *, workers: int, address: str | None, restart: bool,
         progress: bool) -> list[EpochResult]:
    run.mkdir(parents=True, exist_ok=True)
    before = 0 if restart else _finished_epochs(run)
    try:
        with connect(address, show=("RayTrainWorker",), worker_env=WORKER_ENV):
            if is_url(config.run):  # Ray Train's own files stay on this machine, not in the bucket
                with tempfile.TemporaryDirectory(prefix="pipeline-ray-train-") as own:
                    _fit_on_ray(config, workers, restart, progress, Path(own))
            else:
                _fit_on_ray(config, workers, restart, progress, run)
    except RayClusterError as e:
        raise TrainError(str(e)) from None
    return read_metrics(run, from_epoch=before)


def _fit_on_ray(config: TrainConfig, workers: int, restart: bool, progress: bool, run: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    try:
        from ray.train import LoggingConfig  # Ray Train's own messages: errors only
        quiet = {"logging_config": LoggingConfig(log_level="ERROR")}
    except ImportError:
        quiet = {}
    use_gpu = use_gpus(config.device, workers, ray.cluster_resources().get("GPU", 0))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": asdict(config), "restart": restart, "progress": progress},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(run / ".ray"), name="train", **quiet),
    )
    fit_interruptibly(trainer, workers)


def fit_interruptibly(trainer, workers: int) -> None:
    """``trainer.fit()``; a failure is one :class:`TrainError` sentence, and a Ctrl-C that Ray Train's own handler
    took (aborting the run) is raised as KeyboardInterrupt once the run has stopped."""
    interrupted = _heard_sigint(trainer)
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    except SystemExit:  # Ray's handler exits at a third Ctrl-C
        if not interrupted:
            raise
    except Exception as e:  # noqa: BLE001 - Ray wraps the worker's exception; show its last line
        if not interrupted:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise TrainError(f"training on {workers} Ray workers failed: "
                             f"{lines[-1] if lines else type(e).__name__}") from None
    finally:
        signal.signal(signal.SIGINT, previous)  # (Ray leaves its handler behind)
    if interrupted:  # Ray aborted the run: the command says what is kept, and exits 130, as without Ray
        raise KeyboardInterrupt


def _heard_sigint(trainer) -> list:
    """A list that gets an entry when Ctrl-C reaches the driver during ``trainer.fit()``. Ray Train (v2) replaces
    the SIGINT handler there with its own, which aborts the run gracefully and returns (exit status 1, no
    word); ours is wrapped around it, so that the command can end as an interrupted one."""
    heard: list = []
    register = getattr(trainer, "_register_sigint_handler", None)
    if register is None:  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0) or a later Ray: its Ctrl-C handling is its own
        return heard  # (v1 reports the run failed); the hook is this private method of v2's trainer (Ray 2.60)

    def ours(controller):
        register(controller)
        theirs = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            heard.append(signum)
            if callable(theirs):
                theirs(signum, frame)

        signal.signal(signal.SIGINT, handler)

    trainer._register_sigint_handler = ours
    return heard
