"""What a labelling run is asked for (:class:`LabelConfig`) and what every shard it writes records and is checked
against (its identity): the teacher and its weights' digest, the label kind and version, the precision as resolved
and the tolerance that precision is held to, where and how the photos were decoded and resized (the labels of the
paths differ by more than that tolerance), the stored image size and JPEG quality.

:func:`planned_identity` gives the identity without building the teacher (the driver checks finished shards
with it before any worker starts); :meth:`pipeline.label.worker.ShardLabeler.identity` gives the same off the
built teacher.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from pipeline.common import images
from teachers.registry import teacher_identity

#: where a worker decodes and resizes the photos: ``cpu`` (libjpeg-turbo, whole, then OpenCV's area filter),
#: ``cpu-reduced`` (the same, but a JPEG at least twice the size it is shrunk to decoded at 1/2, 1/4 or 1/8 of
#: its size by DCT scaling: :func:`pipeline.common.images.decode_at_least`), ``device`` (torchvision, nvJPEG on a
#: GPU, resized by torch on the teacher's device; on a CPU teacher too, which is how that path is tested). Their
#: labels differ by more than the bf16 tolerance, so the path is part of a shard's identity.
DECODE_PATHS = ("cpu", "cpu-reduced", "device")

#: how far a shard's labels may lie from the fp32 labels of the same images and weights, by the precision that
#: made them: bf16 maps correlate with the fp32 ones at least this well (Pearson CC per map; every registered
#: teacher is tested against it on real photos); fp32 labels are the reference (``None``). Recorded in every marker.
LABEL_TOLERANCE: dict[str, dict | None] = {"fp32": None, "bf16": {"vs_fp32_cc_min": 0.999}}


class LabelError(Exception):
    """The run cannot start (bad output folder, conflicting earlier labels, workers that cannot start…)."""


class StoreRefused(Exception):
    """Object storage refused a shard's reads or writes (down, credentials, no bucket): every other shard would
    wait and fail the same way. Raised by the labeller with the store's sentence as its message, a plain
    exception that survives Ray's pickling (which drops the botocore error an s3fs error is raised from)."""


class OutputRefused(StoreRefused):
    """The output folder's filesystem refused a write for good (full, over quota, read-only): every other shard
    would fail the same way, so the run stops at the first, keeping the finished shards."""


#: the errnos of a filesystem that refuses every write alike (:class:`OutputRefused`): full, over quota,
#: read-only, a file-size limit (``ulimit -f``)
FOR_GOOD = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
#: the same for good when it names a file of the output folder (an input refused is that image's failure)
FOR_GOOD_THERE = (errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class LabelConfig:
    teacher: str
    weights: str | None = None
    image_size: tuple[int, int] = (192, 256)  # (H, W) of the shard's jpg and label
    batch_size: int = 32
    jpeg_quality: int = 95
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    io_threads: int = 4
    max_image_bytes: int = images.MAX_IMAGE_BYTES  # a bigger file is a per-image failure
    # where JPEGs are decoded and resized (DECODE_PATHS): auto (on the teacher's GPU when it runs on one and its
    # decode_on_gpu says so, else cpu-reduced), cpu, cpu-reduced or device
    decode: str = "auto"

    def __post_init__(self):
        if self.decode not in ("auto", *DECODE_PATHS):
            raise ValueError(f"unknown decode {self.decode!r} (auto, {', '.join(DECODE_PATHS)})")


def precision_name(autocast_on: bool) -> str:
    """The precision labels are made in: ``bf16`` (under bf16 autocast) or ``fp32``."""
    return "bf16" if autocast_on else "fp32"


def decode_name(decode: str, on_gpu: bool, gpu_decode: bool = True) -> str:
    """Where a worker decodes and resizes its photos (one of :data:`DECODE_PATHS`): ``decode`` (a
    :class:`LabelConfig` setting) resolved for a worker on a GPU or not, of a teacher whose photos ``auto``
    decodes on its GPU or not (:attr:`teachers.Teacher.decode_on_gpu`); elsewhere ``auto`` is ``cpu-reduced``."""
    if decode != "auto":
        return decode
    return "device" if on_gpu and gpu_decode else "cpu-reduced"


def recorded_settings(marker: dict) -> dict:
    """A shard's marker with its decode path, which a marker written before markers recorded it has from its
    settings (before ``decode`` was a setting, photos were decoded on the CPU; until markers recorded the path,
    ``auto`` was ``device`` for every teacher on a GPU and ``cpu`` elsewhere); whatever a marker edited by hand
    holds there, the path is a string, never an error."""
    if "decode" in marker:
        return marker
    config = marker.get("config")
    decode = config.get("decode", "cpu") if isinstance(config, dict) else "cpu"
    on_gpu = str(marker.get("device")).startswith("cuda")
    return {**marker, "decode": "device" if decode == "device" or (decode == "auto" and on_gpu) else "cpu"}


def label_identity(config: LabelConfig, teacher: dict, precision: str, decode: str) -> dict:
    """Settings recorded in every marker (and ``labels.json``); a shard made with other settings is not reused.

    ``teacher``: what the teacher's labels depend on (:func:`teachers.registry.teacher_identity`, or the same
    read off a built teacher); ``precision``: ``fp32`` or ``bf16``, and ``decode``: one of :data:`DECODE_PATHS`
    (:func:`decode_name`), as resolved on the device that labels.
    """
    return {
        **teacher,
        "precision": precision,
        "tolerance": LABEL_TOLERANCE[precision],
        "decode": decode,
        "image_size": list(config.image_size),
        "jpeg_quality": config.jpeg_quality,
    }


def planned_identity(config: LabelConfig, precision: str, decode: str, *, resolver=None) -> dict:
    """:meth:`ShardLabeler.identity` of a labeler of ``config`` labelling in ``precision`` and decoding on
    ``decode``, without building its teacher: the weights are resolved and hashed, the network is not made (a
    missing file is one WeightsError naming every missing file)."""
    return label_identity(config, teacher_identity(config.teacher, config.weights, resolver=resolver), precision,
                          decode)
