"""The teacher contract shared by every teacher network.

A teacher is an ``nn.Module`` that takes a batch of uint8 RGB images ``[B, 3, H, W]`` on any
device and returns saliency maps ``[B, 1, H, W]`` (float32) at the *input* resolution, of one
declared kind:

* ``log_density``: per image, ``logsumexp`` over pixels is 0 (DeepGaze);
* ``probability_map``: values in ``[0, 1]`` (SalGAN, the classical teacher).

It also declares the input size it wants (``input_size``, ``(H, W)``, or ``None`` for "any"),
what its weights were (``weights_digest``, ``weights_random``), and may expose
``hint_features(images) -> list of 4 tensors`` for hint pretraining of students.
Teachers know nothing about Ray, tars or YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from teachers.weights import file_digest

OutputKind = Literal["log_density", "probability_map"]

#: how a label of each kind is stored in a shard (file extension after the teacher name)
LABEL_EXTENSION: dict[str, str] = {"log_density": "npy", "probability_map": "png"}


class Teacher(nn.Module):
    """Base class for teachers; subclasses implement :meth:`predict`."""

    #: registry name, also used as the label's extension prefix in shards (``<name>.npy``)
    name: str = "teacher"
    output_kind: OutputKind = "probability_map"
    #: (H, W) the teacher wants its input resized to, or ``None`` for any size
    input_size: tuple[int, int] | None = None
    #: version of the maps this teacher's code makes from given weights and images: bump it whenever a change
    #: of the code changes them (preprocessing, resizing, the centre bias…), so that finished shards of the
    #: old maps are not mixed with new ones (recorded in every shard marker)
    label_version: int = 1
    #: what :meth:`hint_features` gives, finest first: (channels, stride) per level (``()``: no hint features)
    hint_layout: tuple[tuple[int, int], ...] = ()
    #: labelling workers sharing a GPU by default (``pipeline label --workers-per-gpu``): more than one where
    #: the forward pass is so light that one worker process's data path, not the GPU, bounds the labelling
    workers_per_gpu: int = 1
    #: where ``pipeline label --decode auto`` decodes and resizes the photos when this teacher runs on a GPU:
    #: there (nvJPEG and torch) or, False, on the CPUs beside it, where the forward pass is so light that the
    #: GPU decode's turns on the GPU and on each worker's main thread cost more than the CPUs' time does
    decode_on_gpu: bool = True
    #: whether the label worker replays the forward pass on a GPU as CUDA graphs
    #: (:mod:`pipeline.common.cuda_graphs`): for a forward of many small operations, whose launches, not the
    #: GPU, bound it (DeepGaze's readout heads); the kernels and so the labels are the same
    cuda_graphs: bool = False

    def __init__(self) -> None:
        super().__init__()
        #: sha256 of the weights file, ``"random"`` or ``"none"`` (weight-free teacher)
        self.weights_digest: str = "none"
        #: true when the weights are a random initialisation: labels then mean nothing
        self.weights_random: bool = False

    @classmethod
    def check_weights(cls, name: str, weights: str | None) -> None:
        """Raise WeightsError when ``--weights weights`` cannot suit this teacher before any file is read
        (a weight-free teacher given weights, a teacher without a published default given none)."""

    @classmethod
    def weights_digest_of(cls, paths: list[Path]) -> str:
        """The ``weights_digest`` a teacher built from ``paths`` records: the files its registry entry needs
        (``teachers.registry.required_weights``), resolved, in that order; ``"none"`` when it needs none."""
        return file_digest(paths[0]) if paths else "none"

    @property
    def label_extension(self) -> str:
        return LABEL_EXTENSION[self.output_kind]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` float32 RGB in 0..255, ``[B, 3, H, W]`` → maps ``[B, 1, H, W]``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{self.name}: expected uint8 RGB images [B,3,H,W], got {images.dtype} {tuple(images.shape)}"
            )
        return self.predict(images.float()).float()

    def hint_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Four intermediate feature maps for hint pretraining (finest first)."""
        raise NotImplementedError(f"teacher {self.name!r} exposes no hint features")


def random_init(make: Callable[[], Teacher]) -> Teacher:
    """``--weights random``: the teacher ``make`` builds, initialised from a fixed seed (the caller's random
    state untouched), so that every worker, run and machine gets the same network and labels the same."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = make()
    model.weights_digest = "random"
    model.weights_random = True
    return model
