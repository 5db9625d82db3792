"""The student contract: what every student is, whatever its family.

A student is an ``nn.Module`` subclass of :class:`Student` that

* normalises its own input: :meth:`Student.normalize` turns uint8 RGB ``[B,3,H,W]`` into what its
  ``forward`` takes (ImageNet mean/std for the torchvision backbones here);
* returns saliency **logits** ``[B,1,H,W]`` at the input size from ``forward``; how logits become a map
  depends on the teacher it learnt from (:func:`student_kind`: softmax over pixels after a density
  teacher, sigmoid after a map teacher);
* declares :attr:`Student.stride`, which the input's height and width must divide;
* may give **hint features** (:attr:`Student.hint_channels` non-empty and :meth:`Student.hint_features`)
  for hint pretraining against a teacher's intermediate maps;
* may add **extra loss terms** to the distillation loss (:meth:`Student.forward_train` returns them
  by name, already weighted, e.g. SACT's ponder cost τ·Σρ, with scalar statistics to log);
* may emit **extra maps** (:attr:`Student.extra_maps` names them, :meth:`Student.maps` computes them
  with the logits, e.g. SACT's ponder map), each ``[B,1,H,W]`` at the input size.

Its checkpoints are plain ``state_dict`` s of the module plus the registry name and the builder's
options (:meth:`Student.options`), so ``build_student(name, **options)`` rebuilds the architecture
before the weights load strictly. ``backbone_prefix`` names the keys that must all be present when a
stage starts from another checkpoint (``--init``: the hint stage's encoder starts fine-tuning).

Students know nothing of Ray, tars or YAML; the pipeline speaks only to this contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from teachers.backbones import IMAGENET_MEAN, IMAGENET_STD

#: MATLAB's eps, the floor the saliency benchmark code (and pysaliency) puts under densities
EPS = 2.2204e-16


#: ImageNet mean and std ``[1,3,1,1]`` per device: made once, so that normalising a batch on a GPU copies
#: nothing from the host (a copy from pageable memory would synchronise every forward)
_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    found = _MEAN_STD.get(device)
    if found is None:
        with torch.inference_mode(False):  # ordinary tensors, usable under autograd too
            found = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
                     torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
        _MEAN_STD[device] = found
    return found


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``[B,3,H,W]`` → float, /255 and ImageNet mean/std."""
    mean, std = _mean_std(images.device)
    return (images.float() / 255.0 - mean) / std


def to_log_density(maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Teacher output or student logits ``[B,1,H,W]`` → a log density over each image's pixels.

    ``kind``: ``log_density`` / ``probability_map`` (a teacher's output kind), ``logits`` (a student
    after a density teacher: softmax over pixels) or ``sigmoid_logits`` (after a map teacher).
    """
    b = maps.shape[0]
    flat = maps.float().reshape(b, -1)
    if kind == "log_density":
        out = flat - flat.logsumexp(1, keepdim=True)
    elif kind == "probability_map":
        p = flat.clamp_min(0) + EPS
        out = (p / p.sum(1, keepdim=True)).log()
    elif kind == "sigmoid_logits":
        out = torch.nn.functional.logsigmoid(flat)
        out = out - out.logsumexp(1, keepdim=True)
    elif kind == "logits":
        out = torch.log_softmax(flat, dim=1)
    else:
        raise ValueError(f"unknown map kind {kind!r}")
    return out.reshape(maps.shape)


def student_kind(label_kind: str) -> str:
    """How a student's logits become a map: softmax over pixels after density labels, sigmoid after maps."""
    return "logits" if label_kind == "log_density" else "sigmoid_logits"


class TrainOutput(NamedTuple):
    """What a training step gets from a student (:meth:`Student.forward_train`)."""

    logits: torch.Tensor  # [B,1,H,W]
    #: extra loss terms, scalar and already weighted, added to the distillation loss (e.g. τ·Σρ); a student with
    #: some passes its own dict (the default, shared by every output without, cannot be written into)
    losses: Mapping[str, torch.Tensor] = MappingProxyType({})
    #: scalar statistics to log beside the loss (e.g. each block's mean ponder cost); never differentiated
    logs: Mapping[str, torch.Tensor] = MappingProxyType({})


class Student(nn.Module):
    """Base class of students; subclasses implement ``forward`` (normalised images → logits)."""

    #: registry name (set by :func:`students.registry.register`)
    name: ClassVar[str] = "student"
    #: input height and width must be multiples of this
    stride: ClassVar[int] = 1
    #: channels of the hint features, finest first; empty: the student has no hint stage
    hint_channels: ClassVar[tuple[int, ...]] = ()
    #: the stride of each of :attr:`hint_channels`' levels (a teacher's hint features must match both)
    hint_strides: ClassVar[tuple[int, ...]] = ()
    #: state-dict prefix that must be fully present when a stage starts from another checkpoint
    backbone_prefix: ClassVar[str] = ""
    #: names of the extra maps :meth:`maps` returns besides ``saliency``
    extra_maps: ClassVar[tuple[str, ...]] = ()
    #: names of the statistics :meth:`forward_train` logs (``TrainOutput.logs``), as columns of the run's logs
    log_names: ClassVar[tuple[str, ...]] = ()
    #: URL of the ImageNet weights ``backbone_weights="imagenet"`` loads (cached under its file name), if any
    backbone_url: ClassVar[str | None] = None
    #: the top-level submodules that make the encoder (the backbone, with SACT's halting): ``profile`` counts
    #: their FLOPs apart, the figure adaptive-computation papers compare (the SACT paper's are the ResNet's alone)
    encoder_modules: ClassVar[tuple[str, ...]] = ()
    #: ways of computing the same function at inference (e.g. SACT's dense-masked reference and its sparse
    #: path); the first is the reference. ``profile`` times each; set one with :meth:`set_execution`.
    execution_modes: ClassVar[tuple[str, ...]] = ("dense",)

    def __init__(self) -> None:
        super().__init__()
        #: sha256 of the weights file the student was built from, or "none"
        self.weights_digest = "none"
        self.execution = self.execution_modes[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images)

    @classmethod
    def imagenet_url(cls, **options) -> str | None:
        """The URL ``backbone_weights="imagenet"`` loads for a student built with ``options`` (for the
        list of files a step needs; a family whose backbone depends on its options overrides this)."""
        return cls.backbone_url

    def options(self) -> dict:
        """The builder's keyword options that shape this architecture (recorded in checkpoints)."""
        return {}

    def check_size(self, height: int, width: int) -> None:
        if height % self.stride or width % self.stride:
            raise ValueError(f"{self.name}: input height and width must be multiples of {self.stride}, "
                             f"got {height}×{width}")

    def forward_train(self, x: torch.Tensor) -> TrainOutput:
        """Logits, the extra loss terms this student adds to the distillation loss, and statistics to log."""
        return TrainOutput(self(x))

    def maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"saliency": logits, <extra map>: [B,1,H,W], …}`` for normalised images ``x``."""
        return {"saliency": self(x)}

    def set_execution(self, mode: str) -> None:
        if mode not in self.execution_modes:
            raise ValueError(f"{self.name} runs {', '.join(self.execution_modes)}, not {mode!r}")
        self.execution = mode

    def last_stats(self) -> dict[str, float]:
        """Statistics of the last forward pass (e.g. SACT's ponder cost per block), for ``profile``."""
        return {}

    def hint_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features matched to the teacher's hint features (one per entry of :attr:`hint_channels`)."""
        raise NotImplementedError(f"student {self.name!r} has no hint stage")
