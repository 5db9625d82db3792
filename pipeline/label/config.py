"""What a labelling run is asked for (:class:`LabelConfig`) and what every shard it writes records and is checked
against (its identity): the teacher and its weights' digest, the label kind and version, the precision as resolved
and the tolerance that precision is held to, where the photos were decoded and resized (the labels of the two
paths differ by more than that tolerance), the stored image size and JPEG quality.

:func:`planned_identity` gives the identity without building the teacher (the driver checks finished shards
with it before any worker starts); :meth:`pipeline.label.worker.ShardLabeler.identity` gives the same off the
built teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common import images
from teachers.registry import teacher_identity

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
    # where JPEGs are decoded and resized: auto (on the teacher's GPU when it runs on one, else the CPU),
    # cpu (libjpeg-turbo + OpenCV's area filter: the bytes of a CPU run), device (torchvision on the
    # teacher's device, resized by torch; on a CPU teacher too, which is how that path is tested)
    decode: str = "auto"

    def __post_init__(self):
        if self.decode not in ("auto", "cpu", "device"):
            raise ValueError(f"unknown decode {self.decode!r} (auto, cpu or device)")


def precision_name(autocast_on: bool) -> str:
    """The precision labels are made in: ``bf16`` (under bf16 autocast) or ``fp32``."""
    return "bf16" if autocast_on else "fp32"


def decode_name(decode: str, on_gpu: bool, gpu_decode: bool = True) -> str:
    """Where a worker decodes and resizes its photos: ``device`` (torchvision and torch on the teacher's device)
    or ``cpu`` (OpenCV), ``decode`` (a :class:`LabelConfig` setting) resolved for a worker on a GPU or not, of a
    teacher whose photos ``auto`` decodes on its GPU or not (:attr:`teachers.Teacher.decode_on_gpu`)."""
    return "device" if decode == "device" or (decode == "auto" and on_gpu and gpu_decode) else "cpu"


def recorded_settings(marker: dict) -> dict:
    """A shard's marker with its decode path, which a marker written before markers recorded it has from its
    settings (before ``decode`` was a setting, photos were decoded on the CPU; until markers recorded the path,
    ``auto`` decoded every teacher's photos on its GPU); whatever a marker edited by hand holds there, the path is
    a string, never an error."""
    if "decode" in marker:
        return marker
    config = marker.get("config")
    decode = config.get("decode", "cpu") if isinstance(config, dict) else "cpu"
    return {**marker, "decode": decode_name(str(decode), str(marker.get("device")).startswith("cuda"))}


def label_identity(config: LabelConfig, teacher: dict, precision: str, decode: str) -> dict:
    """Settings recorded in every marker (and ``labels.json``); a shard made with other settings is not reused.

    ``teacher``: what the teacher's labels depend on (:func:`teachers.registry.teacher_identity`, or the same
    read off a built teacher); ``precision``: ``fp32`` or ``bf16``, and ``decode``: ``cpu`` or ``device``
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
