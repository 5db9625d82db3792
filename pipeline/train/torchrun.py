"""``torchrun --nproc-per-node N -m pipeline train …``: the training loop data parallel without Ray.

torchrun (PyTorch's launcher) starts N copies of the command with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set. Each copy joins one ``torch.distributed`` group (NCCL with GPU
``cuda:LOCAL_RANK`` when the device is CUDA, else Gloo on CPUs) and runs the loop of :mod:`pipeline.train.loop`
as a Ray Train worker does: DistributedDataParallel, the shards split by rank, process 0 validating, logging
and checkpointing into the run folder. Process 0 also does what the Ray driver does: it holds the run folder's
lock and checks the shards' sha256 once, before any process reads them. For one machine with several GPUs and
no Ray; torchrun's ``--nnodes``/``--rdzv-endpoint`` stretch it over machines that share the run folder (or
use a URL).
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta

from pipeline.train.config import EpochResult, TrainConfig, TrainError


class PeerFailed(TrainError):
    """Another process says why the run cannot start (process 0, or the one of the first missing GPU); this one
    stops quietly."""


def launched() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when torchrun (or any launcher setting its variables) started this
    process as one of several; else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"])), world
    except (KeyError, ValueError):
        return None


def device_for(device: str, local_rank: int) -> str:
    """This process's device: ``cuda:LOCAL_RANK`` (one GPU per process) for ``cuda``/``cuda:N``, and for
    ``auto`` on a machine with GPUs; else the CPU."""
    import torch  # (here, not at import: the command line reads :func:`launched` before any command imports torch)

    kind = device.split(":")[0]
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if kind not in ("cuda", "auto"):
        raise TrainError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank > have:
        raise PeerFailed("")  # the process of the first missing GPU says why, once per machine
    if local_rank == have:
        if not have:
            raise TrainError(f"--device {device} under torchrun: this machine has no GPU; use --device cpu (Gloo)")
        raise TrainError(f"--device {device} under torchrun: process {local_rank} of this machine needs GPU "
                         f"cuda:{local_rank} (one per process) but the machine has {have}; start at most {have} per "
                         f"machine (--nproc-per-node {have}), or use --device cpu (Gloo)")
    return f"cuda:{local_rank}"


def train_with_torchrun(config: TrainConfig, *, restart: bool = False, progress: bool = True,
                        verify: bool = True) -> list[EpochResult]:
    """Run this process's part of a torchrun-launched data-parallel training; returns the epochs (process 0's;
    the others return none)."""
    import torch
    import torch.distributed as dist

    from pipeline.common.storage import is_url
    from pipeline.train.data import verify_shards
    from pipeline.train.loop import Trainer, lock_run, train

    rank, local_rank, _ = launched()
    config = replace(config, device=device_for(config.device, local_rank))
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.device)
    # 30 minutes for a collective, Ray Train's default: the others wait in one while process 0 checks the shards
    # (minutes on COCO, more from a store) and, each epoch, validates and saves (NCCL's own default is 10)
    dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo", timeout=timedelta(minutes=30))
    lock = None
    try:
        failure = None
        if rank == 0:
            try:
                *_, shards = Trainer.check(config)
                lock = None if is_url(config.run) else lock_run(config.run)
                if verify:
                    verify_shards(shards)
            except Exception as e:  # noqa: BLE001 - told to the others, then raised here as it was
                failure = e
        said = [None if failure is None else str(failure)]
        dist.broadcast_object_list(said, src=0)  # every process starts, or none does
        if failure is not None:
            raise failure
        if said[0] is not None:
            raise PeerFailed(said[0])
        return train(config, restart=restart, progress=progress, verify=False, lock=False)
    finally:
        if lock is not None:
            lock.release()
        dist.destroy_process_group()
