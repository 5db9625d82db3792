"""Anything that predicts saliency, seen one way: uint8 RGB images → log densities at their own sizes.

A predictor is a teacher (registry name and weights), a checkpoint of ``pipeline train`` (or its run
folder), or a student built with given weights (e.g. the FastSal authors' checkpoints). ``eval``,
``predict`` and ``profile`` use it without knowing which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import images
from pipeline.labeler import resize_label, resolve_device

EPS = 2.2204e-16


class PredictorError(Exception):
    """The model to evaluate cannot be built (bad checkpoint, no model named…)."""


def to_log_density(maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Teacher output or student logits ``[B,1,H,W]`` → a log density over each image's pixels."""
    b = maps.shape[0]
    flat = maps.float().reshape(b, -1)
    if kind == "log_density":
        out = flat - flat.logsumexp(1, keepdim=True)
    elif kind == "probability_map":
        p = flat.clamp_min(0) + EPS
        out = (p / p.sum(1, keepdim=True)).log()
    elif kind == "sigmoid_logits":  # a student trained on a map teacher: its map is sigmoid(logits)
        out = torch.nn.functional.logsigmoid(flat)
        out = out - out.logsumexp(1, keepdim=True)
    elif kind == "logits":  # a student trained on a density teacher: softmax over pixels
        out = torch.log_softmax(flat, dim=1)
    else:
        raise ValueError(f"unknown map kind {kind!r}")
    return out.reshape(maps.shape)


def student_kind(label_kind: str) -> str:
    """How a student's logits become a map: softmax over pixels after density labels, sigmoid after maps."""
    return "logits" if label_kind == "log_density" else "sigmoid_logits"


@dataclass
class Predictor:
    name: str
    model: torch.nn.Module
    kind: str  # log_density | probability_map | logits | sigmoid_logits
    input_size: tuple[int, int] | None  # None: the image's own size
    device: torch.device
    student: bool = False
    autocast: bool = False  # bf16 on GPU

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.student:
                from students import normalize

                out = self.model(normalize(x))
            else:
                out = self.model(x)
        return to_log_density(out.float(), self.kind)

    @torch.inference_mode()
    def log_densities(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 ``(H, W, 3)`` images → float32 log densities ``(H, W)`` (each sums to 1 after exp).

        With a fixed input size the images go through the model as one batch.
        """
        if not rgbs:
            return []
        if self.input_size:
            logd = self._forward(np.stack([images.resize(x, self.input_size) for x in rgbs]))
            outs = [logd[i:i + 1] for i in range(len(rgbs))]
        else:
            outs = [self._forward(np.ascontiguousarray(x)[None]) for x in rgbs]
        return [resize_label(o, "log_density", x.shape[:2])[0, 0].cpu().numpy() for o, x in zip(outs, rgbs)]

    def log_density(self, rgb: np.ndarray) -> np.ndarray:
        return self.log_densities([rgb])[0]


def _autocast(device: torch.device, precision: str) -> bool:
    if precision == "bf16" and device.type != "cuda":
        raise PredictorError("bf16 needs a GPU; use --precision fp32 on CPU")
    return device.type == "cuda" and precision in ("auto", "bf16")


def teacher_predictor(name: str, weights: str | None = None, device: str = "auto",
                      precision: str = "auto") -> Predictor:
    from teachers import build_teacher

    dev = resolve_device(device)
    teacher = build_teacher(name, weights=weights).to(dev).eval()
    return Predictor(name, teacher, teacher.output_kind, teacher.input_size, dev, autocast=_autocast(dev, precision))


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run folder of ``pipeline train`` (→ its latest checkpoint)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest.json"
    if path.is_dir():
        if not latest.is_file():
            raise PredictorError(f"{path} is a folder without checkpoints/latest.json: not a finished "
                                 "`pipeline train` run (give a checkpoint file or a run folder)")
        return path / "checkpoints" / json.loads(latest.read_text())["checkpoint"]
    if not path.is_file():
        raise PredictorError(f"checkpoint not found: {path}")
    return path


def student_predictor(checkpoint: str | Path, device: str = "auto", precision: str = "auto") -> Predictor:
    """A student from a ``pipeline train`` checkpoint: its map is softmax (density labels) or sigmoid;
    its input size is the size of the images it was trained on."""
    from pipeline.train import TrainError, load_checkpoint
    from students import STUDENTS
    from teachers.weights import WeightsError, load_strict

    path = checkpoint_path(checkpoint)
    try:
        ckpt = load_checkpoint(path)
    except TrainError as e:
        raise PredictorError(str(e)) from None
    if ckpt["student"] not in STUDENTS or not isinstance(ckpt.get("labels"), dict) or "kind" not in ckpt["labels"]:
        raise PredictorError(f"{path} is not a checkpoint of `pipeline train` (no student name or labels record); "
                             f"a plain weights file goes with --student NAME --weights {path}")
    dev = resolve_device(device)
    model = STUDENTS[ckpt["student"]](backbone_weights="none")
    try:
        load_strict(model, ckpt["model"], what=f"checkpoint {path}")
    except WeightsError as e:
        raise PredictorError(str(e)) from None
    kind = student_kind(ckpt["labels"]["kind"])
    input_size = tuple(ckpt["labels"].get("image_size", (192, 256)))
    return Predictor(f"{ckpt['student']}@{path}", model.to(dev).eval(), kind, input_size, dev, student=True,
                     autocast=_autocast(dev, precision))


def named_student_predictor(name: str, weights: str | None, output: str = "softmax", device: str = "auto",
                            input_size: tuple[int, int] = (192, 256), precision: str = "auto") -> Predictor:
    """A student built by name, from ``weights`` (e.g. the authors' ``coco_A.pth``) or untrained
    (``weights=None``: for ``profile`` only). ``output`` says how its logits become a map."""
    from students import STUDENTS

    if name not in STUDENTS:
        raise PredictorError(f"unknown student {name!r}; known: {', '.join(sorted(STUDENTS))}")
    dev = resolve_device(device)
    model = STUDENTS[name](weights=weights, backbone_weights="none")
    kind = {"softmax": "logits", "sigmoid": "sigmoid_logits"}[output]
    label = f"{name}@{weights}" if weights else f"{name} (untrained)"
    return Predictor(label, model.to(dev).eval(), kind, input_size, dev, student=True,
                     autocast=_autocast(dev, precision))


def build_predictor(*, checkpoint=None, teacher=None, student=None, weights=None, student_output="softmax",
                    device="auto", precision="auto", require_weights=True) -> Predictor:
    """Exactly one of ``checkpoint``, ``teacher`` or ``student`` names the model."""
    given = [n for n, v in (("--checkpoint", checkpoint), ("--teacher", teacher), ("--student", student)) if v]
    if len(given) != 1:
        raise PredictorError("name the model with exactly one of --checkpoint, --teacher or --student"
                             + (f" (got {', '.join(given)})" if given else ""))
    if checkpoint:
        if weights:
            raise PredictorError("--weights goes with --teacher or --student, not --checkpoint")
        return student_predictor(checkpoint, device=device, precision=precision)
    if weights == "random" and require_weights:
        raise PredictorError("--weights random (architecture only: its maps mean nothing) is for `pipeline profile`; "
                             "give real weights to score or predict")
    if teacher:
        return teacher_predictor(teacher, weights, device=device, precision=precision)
    if weights is None and require_weights:
        raise PredictorError(f"--student {student} needs --weights (e.g. the authors' coco_A.pth); "
                             "for a model you trained, use --checkpoint RUN_DIR")
    return named_student_predictor(student, weights, student_output, device=device, precision=precision)
