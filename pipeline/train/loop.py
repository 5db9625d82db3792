"""Training a student from labelled shards: hint pretraining and fine-tuning, resumable exactly.

Every epoch ends with an atomic checkpoint (model, optimizer, scheduler, epoch, step, RNG states)
under ``<run>/checkpoints/``; re-running the same command resumes after the last finished epoch
and, on CPU, reproduces the uninterrupted run's losses (an epoch's data order depends on the seed, the
epoch and the number of loader workers, which split the shards between them: a resume with another
``--workers`` trains on in another order, and says so).
Per-step losses go to ``losses.csv``, per-epoch validation against the
teacher's held-out labels (CC, KL, NSS) to ``metrics.csv``, both to ``curves.png``.

The same loop runs as one process (the default) or as one process per worker of a
``torch.distributed`` group (:mod:`pipeline.train.ray_train` starts them with Ray Train): then the model is
wrapped in DistributedDataParallel, each worker reads its own shards (``webdataset.split_by_node``)
for the same number of steps, and worker 0 alone validates, logs and checkpoints.

The run folder may be a URL (``--run s3://bucket/runs/a``): the run then trains in a local staging folder that
mirrors it (:class:`pipeline.common.storage.Mirror`): what the URL holds is downloaded first (the resume), and
after every epoch the files that changed are uploaded, checkpoint first and ``checkpoints/latest.json`` last.
Object storage has no exclusive create, so no lock keeps a second ``pipeline train`` out of a run URL: one
run per URL at a time is the user's to keep.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common.atomic import remove_stale_temps, write_json
from pipeline.common.devices import DeviceError, autocast, available, resolve_device, use_autocast
from pipeline.common.locks import LOCK_NAME, FolderLock, process_alive, process_start
from pipeline.common.progress import progress as show_progress
from pipeline.common.storage import Mirror, as_path, is_url, local_place
from pipeline.common.tables import plural
from pipeline.label.shards import enclosing_label_folder
from pipeline.train.checkpoints import (BEST, LATEST, init_from, newest_readable, resumes, rng_state, save_checkpoint,
                                        set_rng_state)
from pipeline.train.config import STAGES, EpochResult, TrainConfig, TrainError
from pipeline.train.data import (BadSamples, SampleError, check_same_labels, epoch_order, first_ground_truth,
                                 node_shards, open_label_set, open_label_sets, shard_loader, split_shards,
                                 verify_shards)
from pipeline.train.logs import (LOSS_HEADER, append_metrics, curves_behind, epoch_note, keep_rows, metrics_header,
                                 plot_curves, recorded_config)
from pipeline.train.tensorboard import EpochLogger
from students import Student, build_student, check_options, student_info, student_kind, to_log_density
from students import available as available_students
from students.base import EPS
from students.losses import density_teacher_loss, hint_loss, map_teacher_loss
from teachers.registry import available as available_teachers, teacher_class

#: training losses are read back from the device (and logged) every this many steps
LOG_EVERY = 25
#: the next epoch's loader starts this many steps before an epoch's last: its worker processes start and decode
#: its first batches while this epoch ends and validation runs (on an H200 a FastSal (A) epoch of 12 steps took
#: 1.95 s from memory and 0.72 s more from shards; a loader's first batch came 0.8-0.9 s after its start on a CPU)
LOOKAHEAD_STEPS = 2


def agreement(logits: torch.Tensor, target: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """Per-image CC, KL and NSS of the student against the teacher's label (``kind``: the label's kind).

    Both become densities over pixels, as ``eval`` and ``predict`` see them (:func:`to_log_density`).
    NSS is its expectation under fixations drawn from the teacher's density: Σ p_teacher · standardised map.
    """
    s = to_log_density(logits, student_kind(kind)).flatten(1).exp()
    t = to_log_density(target, kind).flatten(1).exp()
    sc, tc = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    cc = (sc * tc).sum(1) / (sc.norm(dim=1) * tc.norm(dim=1)).clamp_min(EPS)
    kl = (t * torch.log(EPS + t / (s + EPS))).sum(1)
    nss = (t * sc / s.std(1, unbiased=False, keepdim=True).clamp_min(EPS)).sum(1)
    return {"cc": cc, "kl": kl, "nss": nss}


class StageView(torch.nn.Module):
    """The stage's forward pass as a module (what DistributedDataParallel wraps): the student's hint
    features in the hint stage, else its logits and extra loss terms (:meth:`Student.forward_train`)."""

    def __init__(self, student: Student, stage: str):
        super().__init__()
        self.student, self.stage = student, stage

    def forward(self, x: torch.Tensor):
        return self.student.hint_features(x) if self.stage == "hint" else self.student.forward_train(x)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group this process is in, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def same_steps(batches: Iterator, steps: int, again: Callable[[], Iterator]) -> Iterator:
    """Exactly ``steps`` batches: those of ``batches``, then, should they end first, those of ``again()`` (the
    epoch read anew) as often as it takes. Data-parallel workers must take the same number of steps: one whose
    samples were skipped as unreadable would end its epoch first, and the others would wait for it in their
    gradients' all-reduce for ever (possible when ``--max-bad-samples`` is at least a batch). Such a worker
    sees a few of its samples twice instead. :class:`TrainError` when a pass yields nothing at all."""
    n, source = 0, batches
    while n < steps:
        got = False
        for batch in source:
            got = True
            yield batch
            n += 1
            if n >= steps:
                return
        if not got:
            raise TrainError(f"a worker's shards gave no {'further ' if n else ''}batch after {n} of the epoch's "
                             f"{steps} steps (their samples skipped as unreadable, or the shards unreadable when "
                             "read again)")
        source = again()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def settings_mistake(*, student: str, student_options: dict, stage: str, teacher: str | None) -> str | None:
    """What is wrong with the student, its options, the stage and the hint teacher together, as one sentence,
    known from the registries alone (nothing read or built): the command line's usage mistakes; None if nothing."""
    try:
        info = student_info(student)
        check_options(student, student_options)
    except KeyError as e:
        return e.args[0]
    except ValueError as e:
        return str(e)
    if stage not in STAGES:
        return f"unknown stage {stage!r} ({' or '.join(STAGES)})"
    if stage == "hint" and not info.has_hint_stage:
        hinted = [n for n in available_students() if student_info(n).has_hint_stage  # (whose encoder --init
                  and student_info(n).cls.backbone_prefix == info.cls.backbone_prefix]  # can give this one)
        if not hinted:
            return (f"{student} has no hint stage (its features do not match a teacher's) and no student with one "
                    "has its encoder: train it with --stage finetune, its encoder from --backbone-weights imagenet")
        return (f"{student} has no hint stage: its features do not match a teacher's; hint-pretrain "
                f"{' or '.join(hinted)} and start from its checkpoint with --init")
    if stage == "hint" and not teacher:
        return "the hint stage needs --teacher (its intermediate features are the targets)"
    if stage == "hint" and not hints_fit(teacher, info):
        fitting = " or ".join(n for n in available_teachers() if hints_fit(n, info))
        layout = ", ".join(f"{ch}@/{s}" for ch, s in zip(info.cls.hint_channels, info.cls.hint_strides))
        theirs = teacher_class(teacher).hint_layout
        if not theirs:
            return f"teacher {teacher!r} has no intermediate features for the hint stage; use {fitting}"
        return (f"teacher {teacher!r}'s hint features ({', '.join(f'{ch}@/{s}' for ch, s in theirs)}) are not "
                f"{student}'s ({layout}: channels@/stride); use {fitting}")
    if stage != "hint" and teacher:
        return "--teacher is for the hint stage (--stage hint); the finetune stage learns from the labels' teacher"
    return None


class Trainer:
    def __init__(self, config: TrainConfig, resuming: bool = False):
        """``resuming``: the run folder holds checkpoints, which :meth:`resume` loads (or refuses): the student's
        start (``--init``, ``--backbone-weights``) is not read, since the checkpoint replaces it."""
        self.config = c = config
        self.labels, self.train_tars, self.val_tars, self.shards = self.check(c)
        #: unreadable samples of this run: counted, logged, skipped up to ``max_bad_samples``
        self.bad = BadSamples(c.max_bad_samples, echo=lambda line: tqdm.write(line, file=sys.stderr))
        self.run = Path(c.run)
        self.ckpt_dir = self.run / "checkpoints"
        try:
            self.device = available(resolve_device(c.device))
        except DeviceError as e:
            raise TrainError(str(e)) from None
        self.amp = use_autocast(self.device, c.amp, option="--amp")
        torch.manual_seed(c.seed)
        np.random.seed(c.seed)
        random.seed(c.seed)
        self.rank, self.world = _distributed()
        self._ahead: tuple[int, Callable, Iterator] | None = None  # (epoch, loader, its batches): started early
        self.model = build_student(c.student, backbone_weights="none" if c.init or resuming else c.backbone_weights,
                                   **c.student_options)
        self.init_note = ("" if resuming else init_from(self.model, c.init) if c.init
                          else f"backbone: {c.backbone_weights}")
        self.model.to(self.device)
        #: the stage's forward pass (:class:`StageView`); ``forward`` is what a training step calls
        #: (DDP-wrapped when distributed), ``local_forward`` what worker 0 validates with
        self.local_forward = self.forward = StageView(self.model, c.stage)
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
        if self.rank == 0:
            for line in self.warnings():
                print(f"warning: {line}", file=sys.stderr)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum,
                                         weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(c.milestones), c.gamma)
        self.epoch, self.global_step = 0, 0

    def warnings(self) -> list[str]:
        """What this run allows but a researcher should be told: labels or a hint teacher of random weights,
        Eq. 3's weights given for a map teacher's labels (whose loss, Eq. 2, has no such terms)."""
        c, said = self.config, []
        if self.labels.weights_random:
            said.append(f"{self.labels.folder} holds labels of an untrained {self.labels.teacher} (`pipeline label "
                        "--weights random`): a student trained on them learns its noise")
        if self.teacher is not None and self.teacher.weights_random:
            said.append(f"the hint stage's teacher {c.teacher} has random weights (--teacher-weights random): its "
                        "features are noise to regress")
        if self.teacher is None and self.labels.label_kind != "log_density" and tuple(c.loss_weights) != (1, 1, 1):
            said.append(f"--loss-weights {','.join(f'{w:g}' for w in c.loss_weights)} weigh Eq. 3's terms (density "
                        f"labels); {self.labels.teacher}'s maps are learnt with Eq. 2 (BCE), which has none: ignored")
        return said

    @staticmethod
    def check(c: TrainConfig):
        """Refuse bad settings with one clear error; returns (label set, training tars, validation tars,
        every shard's (sha256, images) by tar)."""
        mistake = settings_mistake(student=c.student, student_options=c.student_options, stage=c.stage,
                                   teacher=c.teacher)
        if mistake:
            raise TrainError(mistake)
        info = student_info(c.student)
        if c.gt_maps is not None:
            if c.stage == "hint":
                raise TrainError("--gt-maps is for the finetune stage (the hint stage learns the teacher's features)")
            if not is_url(c.gt_maps) and not Path(c.gt_maps).is_dir():
                raise TrainError(f"--gt-maps {c.gt_maps} is not a folder (of human saliency maps named as the images, "
                                 "e.g. SALICON's maps/train)")
        if not is_url(c.run) and Path(c.run).exists() and not Path(c.run).is_dir():
            raise TrainError(f"--run {c.run} is a file, not a run folder: give a folder (a new one, or a run's to "
                             "resume it)")
        inside = enclosing_label_folder(c.run)  # its files would be among the shards (a file:// URL's too)
        if inside is not None:
            inputs = (("--labels", c.labels), ("--val-labels", [c.val_labels]))
            flag = next((f" ({flag})" for flag, folders in inputs for folder in folders
                         if folder and not is_url(folder) and Path(folder).resolve() == inside), "")
            raise TrainError(f"--run {c.run} lies in the label folder {inside}{flag}: give a run folder outside it")
        labels = open_label_sets(c.labels)
        if c.gt_maps is not None and labels.label_kind == "log_density":
            raise TrainError(f"--gt-maps: {labels.folder} holds {labels.teacher}'s densities, and their loss (Eq. 3) has "
                             "no ground-truth term; the human maps join the loss of a map teacher's labels (Eq. 2: "
                             "salgan, classic)")
        if c.gt_maps is not None and labels.tars:
            try:
                first_ground_truth(labels, c.gt_maps)
            except SampleError as e:
                raise TrainError(str(e)) from None
        h, w = labels.image_size
        if h % info.stride or w % info.stride:
            up = "x".join(str(-(-n // info.stride) * info.stride) for n in (h, w))  # the next multiples up
            raise TrainError(f"{labels.folder} holds {h}x{w} images; {c.student} needs height and width in "
                             f"multiples of {info.stride} (label with --image-size {up}, or 192x256, the paper's)")
        with torch.device("meta"):  # the architecture alone (no memory, no weights): does it fit that size?
            shape = build_student(c.student, backbone_weights="none", **c.student_options)
        try:
            shape.check_size(h, w)  # SACT's --tile must divide every block's map
        except ValueError as e:
            raise TrainError(f"{labels.folder} holds {h}x{w} images: {e}") from None
        shards = labels.shards()
        if c.val_labels:
            val = open_label_set(c.val_labels)
            check_same_labels(labels, val)
            train, val_tars = list(labels.tars), list(val.tars)
            shards.update(val.shards())
        else:
            last = len(open_label_set(c.labels[-1]).tars) if len(c.labels) > 1 else len(labels.tars)
            if len(c.labels) > 1 and c.val_shards > last:  # (held out: the last folder's, as CLI.md says)
                raise TrainError(f"--val-shards {c.val_shards}: the last --labels folder, {c.labels[-1]}, has "
                                 f"{plural(last, 'shard')}; hold out at most those, or give --val-labels")
            train, val_tars = split_shards(labels.tars, c.val_shards)
        if train and not sum(shards[t][1] for t in train):  # (before anything is written to the run folder)
            raise TrainError(f"the training shards of {', '.join(c.labels)} hold no samples (every image in them "
                             "failed to label; each shard's shard-*.json marker lists why): nothing to train on")
        try:
            use_autocast(resolve_device(c.device), c.amp, option="--amp")
        except DeviceError as e:  # an unknown --device (or --amp, for a config not made by the CLI)
            raise TrainError(str(e)) from None
        return labels, train, val_tars, shards

    # -- checkpoints -----------------------------------------------------------------------
    def shown(self, text: str) -> str:
        """``text`` with the local staging folder of a run URL written as the URL (what the user gave)."""
        return text.replace(str(self.run), str(self.config.run)) if is_url(self.config.run) else text

    def resume(self) -> bool:
        try:
            found = newest_readable(self.ckpt_dir, warn=lambda line: print(self.shown(line), file=sys.stderr))
        except TrainError as e:
            raise TrainError(self.shown(str(e))) from None
        if found is None:
            return False
        path, ckpt = found
        try:
            check_resumable(path, ckpt, self.config, self.model.options(), self.labels.made_with())
        except TrainError as e:
            raise TrainError(self.shown(str(e))) from None
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.epoch, self.global_step = int(ckpt["epoch"]) + 1, int(ckpt["global_step"])
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, TypeError, KeyError) as e:  # a checkpoint altered after it was written
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(self.shown(f"{path} does not fit this run ({why}); use another --run or --restart"))
        before = ckpt.get("world", self.world)  # (checkpoints before stop 14 do not say)
        if before != self.world and self.rank == 0:  # allowed (a run moves to other machines), never silently
            b = self.config.batch_size
            print(f"warning: {path.name} was trained by {before} process(es), this run has {self.world}: each step "
                  f"now takes {self.world} × {b} images, not {before} × {b} (the losses no longer follow the run's "
                  "own course)", file=sys.stderr)
        trained = ckpt.get("precision", self.precision)  # (checkpoints before stop 32 do not say)
        if trained != self.precision and self.rank == 0:  # (--amp auto on another device)
            said = {"bf16": "bf16 autocast", "fp32": "fp32"}
            print(f"warning: {path.name} was trained in {said[trained]}, this run trains in {said[self.precision]} "
                  f"(--amp {self.config.amp} on {self.device.type}): the losses no longer follow the run's own course; "
                  f"--amp {'bf16' if trained == 'bf16' else 'off'} keeps the precision it had", file=sys.stderr)
        loaders = ckpt.get("loader_workers", self.config.workers)  # (checkpoints before stop 27 do not say)
        # allowed: the speed of loading is the user's to choose (0 and 1 read the shards in the same order: one reader)
        if max(loaders, 1) != max(self.config.workers, 1) and self.rank == 0:
            print(f"note: {path.name} was trained with --workers {loaders}, this run has {self.config.workers}: the "
                  "loader workers split the shards between them, so the images come in another order from here "
                  "than in an uninterrupted run", file=sys.stderr)
        capped = ckpt.get("steps_per_epoch", self.config.steps_per_epoch)  # (checkpoints before stop 29 do not say)
        if capped != self.config.steps_per_epoch and self.rank == 0:  # allowed: a longer run of the same settings

            def said(n):
                return str(n) if n else "none (every image)"
            print(f"note: {path.name} was trained with --steps-per-epoch {said(capped)}, this run has "
                  f"{said(self.config.steps_per_epoch)}: its epochs take another number of images from here",
                  file=sys.stderr)
        return True

    def save(self, epoch: int, val_loss: float | None = None) -> Path:
        return save_checkpoint(self.ckpt_dir, epoch, val_loss=val_loss, ckpt={
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch, "global_step": self.global_step,
            "rng": rng_state(), "config": self.config.resume_key(), "student": self.config.student,
            "world": self.world, "loader_workers": self.config.workers, "steps_per_epoch": self.config.steps_per_epoch,
            "student_options": self.model.options(), "stage": self.config.stage,
            "labels": self.labels.made_with(), "precision": self.precision})

    @property
    def precision(self) -> str:
        """What this run trains in, as its checkpoints record it: ``bf16`` (autocast) or ``fp32``."""
        return "bf16" if self.amp else "fp32"

    # -- one batch -------------------------------------------------------------------------
    @property
    def log_names(self) -> tuple[str, ...]:
        """The student's logged statistics (none in the hint stage)."""
        return () if self.teacher is not None else tuple(self.model.log_names)

    def loss(self, images: torch.Tensor, targets: torch.Tensor,
             train: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The stage's loss, the student's logits when the stage computes them, and the statistics the student
        logs (``train``: through the distributed wrapper; else the bare student, as worker 0 validates alone)."""
        x = self.model.normalize(images)
        forward = self.forward if train else self.local_forward
        with autocast(self.device, self.amp):
            if self.teacher is not None:
                with torch.no_grad():
                    hints = [h.float() for h in self.teacher.hint_features(images)]
                feats = [f.float() for f in forward(x)]
                try:
                    return hint_loss(feats, hints), None, {}
                except ValueError as e:
                    raise TrainError(f"teacher {self.config.teacher!r} cannot give {self.config.student}'s hint "
                                     f"targets ({e}); the hint stage follows the paper with --teacher salgan") from None
            out = forward(x)
            logits = out.logits.float()
        if self.labels.label_kind == "log_density":
            loss = density_teacher_loss(logits, targets, self.config.loss_weights)
        else:  # (a second channel: the human map of --gt-maps, in training)
            loss = map_teacher_loss(logits, targets[:, :1], targets[:, 1:] if targets.shape[1] > 1 else None)
        for term in out.losses.values():  # e.g. SACT's ponder cost
            loss = loss + term.float()
        return loss, logits, {k: v.detach().float() for k, v in out.logs.items()}

    def loader(self, tars, epoch: int, train: bool):
        c = self.config
        return shard_loader(self.labels, tars, batch_size=c.batch_size, epoch=epoch, seed=c.seed,
                            shuffle_buffer=c.shuffle_buffer if train else 0, workers=c.workers,
                            split_nodes=train, pin_memory=self.device.type == "cuda",
                            counts={t: n for t, (_, n) in self.shards.items()}, bad=self.bad,
                            gt_maps=c.gt_maps if train else None)

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
        """The validation metrics (:data:`VAL_KEYS`) and the student's statistics on the validation images
        (``val_`` + each of :attr:`log_names`: SACT's ponder cost per block, the computation it spends at test
        time), means over images."""
        self.model.eval()
        names = self.log_names
        sums = torch.zeros(4 + len(names), dtype=torch.float64, device=self.device)  # loss, cc, kl, nss, stats
        n = 0
        for images, targets, _ in self.loader(self.val_tars, 0, train=False):
            images, targets = images.to(self.device), targets.to(self.device)
            loss, logits, stats = self.loss(images, targets, train=False)
            sums[0] += loss.double() * len(images)
            if logits is not None:  # the hint stage trains no head: its maps are not scored
                a = agreement(logits, targets, self.labels.label_kind)
                sums[1:4] += torch.stack([a["cc"].sum(), a["kl"].sum(), a["nss"].sum()]).double()
            if names:
                sums[4:] += torch.stack([stats[k] for k in names]).double() * len(images)
            n += len(images)
        self.model.train()
        if self.teacher is not None:
            sums[1:4] = float("nan")
        if not n:  # held-out shards with no samples (:meth:`no_validation`): nothing was measured
            sums[:] = float("nan")
        loss, cc, kl, nss, *stats = (sums / max(n, 1)).tolist()
        return {"val_loss": loss, "val_cc": cc, "val_kl": kl, "val_nss": nss,
                **{f"val_{k}": v for k, v in zip(names, stats)}}

    def no_validation(self) -> str:
        """Why this run validates on no sample ("" when it does): its held-out shards hold none (every image in them
        failed to label, e.g. a folder's last shard of failed images alone)."""
        if sum(self.shards[t][1] for t in self.val_tars):
            return ""
        c, many = self.config, len(self.val_tars) > 1
        names = ", ".join(t.rsplit("/", 1)[-1] for t in self.val_tars)
        where = (f"--val-labels {c.val_labels} holds no samples (every image in it failed to label)" if c.val_labels
                 else f"the held-out shard{'s' if many else ''} {names} of {c.labels[-1]} hold{'' if many else 's'} "
                      f"no samples (every image in {'them' if many else 'it'} failed to label)")
        fix = ("give a --val-labels folder with labelled images" if c.val_labels else
               f"hold out more with --val-shards {c.val_shards + 1}, or give --val-labels")
        return f"{where}: no validation, its columns are nan; {fix}"

    def epoch_batches(self, epoch: int) -> Iterator:
        """The training batches of ``epoch``: those of the loader :meth:`start_epoch` started ahead, if it is
        this epoch's (and ``self.loader`` is still the one it came from), else a loader started now; when
        data parallel, exactly :meth:`steps` of them (:func:`same_steps`)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch and ahead[1] == self.loader:
            batches = ahead[2]
        else:
            batches = iter(self.loader(self.train_tars, epoch, train=True))
        if self.world == 1:
            return batches
        return same_steps(batches, self.steps(epoch), lambda: iter(self.loader(self.train_tars, epoch, train=True)))

    def start_epoch(self, epoch: int) -> None:
        """Start the loader of ``epoch`` now, ahead of its first step (once; not past the last epoch, and not
        with ``workers`` 0, where loading runs in this process and starting early gains nothing)."""
        if self._ahead is None and epoch < self.config.epochs and self.config.workers > 0:
            self._ahead = (epoch, self.loader, iter(self.loader(self.train_tars, epoch, train=True)))

    def train_epoch(self, epoch: int, bar, log_file) -> tuple[float, int, dict[str, float]]:
        """One epoch; each step's loss (and the student's logged statistics) goes to ``log_file``, read back
        from the device every :data:`LOG_EVERY` steps (and at the first step of the epoch) so the GPU is not
        synchronised per step. Returns the epoch's mean loss, its images and its statistics' means."""
        self.model.train()
        log = csv.writer(log_file, lineterminator="\n")
        names = self.log_names
        pending: list[tuple[int, int, torch.Tensor, int]] = []  # (step, global step, [loss, *stats], batch size)
        total, n, last = 0.0, 0, float("nan")
        stat_sums = [0.0] * len(names)

        def flush():
            nonlocal total, n, last
            values = torch.stack([p[2] for p in pending]).tolist()
            for (step, global_step, _, size), (value, *stats) in zip(pending, values):
                log.writerow((epoch, step, global_step, f"{value:.8g}", *(f"{v:.6g}" for v in stats)))
                total, n, last = total + value * size, n + size, value
                for i, v in enumerate(stats):
                    stat_sums[i] += v * size
            log_file.flush()  # readable while training runs
            pending.clear()
            bar.set_postfix_str(f"epoch {epoch + 1}/{self.config.epochs} loss {last:.4f}")

        cap = self.steps(epoch)
        per_node = self.labels.images_in(self.train_tars) // self.world
        last = min(cap or math.inf, math.ceil(per_node / self.config.batch_size))  # about: bad samples may cut it
        for step, (images, targets, _) in enumerate(self.epoch_batches(epoch)):
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            loss, _, stats = self.loss(images, targets)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.global_step += 1
            pending.append((step, self.global_step, torch.stack([loss.detach(), *(stats[k] for k in names)]),
                            len(images)))
            if step == 0 or len(pending) >= LOG_EVERY:
                flush()
            bar.update(len(images))
            if step + 1 >= last - LOOKAHEAD_STEPS:
                self.start_epoch(epoch + 1)
            if cap is not None and step + 1 >= cap:
                break
        self.start_epoch(epoch + 1)  # at the latest now, before validation
        if pending:
            flush()
        return total / max(n, 1), n, {k: v / max(n, 1) for k, v in zip(names, stat_sums)}


def check_resumable(path: Path, ckpt: dict, config: TrainConfig, options: dict, labels: dict) -> None:
    """The checkpoint ``ckpt`` (read from ``path``) was trained with ``config``'s resume settings, a student
    built with ``options`` and labels made as ``labels`` were (:meth:`LabelSet.made_with`: a folder relabelled
    with other teacher weights since is another dataset under the same path); else :class:`TrainError` naming
    each setting that differs."""
    if not isinstance(ckpt["config"], dict):
        raise TrainError(f"{path} records no settings to resume with; use another --run or --restart")
    theirs, ours = as_places(ckpt["config"]), as_places(config.resume_key())
    # the options the student was built with, defaults included (a --depth 50 given is the default's 50)
    theirs["student_options"] = ckpt.get("student_options", theirs.get("student_options"))
    ours["student_options"] = options
    made = ckpt.get("labels") if isinstance(ckpt.get("labels"), dict) else {}
    # what the labels were made with: a folder relabelled since at another size, by another teacher or other
    # weights, is another dataset under the same path (checkpoints before stop 24 record no digest or version)
    for key in ("teacher", "kind", "image_size", "weights_digest", "label_version"):
        if made.get(key) is not None and labels.get(key) is not None:
            theirs[f"labels {key}"], ours[f"labels {key}"] = made[key], labels[key]
    if labels.get("kind") != "log_density":  # Eq. 3's weights: no term of a map teacher's loss (Eq. 2)
        theirs.pop("loss_weights", None)
        ours.pop("loss_weights", None)
    if "precision" in ckpt:  # --amp as resolved on each run's device (auto and off are one on a CPU): said on resume
        theirs.pop("amp", None)
        ours.pop("amp", None)
    if config.val_labels and theirs.get("val_labels") == ours.get("val_labels"):  # --val-shards holds nothing
        theirs.pop("val_shards", None)  # out where --val-labels is given
        ours.pop("val_shards", None)
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))

        def shown(v, other) -> str:  # a long value around where it first differs from the other (two long
            text, them = json.dumps(v), json.dumps(other)  # paths cut at the same place read the same)
            if len(text) <= 60:
                return text
            start = max(0, min(len(os.path.commonprefix([text, them])) - 20, len(text) - 57))
            return ("..." if start else "") + text[start:start + 57] + ("..." if start + 57 < len(text) else "")

        said = "; ".join(f"{k} {shown(theirs.get(k), ours.get(k))} there, {shown(ours.get(k), theirs.get(k))} now"
                         for k in diff)
        raise TrainError(f"{path} was trained with other settings ({said}); use another --run or --restart")


def finished_run(config: TrainConfig) -> tuple[int, int] | None:
    """(epochs, global step) of a local run folder that already holds every epoch of ``config`` with its
    settings, as a resume would find it (the same warnings and refusals); None when there is work left (or the run
    is a URL, known only once pulled). Builds the student on the meta device only: no memory, no weights."""
    if is_url(config.run) or not resumes(config.run):
        return None
    found = newest_readable(Path(config.run) / "checkpoints", warn=lambda line: print(line, file=sys.stderr))
    if found is None:
        return None
    path, ckpt = found
    with torch.device("meta"):
        options = build_student(config.student, backbone_weights="none", **config.student_options).options()
    check_resumable(path, ckpt, config, options, open_label_sets(config.labels).made_with())
    epochs = int(ckpt["epoch"]) + 1
    return (epochs, int(ckpt["global_step"])) if epochs >= config.epochs else None


def as_places(settings: dict) -> dict:
    """Resume settings with their label folders as places: a local path resolved (``labels``, ``./labels`` and
    ``/abs/labels`` name one folder), a URL as it is."""
    def place(value):
        if isinstance(value, list):
            return [place(v) for v in value]
        if isinstance(value, str) and (local := local_place(value)) is not None:  # (file:///x is /x)
            return str(local.resolve())
        return value

    def weights(value):  # a local weights file as a place; a name (random, a known name) or URL as it is
        return place(value) if isinstance(value, str) and Path(value).is_file() else value

    return {k: place(v) if k in ("labels", "val_labels", "gt_maps") else weights(v) if k == "teacher_weights" else v
            for k, v in settings.items()}


def hints_fit(name: str, student) -> bool:
    """Whether teacher ``name``'s hint features are, level by level, the channels and strides of ``student``'s (a
    :class:`~students.registry.StudentInfo`); an unknown name is left to the builder's own error."""
    try:
        cls = teacher_class(name)
    except KeyError:
        return True
    return cls.hint_layout == tuple(zip(student.cls.hint_channels, student.cls.hint_strides))


def run_lock(run: str | Path) -> FolderLock:
    """The lock on a run folder that keeps a second ``pipeline train`` out of it (see :mod:`pipeline.common.locks`)."""
    return FolderLock(Path(run) / LOCK_NAME, what=f"run folder {run}", command="pipeline train")


def lock_run(run: str | Path) -> FolderLock:
    """Take :func:`run_lock` or raise :class:`TrainError` naming its holder; a stale lock taken over is noted."""
    return run_lock(run).take(TrainError)


def train(config: TrainConfig, *, restart: bool = False, progress: bool = True, verify: bool = True,
          lock: bool = True) -> list[EpochResult]:
    """Train (or resume training) as ``config`` says; returns the epochs run by this call.

    ``lock``: hold the run folder's lock for the call (a second ``pipeline train`` on it is refused); ``verify``:
    check every shard's sha256 first. In a torch.distributed group every worker calls this (the driver holds the
    lock and verified the shards); worker 0 writes the logs and checkpoints.
    """
    if is_url(config.run) and (local := local_place(config.run)) is not None:  # file:///abs/path: a local run,
        config = replace(config, run=str(local))  # locked and tidied as one
    remote = is_url(config.run)
    trainer = Trainer(config, resuming=resumes(config.run, restart))
    held = lock_run(trainer.run) if lock and trainer.rank == 0 and not remote else None
    try:
        if verify:  # every shard's sha256 against its marker's, once per run, before the first is read
            verify_shards(trainer.shards)
        if not remote:
            return _train(trainer, config, restart=restart, progress=progress)
        prune_staging()
        with tempfile.TemporaryDirectory(prefix=staging_prefix()) as staging:
            trainer.run, trainer.ckpt_dir = Path(staging), Path(staging) / "checkpoints"
            return _train(trainer, config, restart=restart, progress=progress, mirror=run_mirror(config.run, staging))
    finally:
        if held is not None:
            held.release()


#: the name of a run URL's local staging folder (in the temp folder), then its `pipeline train`'s
#: ``<pid>-<start time>-<host>-`` (:func:`staging_prefix`)
STAGING = "pipeline-run-"


def staging_prefix(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{STAGING}{pid}-{process_start(pid) or 0}-{re.sub(r'[^A-Za-z0-9.]', '_', socket.gethostname())}-"


def prune_staging() -> None:
    """Remove the staging folders of run URLs whose `pipeline train` on this host is gone (a SIGKILL leaves its
    folder, a checkpoint or two big, behind): its pid no longer runs, or runs another process (its start time
    differs). Another host's folders (a temp folder shared between machines) are left alone."""
    host = staging_prefix()[len(STAGING):].split("-")[2]
    for folder in Path(tempfile.gettempdir()).glob(f"{STAGING}*"):
        parts = folder.name[len(STAGING):].split("-", 3)  # pid, start time, host, tempfile's own letters
        if len(parts) < 4 or not parts[0].isdigit() or parts[2] != host or int(parts[0]) == os.getpid():
            continue
        pid = int(parts[0])
        if not process_alive(pid) or str(process_start(pid) or 0) != parts[1]:
            shutil.rmtree(folder, ignore_errors=True)


#: what ``--restart`` deletes in a run folder (relative paths)
RESTART_FILES = ("checkpoints/*", "losses.csv", "metrics.csv", "curves.png")


def run_mirror(url: str, local: str | Path) -> Mirror:
    """A run folder on object storage as a local staging folder: its pointer uploaded last, and the old
    checkpoints and TensorBoard events the run deletes locally deleted there too."""
    return Mirror(as_path(url), Path(local), last=(f"checkpoints/{LATEST}", f"checkpoints/{BEST}"),
                  prune=("checkpoints/epoch-*.pt", "tensorboard/events.out.tfevents.*"))


#: options that choose the weights a run starts from: a resumed run keeps what config.json recorded
STARTS_ONLY = ("init", "backbone_weights")


def _train(trainer: "Trainer", config: TrainConfig, *, restart: bool, progress: bool,
           mirror: Mirror | None = None) -> list[EpochResult]:
    run, lead = trainer.run, trainer.rank == 0
    behind = False  # curves.png older than metrics.csv (its last plot never drawn)
    if lead:
        run.mkdir(parents=True, exist_ok=True)
        for folder in (run, trainer.ckpt_dir):  # a killed run's half-written files (a checkpoint: up to 200 MB)
            if folder.is_dir():
                remove_stale_temps(folder)
        if restart:
            for pattern in RESTART_FILES:  # the pointers first: they never name a checkpoint already deleted
                for p in sorted(run.glob(pattern), key=lambda p: p.name not in (LATEST, BEST)):
                    p.unlink(missing_ok=True)
            if mirror is not None:
                mirror.remove(RESTART_FILES)
    _barrier(trainer.world)
    if mirror is not None:  # every worker resumes from what the run URL holds
        mirror.pull()
    resumed = trainer.resume()
    if lead and not resumed:  # (a --restart killed between its deletions left it: its losses are another run's)
        (trainer.ckpt_dir / BEST).unlink(missing_ok=True)
    if lead:
        # the settings, with the epochs the run holds: a lower --epochs than already trained trains nothing
        recorded = {**asdict(config), "epochs": max(config.epochs, trainer.epoch),
                    "processes": trainer.world,  # data-parallel: each takes batch_size
                    "student_options": trainer.model.options(),  # defaults too
                    "labels_teacher": trainer.labels.teacher}  # (the curves name it: "validation CC vs deepgaze")
        if resumed:  # what the run started from stays recorded: these two start a run, a resumed one ignores them
            before = recorded_config(run)
            given = [f"--{k.replace('_', '-')} {recorded[k]}" for k in STARTS_ONLY
                     if k in before and recorded[k] != before[k] and (k != "backbone_weights" or config.init is None)]
            recorded.update({k: before[k] for k in STARTS_ONLY if k in before})
            if given:
                print(f"note: {' and '.join(given)} not used: the run resumes from its own checkpoint (they choose the "
                      "weights a run starts from)", file=sys.stderr)
        write_json(run / "config.json", recorded)
        print(f"resuming {config.run} after epoch {trainer.epoch} (step {trainer.global_step})" if resumed
              else trainer.init_note, file=sys.stderr)
        if why := trainer.no_validation():
            print(f"warning: {why}", file=sys.stderr)
        if config.gt_maps:
            print(f"ground truth: {config.gt_maps} (train_loss = BCE with the teacher's maps + BCE with these, Eq. 2; "
                  "validation is against the teacher's maps alone)", file=sys.stderr)
        behind = curves_behind(run)  # (before the rows are kept: that rewrites metrics.csv)
        keep_rows(run / "losses.csv", LOSS_HEADER + list(trainer.log_names), trainer.epoch)
        keep_rows(run / "metrics.csv", metrics_header(trainer.log_names), trainer.epoch)
    results = []
    board = EpochLogger(run, trainer.epoch) if lead else None  # TensorBoard, when installed
    per_epoch = trainer.labels.images_in(trainer.train_tars) // trainer.world
    if trainer.steps(trainer.epoch):
        per_epoch = min(per_epoch, trainer.steps(trainer.epoch) * config.batch_size)
    total = max(1, per_epoch) * config.epochs
    with show_progress(total, f"train {config.student} ({config.stage})", initial=max(1, per_epoch) * trainer.epoch,
                       enabled=progress and lead) as bar, \
            open(run / "losses.csv" if lead else os.devnull, "a", newline="") as losses:
        for epoch in range(trainer.epoch, config.epochs):
            t0 = time.perf_counter()
            lr = trainer.optimizer.param_groups[0]["lr"]
            train_loss, n, stats = trainer.train_epoch(epoch, bar, losses)
            seconds = time.perf_counter() - t0  # training alone: its images/s is the training rate
            if n == 0:  # every sample skipped as bad (or none there): nothing was learnt, nothing is saved
                raise TrainError(f"epoch {epoch + 1} read no usable sample from {', '.join(config.labels)} (each one "
                                 "skipped was logged above); check the folder with `pipeline verify --deep`")
            trainer.scheduler.step()
            if lead:
                os.fsync(losses.fileno())
                val = trainer.validate()
                result = EpochResult(epoch, train_loss, val, lr, seconds, n * trainer.world, stats)  # every process's
                append_metrics(run, result)
                board.epoch(trainer, result)
                trainer.save(epoch, val.get("val_loss"))  # last: a checkpoint means the epoch's logs are written
                plot_curves(run)
                if mirror is not None:  # the epoch's files, latest.json last
                    mirror.push()
                results.append(result)
                bar.milestone(epoch_note(result, config.epochs))
            else:
                trainer.epoch = epoch + 1
            _barrier(trainer.world)
    if lead and not results and behind:  # nothing left to train, and its last plot never drawn
        plot_curves(run)
        if mirror is not None:
            mirror.push()
    if board is not None:
        board.close()
        if mirror is not None:
            mirror.push()
    return results


