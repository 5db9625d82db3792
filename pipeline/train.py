"""Training a student from labelled shards: hint pretraining and fine-tuning, resumable exactly.

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, epoch, step, RNG states)
under ``<run>/checkpoints/``; re-running the same command resumes after the last finished epoch
and, on CPU, reproduces the uninterrupted run's losses (an epoch's data order depends only on the
seed and the epoch). Per-step losses go to ``losses.csv``, per-epoch validation against the
teacher's held-out labels (CC, KL, NSS) to ``metrics.csv``, both to ``curves.png``.

The same loop runs as one process (the default) or as one process per worker of a
``torch.distributed`` group (:mod:`pipeline.train_ray` starts them with Ray Train): then the model is
wrapped in DistributedDataParallel, each worker reads its own shards (``webdataset.split_by_node``)
for the same number of steps, and worker 0 alone validates, logs and checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.atomic import atomic_open, write_json
from pipeline.data import (check_same_labels, epoch_order, node_shards, open_label_set, open_label_sets,
                           shard_loader, split_shards)
from pipeline.labeler import resolve_device
from students import STUDENTS, normalize
from students.losses import density_teacher_loss, hint_loss, map_teacher_loss
from teachers.weights import WeightsError, load_state_dict

EPS = 2.2204e-16
LOSS_HEADER = ["epoch", "step", "global_step", "loss"]
#: training losses are read back from the device (and logged) every this many steps
LOG_EVERY = 25


class TrainError(Exception):
    """Training cannot start (bad labels, a checkpoint from other settings…)."""


@dataclass
class TrainConfig:
    labels: tuple[str, ...]  # finished label folders of one teacher, read in order
    run: str
    student: str = "fastsal_a"
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
    steps_per_epoch: int | None = None  # cap (demos, tests)

    def resume_key(self) -> dict:
        """Settings a checkpoint must share to be resumed (the rest may change, e.g. epochs)."""
        d = asdict(self)
        for k in ("epochs", "workers", "device", "steps_per_epoch", "run", "init", "backbone_weights"):
            d.pop(k)
        return json.loads(json.dumps(d))


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val: dict = field(default_factory=dict)
    lr: float = 0.0
    seconds: float = 0.0
    images: int = 0


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


def agreement(logits: torch.Tensor, target: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-image CC, KL and NSS of the student against the teacher's label (``kind``: the label's kind).

    Both become densities over pixels, as ``eval`` and ``predict`` see them (:func:`to_log_density`).
    NSS is its expectation under fixations drawn from the teacher's density: Σ p_teacher · standardised map.
    """
    from pipeline.predictors import student_kind, to_log_density

    s = to_log_density(logits, student_kind(kind)).flatten(1).exp()
    t = to_log_density(target, kind).flatten(1).exp()
    sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    cc = (sc * tc).sum(1) / (sc.norm(dim=1) * tc.norm(dim=1)).clamp_min(EPS)
    kl = (t * torch.log(EPS + t / (s + EPS))).sum(1)
    nss = (t * sc / s.std(1, unbiased=False, keepdim=True).clamp_min(EPS)).sum(1)
    return {"cc": cc, "kl": kl, "nss": nss}


def init_from(model: torch.nn.Module, path: str) -> str:
    """Start ``model`` from the weights of checkpoint ``path`` (or a run folder's latest checkpoint)
    where names and shapes agree.

    The encoder must be there in full (a FastSal C hint checkpoint starts FastSal A's encoder);
    returns a line saying what was taken.
    """
    from pipeline.predictors import PredictorError, checkpoint_path

    try:
        path = checkpoint_path(path)
        obj = load_state_dict(path)
    except (WeightsError, PredictorError) as e:
        raise TrainError(f"--init: {e}") from None
    sd = obj.get("model", obj)
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing_encoder = [k for k in own if k.startswith("encoder.") and k not in take]
    if missing_encoder:
        raise TrainError(f"--init {path}: its encoder does not fit ({len(missing_encoder)} tensors missing or of "
                         f"another shape, e.g. {missing_encoder[0]}); is it a FastSal checkpoint?")
    model.load_state_dict(take, strict=False)
    return f"init from {path}: {len(take)} of {len(own)} tensors (the rest keep their initialisation)"


class HintView(torch.nn.Module):
    """The student's adapted features as its forward pass (what DistributedDataParallel wraps in the hint stage)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.student.adapted_features(x)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group this process is in, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = c = config
        self.labels, self.train_tars, self.val_tars = self.check(c)
        self.run = Path(c.run)
        self.ckpt_dir = self.run / "checkpoints"
        self.device = resolve_device(c.device)
        self.amp = self.device.type == "cuda" and c.amp in ("auto", "bf16")
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        random.seed(c.seed)
        self.rank, self.world = _distributed()
        self.model = STUDENTS[c.student](backbone_weights=c.backbone_weights if not c.init else "none")
        self.init_note = init_from(self.model, c.init) if c.init else f"backbone: {c.backbone_weights}"
        self.model.to(self.device)
        #: the stage's forward pass: the student (its logits) or its adapted features; ``forward`` is what a
        #: training step calls (DDP-wrapped when distributed), ``local_forward`` what worker 0 validates with
        self.local_forward = self.forward = HintView(self.model) if c.stage == "hint" else self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # the hint stage leaves the student's head out of the graph
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=ids,
                                                                     find_unused_parameters=c.stage == "hint")
        self.teacher = None
        if c.stage == "hint":
            from teachers import build_teacher

            self.teacher = build_teacher(c.teacher, weights=c.teacher_weights).to(self.device).eval()
            self.teacher.requires_grad_(False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(c.milestones), c.gamma)
        self.epoch, self.global_step = 0, 0

    @staticmethod
    def check(c: TrainConfig):
        """Refuse bad settings with one clear error; returns (label set, training tars, validation tars)."""
        if c.student not in STUDENTS:
            raise TrainError(f"unknown student {c.student!r}; known: {', '.join(sorted(STUDENTS))}")
        if c.stage not in ("finetune", "hint"):
            raise TrainError(f"unknown stage {c.stage!r} (finetune or hint)")
        if c.stage == "hint" and c.student != "fastsal_c":
            raise TrainError(f"{c.student} has no hint stage: its adaptation widths differ from the teacher's "
                             "features; hint-pretrain fastsal_c and start from its checkpoint with --init")
        if c.stage == "hint" and not c.teacher:
            raise TrainError("the hint stage needs --teacher (its intermediate features are the targets)")
        labels = open_label_sets(c.labels)
        h, w = labels.image_size
        if h % 32 or w % 32:
            raise TrainError(f"{labels.folder} holds {h}x{w} images; FastSal needs height and width in "
                             "multiples of 32 (label with --image-size 192x256, the paper's)")
        if c.val_labels:
            val = open_label_set(c.val_labels)
            check_same_labels(labels, val)
            train, val_tars = list(labels.tars), list(val.tars)
        else:
            train, val_tars = split_shards(labels.tars, c.val_shards)
        if c.amp == "bf16" and resolve_device(c.device).type != "cuda":
            raise TrainError("--amp bf16 needs a GPU; use --amp off on CPU")
        return labels, train, val_tars

    # -- checkpoints -----------------------------------------------------------------------
    def resume(self) -> bool:
        latest = self.ckpt_dir / "latest.json"
        if not latest.is_file():
            return False
        path = self.ckpt_dir / json.loads(latest.read_text())["checkpoint"]
        ckpt = load_checkpoint(path)
        mine = self.config.resume_key()
        if ckpt["config"] != mine:
            diff = sorted(k for k in set(ckpt["config"]) | set(mine) if ckpt["config"].get(k) != mine.get(k))
            raise TrainError(f"{path} was trained with other settings ({', '.join(diff)}); "
                             "use another --run or --restart")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.global_step = ckpt["epoch"] + 1, ckpt["global_step"]
        set_rng_state(ckpt["rng"])
        return True

    def save(self, epoch: int) -> Path:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / f"epoch-{epoch:04d}.pt"
        ckpt = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": epoch, "global_step": self.global_step,
                "rng": rng_state(), "config": self.config.resume_key(), "student": self.config.student,
                "stage": self.config.stage,
                "labels": {"teacher": self.labels.teacher, "kind": self.labels.label_kind,
                           "image_size": list(self.labels.image_size)}}
        with atomic_open(path, "wb") as f:
            torch.save(ckpt, f)
        write_json(self.ckpt_dir / "latest.json", {"checkpoint": path.name, "epoch": epoch})
        for old in self.ckpt_dir.glob("epoch-*.pt"):  # keep the last two
            if old.name < f"epoch-{epoch - 1:04d}.pt":
                old.unlink()
        return path

    # -- one batch -------------------------------------------------------------------------
    def loss(self, images: torch.Tensor, targets: torch.Tensor,
             train: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's loss, and the student's logits when the stage computes them (``train``: through the
        distributed wrapper; else the bare student, as worker 0 validates alone)."""
        x = normalize(images)
        forward = self.forward if train else self.local_forward
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            if self.teacher is not None:
                with torch.no_grad():
                    hints = [h.float() for h in self.teacher.hint_features(images)]
                feats = [f.float() for f in forward(x)]
                try:
                    return hint_loss(feats, hints), None
                except ValueError as e:
                    raise TrainError(f"teacher {self.config.teacher!r} cannot give {self.config.student}'s hint "
                                     f"targets ({e}); the hint stage follows the paper with --teacher salgan") from None
            logits = forward(x).float()
        if self.labels.label_kind == "log_density":
            return density_teacher_loss(logits, targets, self.config.loss_weights), logits
        return map_teacher_loss(logits, targets), logits

    def loader(self, tars, epoch: int, train: bool):
        c = self.config
        return shard_loader(self.labels, tars, batch_size=c.batch_size, epoch=epoch, seed=c.seed,
                            shuffle_buffer=c.shuffle_buffer if train else 0, workers=c.workers,
                            split_nodes=train, pin_memory=self.device.type == "cuda")

    def steps(self, epoch: int) -> int | None:
        """The cap on an epoch's steps: ``steps_per_epoch``, and when distributed the full batches of the
        worker with the fewest images (every worker must take the same number of steps)."""
        caps = [self.config.steps_per_epoch] if self.config.steps_per_epoch else []
        if self.world > 1:
            order = epoch_order(self.train_tars, seed=self.config.seed, epoch=epoch,
                                shuffle=bool(self.config.shuffle_buffer))
            fewest = min(self.labels.images_in(node_shards(order, r, self.world)) for r in range(self.world))
            if fewest < self.config.batch_size:
                raise TrainError(f"{self.world} workers leave one with {fewest} images, less than a batch of "
                                 f"{self.config.batch_size}: use fewer workers or smaller shards")
            caps.append(fewest // self.config.batch_size)
        return min(caps) if caps else None

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, cc, kl, nss (summed over images)
        n = 0
        for images, targets, _ in self.loader(self.val_tars, 0, train=False):
            images, targets = images.to(self.device), targets.to(self.device)
            loss, logits = self.loss(images, targets, train=False)
            sums[0] += loss.double() * len(images)
            if logits is not None:  # the hint stage trains no head: its maps are not scored
                a = agreement(logits, targets, self.labels.label_kind)
                sums[1:] += torch.stack([a["cc"].sum(), a["kl"].sum(), a["nss"].sum()]).double()
            n += len(images)
        self.model.train()
        if self.teacher is not None:
            sums[1:] = float("nan")
        loss, cc, kl, nss = (sums / max(n, 1)).tolist()
        return {"val_loss": loss, "val_cc": cc, "val_kl": kl, "val_nss": nss}

    def train_epoch(self, epoch: int, bar, log_file) -> tuple[float, int]:
        """One epoch; each step's loss goes to ``log_file``, read back from the device every
        :data:`LOG_EVERY` steps (and at the first step of the epoch) so the GPU is not synchronised per step."""
        self.model.train()
        log = csv.writer(log_file, lineterminator="\n")
        pending: list[tuple[int, int, torch.Tensor, int]] = []  # (step, global step, loss, batch size)
        total, n, last = 0.0, 0, float("nan")

        def flush():
            nonlocal total, n, last
            values = torch.stack([p[2] for p in pending]).tolist()
            for (step, global_step, _, size), value in zip(pending, values):
                log.writerow((epoch, step, global_step, f"{value:.8g}"))
                total, n, last = total + value * size, n + size, value
            log_file.flush()  # readable while training runs
            pending.clear()
            bar.set_postfix_str(f"epoch {epoch + 1}/{self.config.epochs} loss {last:.4f}")

        cap = self.steps(epoch)
        for step, (images, targets, _) in enumerate(self.loader(self.train_tars, epoch, train=True)):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, _ = self.loss(images, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            pending.append((step, self.global_step, loss.detach(), len(images)))
            if step == 0 or len(pending) >= LOG_EVERY:
                flush()
            bar.update(len(images))
            if cap is not None and step + 1 >= cap:
                break
        if pending:
            flush()
        return total / max(n, 1), n


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint of this module (tensors, numbers and strings only: read with ``weights_only``)."""
    try:
        ckpt = load_state_dict(path)
    except WeightsError as e:
        raise TrainError(str(e)) from None
    if "model" not in ckpt or "student" not in ckpt:
        raise TrainError(f"{path} is not a checkpoint of `pipeline train` (no 'model'/'student')")
    return ckpt


def _keep_rows(path: Path, header: list[str], before_epoch: int) -> None:
    """Rewrite ``path`` atomically with its rows of epochs before ``before_epoch`` (an interrupted
    epoch's rows are dropped: that epoch runs again)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            if next(reader, None) == header:
                rows = [r for r in reader if r and int(r[0]) < before_epoch]
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def plot_curves(run: Path) -> Path:
    """``curves.png``: training loss per step and validation metrics per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(run / "losses.csv", newline="") as f:
        losses = list(csv.DictReader(f))
    with open(run / "metrics.csv", newline="") as f:
        metrics = list(csv.DictReader(f))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    axes[0].plot([int(r["global_step"]) for r in losses], [float(r["loss"]) for r in losses], lw=0.8)
    axes[0].set(title="training loss", xlabel="step")
    epochs = [int(r["epoch"]) + 1 for r in metrics]
    for ax, key in zip(axes[1:], ["val_cc", "val_kl", "val_nss"]):
        ax.plot(epochs, [float(r[key]) for r in metrics], marker="o")
        ax.set(title=f"validation {key[4:].upper()} vs teacher", xlabel="epoch")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    with atomic_open(run / "curves.png", "wb") as f:
        f.write(buf.getvalue())
    return run / "curves.png"


def train(config: TrainConfig, *, restart: bool = False, progress: bool = True) -> list[EpochResult]:
    """Train (or resume training) as ``config`` says; returns the epochs run by this call.

    In a torch.distributed group every worker calls this; worker 0 writes the logs and checkpoints.
    """
    trainer = Trainer(config)
    run, lead = trainer.run, trainer.rank == 0
    if lead:
        run.mkdir(parents=True, exist_ok=True)
        if restart:
            for p in [*trainer.ckpt_dir.glob("*"), run / "losses.csv", run / "metrics.csv", run / "curves.png"]:
                p.unlink(missing_ok=True)
    _barrier(trainer.world)
    resumed = trainer.resume()
    val_header = ["epoch", "train_loss", "val_loss", "val_cc", "val_kl", "val_nss", "lr", "seconds", "images"]
    if lead:
        write_json(run / "config.json", asdict(config))
        print(f"resuming {run} after epoch {trainer.epoch} (step {trainer.global_step})" if resumed
              else trainer.init_note, file=sys.stderr)
        _keep_rows(run / "losses.csv", LOSS_HEADER, trainer.epoch)
        _keep_rows(run / "metrics.csv", val_header, trainer.epoch)
    results = []
    per_epoch = trainer.labels.images_in(trainer.train_tars) // trainer.world
    if trainer.steps(trainer.epoch):
        per_epoch = min(per_epoch, trainer.steps(trainer.epoch) * config.batch_size)
    with tqdm(total=max(1, per_epoch) * (config.epochs - trainer.epoch), unit="img", disable=not (progress and lead),
              desc=f"train {config.student} ({config.stage})", file=sys.stderr, dynamic_ncols=True) as bar, \
            open(run / "losses.csv" if lead else os.devnull, "a", newline="") as losses:
        for epoch in range(trainer.epoch, config.epochs):
            t0 = time.perf_counter()
            lr = trainer.optimizer.param_groups[0]["lr"]
            train_loss, n = trainer.train_epoch(epoch, bar, losses)
            trainer.scheduler.step()
            if lead:
                os.fsync(losses.fileno())
                val = trainer.validate()
                result = EpochResult(epoch, train_loss, val, lr, time.perf_counter() - t0, n)
                with open(run / "metrics.csv", "a", newline="") as f:
                    csv.writer(f, lineterminator="\n").writerow(
                        [epoch, f"{train_loss:.6g}", *(f"{val[k]:.6g}" for k in val_header[2:6]), f"{lr:.6g}",
                         f"{result.seconds:.2f}", n * trainer.world])
                    f.flush()
                    os.fsync(f.fileno())
                trainer.save(epoch)  # last: a checkpoint means the epoch's logs are written
                plot_curves(run)
                results.append(result)
            else:
                trainer.epoch = epoch + 1
            _barrier(trainer.world)
    return results


def summary_table(results: list[EpochResult]) -> str:
    if not results:
        return "nothing to do: every epoch is already trained"
    keys = list(results[0].val)
    head = ["epoch", "train_loss", *keys, "lr", "seconds", "img/s"]
    rows = [[str(r.epoch + 1), f"{r.train_loss:.4f}", *(f"{r.val[k]:.4f}" for k in keys), f"{r.lr:.2g}",
             f"{r.seconds:.1f}", f"{r.images / max(r.seconds, 1e-9):.1f}"] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), *map(line, rows)])
