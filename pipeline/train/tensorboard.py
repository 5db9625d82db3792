"""TensorBoard event files for a training run, when the ``tensorboard`` package is installed.

``pip install -e '.[tensorboard]'`` (or any ``tensorboard``) makes ``pipeline train`` write
``<run>/tensorboard/events.out.tfevents.*`` beside ``metrics.csv``: after every epoch the same scalars
(train and validation loss, validation CC, KL, NSS, lr, images/s, the student's logged statistics) with
the epoch as the step, and ``maps``: the first :data:`MAPS` validation images, each as image | teacher |
student (maps scaled to their maximum). Without ``tensorboard`` nothing is written and nothing is said.
``tensorboard --logdir runs`` shows every run.

A resumed run purges the events of epochs it trains again (``purge_step``), so an interrupted epoch is
not shown twice; a run starting at epoch 0 (``--restart``) deletes the earlier events. Drawing the maps leaves the random state as it was (a resumed run still reproduces
the uninterrupted one).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.train.config import EpochResult
from students import student_kind, to_log_density

MAPS = 3
FOLDER = "tensorboard"


def _writer(run: Path, first_epoch: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    folder = Path(run) / FOLDER
    if first_epoch == 0:  # a run starting over (or afresh) owns the folder: no events of an earlier run
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
    return SummaryWriter(str(folder), purge_step=first_epoch + 1 if first_epoch else None)  # steps are 1-based epochs


def _heat(log_density: torch.Tensor) -> torch.Tensor:
    """``[1,H,W]`` log density → ``[3,H,W]`` in [0, 1]: the density over its maximum, grey."""
    d = (log_density - log_density.amax()).exp()
    return d.expand(3, -1, -1)


class EpochLogger:
    """Scalars and maps per epoch to TensorBoard (a no-op when tensorboard is not installed)."""

    def __init__(self, run: Path, first_epoch: int = 0):
        self.writer = _writer(run, first_epoch)

    @property
    def active(self) -> bool:
        return self.writer is not None

    def epoch(self, trainer, result: EpochResult) -> None:
        if self.writer is None:
            return
        step = result.epoch + 1
        scalars = {"loss/train": result.train_loss, "loss/val": result.val.get("val_loss"),
                   "val/cc": result.val.get("val_cc"), "val/kl": result.val.get("val_kl"),
                   "val/nss": result.val.get("val_nss"), "lr": result.lr,
                   "images_per_s": result.images / max(result.seconds, 1e-9),
                   **{f"student/{k}": v for k, v in result.logs.items()},
                   **{f"student/val_{k}": result.val.get(f"val_{k}") for k in result.logs}}
        for tag, value in scalars.items():
            if value is not None and value == value:  # NaN: not scored (the hint stage)
                self.writer.add_scalar(tag, float(value), step)
        grid = self._maps(trainer)
        if grid is not None:
            self.writer.add_image("maps (image | teacher | student)", grid, step)
        self.writer.flush()

    @torch.no_grad()
    def _maps(self, trainer) -> torch.Tensor | None:
        if trainer.teacher is not None or not trainer.val_tars:  # the hint stage trains no map
            return None
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batch = next(iter(trainer.loader(trainer.val_tars, 0, train=False)), None)
            if batch is None:
                return None
            images, targets, _ = batch
            images, targets = images[:MAPS].to(trainer.device), targets[:MAPS].to(trainer.device)
            trainer.model.eval()
            try:
                _, logits, _ = trainer.loss(images, targets, train=False)
            finally:
                trainer.model.train()
        kind = trainer.labels.label_kind
        teacher = to_log_density(targets.float(), kind).cpu()
        student = to_log_density(logits.float(), student_kind(kind)).cpu()
        rows = [torch.cat([img.cpu().float() / 255.0, _heat(t), _heat(s)], dim=2)
                for img, t, s in zip(images, teacher, student)]
        return torch.cat(rows, dim=1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
