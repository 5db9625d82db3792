"""Anything that predicts saliency, seen one way: uint8 RGB images → log densities at their own sizes.

A predictor is a teacher (registry name and weights), a checkpoint of ``pipeline train`` (or its run
folder), or a student built with given weights (e.g. the FastSal authors' checkpoints). ``eval``,
``predict`` and ``profile`` use it without knowing which.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from pipeline.common import images
from pipeline.common.devices import DeviceError, autocast, available, resolve_device, use_autocast
from pipeline.common.maps import resize_label
from pipeline.train.checkpoints import CheckpointError, student_from_checkpoint
from students import Student, build_student, student_info, student_kind, to_log_density
from students import available as students_available
from students.weights import OptionsDiffer


#: why an image has no map (a per-image failure) when the model's output for it is NaN or infinite
NOT_FINITE = "the model's map of it is not finite (NaN or ±inf): its weights are broken"


class PredictorError(Exception):
    """The model to evaluate cannot be built (bad checkpoint, no model named…)."""


@dataclass
class Predictor:
    name: str
    model: torch.nn.Module
    kind: str  # log_density | probability_map | logits | sigmoid_logits
    input_size: tuple[int, int] | None  # None: the image's own size
    device: torch.device
    autocast: bool = False  # bf16 on GPU
    #: which of a student's maps to predict: ``saliency`` (its logits) or one of its ``extra_maps``
    map_name: str = "saliency"
    #: the PyTorch model behind a runtime wrapper (ONNX Runtime): what ``profile`` counts parameters and FLOPs on
    reference: torch.nn.Module | None = None
    #: the weights' number format when it is not the float the device computes in (``int8``: a quantized graph)
    quantized: str | None = None

    @property
    def student(self) -> bool:
        return isinstance(self.model, Student)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 RGB ``[B,3,H,W]`` on the device → the model's raw output (a student normalises first)."""
        if not self.student:
            return self.model(x)
        x = self.model.normalize(x)
        return self.model(x) if self.map_name == "saliency" else self.model.maps(x)[self.map_name]

    def raw_maps(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        """An extra map's values (not :attr:`density`: SACT's ponder map) for each RGB uint8 image, bilinearly
        resized to the image: float32 ``(H, W)``, what :meth:`log_densities` gives for such a map."""
        if self.density:
            raise ValueError(f"{self.name}: its maps are saliency, not an extra map's raw values")
        return self.log_densities(rgbs)

    @property
    def density(self) -> bool:
        """Whether its maps are saliency (log densities); else raw values of an extra map (SACT's ponder cost)."""
        return self.map_name == "saliency"

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(self.device)
        with autocast(self.device, self.autocast):
            out = self.forward(x)
        return to_log_density(out.float(), self.kind) if self.density else out.float()

    def prepared(self, rgb: np.ndarray) -> np.ndarray:
        """What the model takes of an RGB uint8 ``(H, W, 3)`` image: resized to its input size when it has one
        (a decode thread can do this, and then keep a few hundred kilobytes of a large photo, not all of it)."""
        return images.resize(rgb, self.input_size) if self.input_size else rgb

    def log_densities(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        """RGB uint8 ``(H, W, 3)`` images → float32 log densities ``(H, W)`` (each sums to 1 after exp).

        With a fixed input size the images go through the model as one batch.
        """
        return list(self.iter_log_densities([self.prepared(x) for x in rgbs], [x.shape[:2] for x in rgbs]))

    @torch.inference_mode()
    def iter_log_densities(self, inputs: list[np.ndarray], sizes: list[tuple[int, int]]) -> Iterator[np.ndarray]:
        """:meth:`log_densities` of images already :meth:`prepared`, each map at its image's size in ``sizes``,
        made one at a time as they are asked for: at full size a large photo's map is ~100 MB, and a batch of
        them need not all be held at once. For an extra map (not :attr:`density`): its raw values."""
        if not inputs:
            return
        if self.input_size:
            logd = self._forward(np.stack(inputs))
            outs: Iterable[torch.Tensor] = (logd[i:i + 1] for i in range(len(inputs)))
        else:
            outs = (self._forward(np.ascontiguousarray(x)[None]) for x in inputs)
        for out, size in zip(outs, sizes):
            if self.density:
                yield resize_label(out, "log_density", tuple(size))[0, 0].cpu().numpy()
            else:  # an extra map's values, bilinearly resized
                yield torch.nn.functional.interpolate(out, size=tuple(size), mode="bilinear",
                                                      align_corners=False)[0, 0].cpu().numpy()

    def log_density(self, rgb: np.ndarray) -> np.ndarray:
        return self.log_densities([rgb])[0]


def _device(device: str, precision: str) -> tuple[torch.device, bool]:
    try:
        dev = available(resolve_device(device))
        return dev, use_autocast(dev, precision)
    except DeviceError as e:
        raise PredictorError(str(e)) from None


def teacher_predictor(name: str, weights: str | None = None, device: str = "auto",
                      precision: str = "auto") -> Predictor:
    from teachers import build_teacher

    dev, amp = _device(device, precision)
    teacher = build_teacher(name, weights=weights).to(dev).eval()
    return Predictor(name, teacher, teacher.output_kind, teacher.input_size, dev, autocast=amp)


def student_predictor(checkpoint: str | Path, device: str = "auto", precision: str = "auto",
                      trained: bool = True) -> Predictor:
    """A student from a ``pipeline train`` checkpoint: its map is softmax (density labels) or sigmoid;
    its input size is the size of the images it was trained on. ``trained``: its maps are to be used (eval,
    predict), so a hint-stage checkpoint, whose head never learnt a map, is refused."""
    dev, amp = _device(device, precision)
    try:
        model, ckpt, path = student_from_checkpoint(checkpoint)
    except CheckpointError as e:
        raise PredictorError(str(e)) from None
    if trained and ckpt.get("stage") == "hint":
        raise PredictorError(f"{path} is of the hint stage: it fitted {ckpt['student']}'s features to a teacher's, "
                             "and its saliency head never learnt a map; fine-tune it first (pipeline train --init "
                             f"{path} …) and score that run")
    kind = student_kind(ckpt["labels"]["kind"])
    input_size = tuple(ckpt["labels"].get("image_size", (192, 256)))
    return Predictor(f"{ckpt['student']}@{path}", model.to(dev).eval(), kind, input_size, dev, autocast=amp)


def named_student_predictor(name: str, weights: str | None, output: str = "softmax", device: str = "auto",
                            input_size: tuple[int, int] = (192, 256), precision: str = "auto",
                            options: dict | None = None) -> Predictor:
    """A student built by name, from ``weights`` (e.g. the authors' ``coco_A.pth``), from its ImageNet backbone
    alone (``weights="imagenet"``: no saliency training) or untrained (``weights=None`` or ``"random"``: for
    ``profile`` and ``export`` only). ``output`` says how its logits become a map."""
    dev, amp = _device(device, precision)
    backbone = "imagenet" if weights == "imagenet" else "none"
    try:
        with warnings.catch_warnings():  # (other options than the checkpoint records: said below, with the size)
            warnings.simplefilter("ignore", OptionsDiffer)
            model = build_student(name, weights=None if weights in ("imagenet", "random") else weights,
                                  backbone_weights=backbone, **(options or {}))
    except KeyError as e:
        raise PredictorError(e.args[0]) from None
    except Exception:  # noqa: BLE001 - a checkpoint of ours, trained with other options: say which
        shaped = _shaping_options_differ(name, weights, options or {})
        if shaped:
            raise PredictorError(f"{weights} is a `pipeline train` checkpoint of {name} with {shaped}: give the same "
                                 f"options (or --checkpoint {weights}, which reads them)") from None
        raise
    kind = {"softmax": "logits", "sigmoid": "sigmoid_logits"}[output]
    label = f"{name}@{weights}" if weights and weights != "random" else f"{name} (untrained)"
    recorded = _train_record(weights)
    if recorded is not None:
        size, their_kind, their_options = recorded
        ours = model.options()
        loss_only = {o.name for o in student_info(name).options if o.training_only}  # (tau: the same maps)
        differ = {k: v for k, v in their_options.items() if k in ours and ours[k] != v and k not in loss_only}
        if differ or (size, their_kind) != (tuple(input_size), kind):
            said = "".join(f", {k.replace('_', '-')} {v}" for k, v in differ.items())
            now = "".join(f", --{k.replace('_', '-')} {ours[k]}" for k in differ)
            print(f"warning: {weights} is a `pipeline train` checkpoint, trained at {size[0]}x{size[1]} with "
                  f"{'sigmoid' if their_kind == 'sigmoid_logits' else 'softmax'} maps{said}; --student runs it at "
                  f"{input_size[0]}x{input_size[1]} with --student-output {output}{now}: --checkpoint {weights} "
                  "uses what it was trained with", file=sys.stderr)
    return Predictor(label, model.to(dev).eval(), kind, input_size, dev, autocast=amp)


def _shaping_options_differ(name: str, weights: str | None, options: dict) -> str:
    """The options of ``name`` that shape its tensors and that a ``pipeline train`` checkpoint at ``weights``
    records otherwise than ``options`` (defaults filled in) asks, as "depth 50 there, --depth 101 here"; "" when
    none or not ours."""
    recorded = _train_record(weights)
    if recorded is None:
        return ""
    ours = {o.name: options.get(o.name, o.default) for o in student_info(name).options if o.tensors}
    return ", ".join(f"{k.replace('_', '-')} {v} there, --{k.replace('_', '-')} {ours[k]} here"
                     for k, v in recorded[2].items() if k in ours and ours[k] != v)


def _train_record(weights: str | None) -> tuple[tuple[int, int], str, dict] | None:
    """(image size, map kind, the student's options: SACT's tile, tau…) a local ``pipeline train`` checkpoint
    file records; None for any other weights."""
    if not weights or "://" in weights or not Path(weights).is_file():
        return None
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        labels = ckpt["labels"]
        options = ckpt.get("student_options") or {}
        return (tuple(int(v) for v in labels.get("image_size", (192, 256))), student_kind(labels["kind"]),
                dict(options) if isinstance(options, dict) else {})
    except Exception:  # noqa: BLE001 - the authors' file, a bare state dict…: not ours
        return None


def build_predictor(*, checkpoint=None, teacher=None, student=None, weights=None, student_output="softmax",
                    device="auto", precision="auto", require_weights=True, student_options=None,
                    map_name: str = "saliency") -> Predictor:
    """Exactly one of ``checkpoint``, ``teacher`` or ``student`` names the model; ``map_name`` picks one of a
    student's extra maps instead of its saliency logits."""
    predictor = _build_predictor(checkpoint=checkpoint, teacher=teacher, student=student, weights=weights,
                                 student_output=student_output, device=device, precision=precision,
                                 require_weights=require_weights, student_options=student_options)
    if map_name != "saliency":
        if not predictor.student or map_name not in predictor.model.extra_maps:
            has = predictor.model.extra_maps if predictor.student else ()
            raise PredictorError(f"{predictor.name} has no {map_name!r} map"
                                 + (f" (its maps: saliency, {', '.join(has)})" if has else " (only saliency)"))
        predictor.map_name = map_name
        predictor.name = f"{predictor.name} [{map_name} map]"
    return predictor


def options_mistake(*, checkpoint, teacher, student, weights, require_weights, student_options) -> str | None:
    """What is wrong with how the options name a model, as a sentence, before anything is read or built (the
    command line's usage mistakes); None if nothing."""
    given = [n for n, v in (("--checkpoint", checkpoint), ("--teacher", teacher), ("--student", student)) if v]
    if len(given) != 1:
        return ("name the model with exactly one of --checkpoint, --teacher or --student"
                + (f" (got {', '.join(given)})" if given else ""))
    if student_options and not student:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in student_options)
        return (f"{flags} go{'es' if len(student_options) == 1 else ''} with --student NAME (a checkpoint records "
                "its own options)")
    loss_only = [o.name for o in student_info(student).options if o.training_only and o.name in student_options] \
        if student and student_options and student in students_available() else []
    if loss_only:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in loss_only)
        return (f"{flags} weight{'' if len(loss_only) > 1 else 's'} {student}'s training loss alone and change"
                f"{'' if len(loss_only) > 1 else 's'} no map it computes: give {'them' if len(loss_only) > 1 else 'it'}"
                " to `pipeline train`, not here")
    if checkpoint and weights:
        return "--weights goes with --teacher or --student, not --checkpoint"
    if not checkpoint and weights == "random" and require_weights:
        return ("--weights random (architecture only: its maps mean nothing) is for `pipeline profile` and "
                "`pipeline export`; give real weights to score or predict")
    if student and weights is None and require_weights:
        return (f"--student {student} needs --weights (e.g. the authors' coco_A.pth, or imagenet for the ImageNet "
                "backbone alone); for a model you trained, use --checkpoint RUN_DIR")
    return None


def _build_predictor(*, checkpoint, teacher, student, weights, student_output, device, precision, require_weights,
                     student_options) -> Predictor:
    mistake = options_mistake(checkpoint=checkpoint, teacher=teacher, student=student, weights=weights,
                              require_weights=require_weights, student_options=student_options)
    if mistake:
        raise PredictorError(mistake)
    if checkpoint:
        return student_predictor(checkpoint, device=device, precision=precision, trained=require_weights)
    if teacher:
        return teacher_predictor(teacher, weights, device=device, precision=precision)
    return named_student_predictor(student, weights, student_output, device=device, precision=precision,
                                   options=student_options)
