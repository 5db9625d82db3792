"""What a training run is: its settings, its result per epoch, and its one error type."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

STAGES = ("finetune", "hint")


class TrainError(Exception):
    """Training cannot start or go on (bad labels, a checkpoint from other settings…)."""


@dataclass
class TrainConfig:
    labels: tuple[str, ...]  # finished label folders of one teacher, read in order
    run: str
    student: str = "fastsal_a"
    student_options: dict = field(default_factory=dict)  # the student builder's options (e.g. SACT's tau)
    stage: str = "finetune"  # finetune | hint
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (15, 30, 60)
    gamma: float = 0.1
    batch_size: int = 32
    val_shards: int = 1  # without val_labels: the last shards of the last label folder are held out
    val_labels: str | None = None  # a label folder to validate on instead (e.g. val2017's)
    shuffle_buffer: int = 1000
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on GPU) | off | bf16
    backbone_weights: str = "imagenet"
    init: str | None = None  # a checkpoint whose weights start this stage (e.g. the hint stage's)
    teacher: str | None = None  # hint stage: the teacher run online for hint targets
    teacher_weights: str | None = None
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # density teachers: KL, 1-cos, BCE
    gt_maps: str | None = None  # a folder of human saliency maps: Eq. 2's ground-truth term (map teachers)
    steps_per_epoch: int | None = None  # cap (demos, tests)
    max_bad_samples: int = 10  # unreadable samples skipped (each logged) before the run stops

    def resume_key(self) -> dict:
        """Settings a checkpoint must share to be resumed (the rest may change, e.g. epochs)."""
        d = asdict(self)
        for k in ("epochs", "workers", "device", "steps_per_epoch", "run", "init", "backbone_weights",
                  "max_bad_samples"):
            d.pop(k)
        if d["gt_maps"] is None:  # (as runs from before --gt-maps recorded it: not at all)
            d.pop("gt_maps")
        return json.loads(json.dumps(d))


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val: dict = field(default_factory=dict)
    lr: float = 0.0
    seconds: float = 0.0  # training (validation is not in it: images / seconds is the training rate)
    images: int = 0  # of every process (data-parallel runs: world × each one's)
    logs: dict = field(default_factory=dict)  # the student's logged statistics, means over the epoch
