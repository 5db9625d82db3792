"""The labelling worker: a plain class that holds one teacher and turns a shard plan into a shard.

Tests and benchmarks drive it in-process; :mod:`pipeline.label.driver` wraps it in a Ray actor.
Reading/decoding/resizing and encoding run in a small thread pool (OpenCV releases the GIL)
so they overlap with the teacher's forward pass.
"""

from __future__ import annotations

import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline import __version__
from pipeline.common import images
from pipeline.common.devices import autocast, resolve_device, use_autocast
from pipeline.common.maps import resize_label
from pipeline.common.prefetch import prefetched
from pipeline.common.storage import as_path
from pipeline.label.shards import ENCODING_VERSION, read_samples, tar_path, write_shard
from pipeline.label.sources import ImageRecord, ShardPlan
from teachers import Teacher, build_teacher
from teachers.registry import teacher_identity

#: how far a shard's labels may lie from the fp32 labels of the same images and weights, by the precision that
#: made them: bf16 maps correlate with the fp32 ones at least this well (Pearson CC per map; every registered
#: teacher is tested against it on real photos); fp32 labels are the reference (``None``). Recorded in every marker.
LABEL_TOLERANCE: dict[str, dict | None] = {"fp32": None, "bf16": {"vs_fp32_cc_min": 0.999}}


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


@dataclass
class _Item:
    record: ImageRecord
    image: np.ndarray | None = None  # at training size
    teacher_input: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    error: str | None = None


def encode_label(label: np.ndarray, kind: str) -> bytes | np.ndarray:
    """log density → float16 array (written as .npy); probability map → 8-bit PNG bytes."""
    if kind == "log_density":
        return label.astype(np.float16)
    return images.encode_png(np.rint(np.clip(label, 0.0, 1.0) * 255.0).astype(np.uint8))


def precision_name(autocast_on: bool) -> str:
    """The precision labels are made in: ``bf16`` (under bf16 autocast) or ``fp32``."""
    return "bf16" if autocast_on else "fp32"


def label_identity(config: LabelConfig, teacher: dict, precision: str) -> dict:
    """Settings recorded in every marker (and ``labels.json``); a shard made with other settings is not reused.

    ``teacher``: what the teacher's labels depend on (:func:`teachers.registry.teacher_identity`, or the same
    read off a built teacher); ``precision``: ``fp32`` or ``bf16``, as resolved on the device that labels.
    """
    return {
        **teacher,
        "precision": precision,
        "tolerance": LABEL_TOLERANCE[precision],
        "image_size": list(config.image_size),
        "jpeg_quality": config.jpeg_quality,
    }


def planned_identity(config: LabelConfig, precision: str, *, resolver=None) -> dict:
    """:meth:`ShardLabeler.identity` of a labeler of ``config`` labelling in ``precision``, without building its
    teacher: the weights are resolved and hashed, the network is not made (a missing file is one WeightsError
    naming every missing file)."""
    return label_identity(config, teacher_identity(config.teacher, config.weights, resolver=resolver), precision)


def _inside(path: str, root: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


class ShardLabeler:
    """Holds a frozen teacher; ``label_shard(plan, folder)`` writes one finished shard."""

    def __init__(self, config: LabelConfig, teacher: Teacher | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.autocast = use_autocast(self.device, config.precision)
        self.teacher = (teacher or build_teacher(config.teacher, weights=config.weights)).to(self.device).eval()
        self.pool = ThreadPoolExecutor(max(1, config.io_threads), thread_name_prefix="label-io")

    # -- what a finished shard must agree on ---------------------------------------------------
    def identity(self) -> dict:
        """Settings recorded in every marker; a shard made with other settings is not reused
        (:func:`planned_identity` gives the same without a teacher)."""
        t = self.teacher
        return label_identity(self.config, {
            "teacher": t.name,
            "weights_digest": t.weights_digest,
            "weights_random": t.weights_random,
            "label_kind": t.output_kind,
            "label_extension": f"{t.name}.{t.label_extension}",
            "label_version": t.label_version,
        }, precision_name(self.autocast))

    # -- the stages ----------------------------------------------------------------------------
    def _load(self, record: ImageRecord) -> _Item:
        item = _Item(record)
        try:
            if record.root is not None and not _inside(record.path, record.root):
                raise images.ImageError("outside the image folder (a symlink or path leading out of it; "
                                        "--allow-outside-root labels it anyway)")
            rgb = images.read_image(record.path, self.config.max_image_bytes)
        except images.ImageError as e:
            item.error = str(e)
            return item
        item.original_size = rgb.shape[:2]
        item.image = images.resize(rgb, self.config.image_size)
        size = self.teacher.input_size or self.config.image_size
        item.teacher_input = item.image if tuple(size) == tuple(self.config.image_size) else images.resize(rgb, size)
        return item

    def _loaded(self, records: tuple[ImageRecord, ...]) -> Iterator[_Item]:
        """Items in order, decoding at most a few batches ahead of the consumer."""
        window = 2 * self.config.batch_size + self.config.io_threads
        return (item for _, item in prefetched(self.pool, records, self._load, window))

    @torch.inference_mode()
    def _forward(self, batch: list[_Item]) -> np.ndarray:
        x = torch.from_numpy(np.stack([it.teacher_input for it in batch])).permute(0, 3, 1, 2)
        x = x.to(self.device, non_blocking=True)
        with autocast(self.device, self.autocast):
            maps = self.teacher(x)
        maps = resize_label(maps.float(), self.teacher.output_kind, self.config.image_size)
        return maps[:, 0].cpu().numpy()

    def _sample(self, item: _Item, label: np.ndarray) -> dict:
        t = self.teacher
        h, w = item.original_size
        return {
            "__key__": item.record.key,
            "jpg": images.encode_jpeg(item.image, self.config.jpeg_quality),
            f"{t.name}.{t.label_extension}": encode_label(label, t.output_kind),
            "json": {
                "id": item.record.source_id,
                "file": Path(item.record.path).name,
                "height": h,
                "width": w,
                "teacher": t.name,
                "weights_digest": t.weights_digest,
                "label_kind": t.output_kind,
                "encoding_version": ENCODING_VERSION,
                "code_version": __version__,
            },
        }

    def label_shard(self, plan: ShardPlan, folder: str | Path, progress: Callable[[int], None] | None = None,
                    reuse: dict | None = None) -> dict:
        """Label every image of ``plan`` and write ``<folder>/<plan.name>.tar`` + marker; returns the marker.

        ``reuse``: the marker of this shard's finished tar; its labelled samples are copied as they are
        and only the images it lists as failed are labelled again (``--retry-failed``). The tar holds
        the samples in plan order either way, so it is the tar a run where they never failed writes.
        When every one of them fails again, nothing is rewritten and ``reuse`` is returned.
        """
        folder = as_path(folder)
        t0 = time.perf_counter()
        timings = {"forward_s": 0.0, "wait_decode_s": 0.0, "wait_encode_s": 0.0}
        failures, encoded, batch = [], {}, []
        kept = {}
        if reuse:
            try:
                kept = read_samples(tar_path(folder, plan.name))
            except (OSError, ValueError, tarfile.TarError):
                kept = {}
            if list(kept) != reuse.get("keys"):  # not the tar the marker describes: label it all again
                kept, reuse = {}, None
        todo = tuple(r for r in plan.records if r.key not in kept)

        def flush():
            t = time.perf_counter()
            labels = self._forward(batch)
            timings["forward_s"] += time.perf_counter() - t
            for it, lab in zip(batch, labels):
                encoded[it.record.key] = self.pool.submit(self._sample, it, lab)
            if progress:
                progress(len(batch))
            batch.clear()

        t = time.perf_counter()
        for item in self._loaded(todo):
            timings["wait_decode_s"] += time.perf_counter() - t
            if item.error:
                failures.append({"key": item.record.key, "id": item.record.source_id,
                                 "file": item.record.path, "reason": item.error})
                if progress:
                    progress(1)
            else:
                batch.append(item)
                if len(batch) == self.config.batch_size:
                    flush()
            t = time.perf_counter()
        if batch:
            flush()
        if reuse and not encoded:
            return reuse  # every failed image failed again: the finished shard stays as it is
        t = time.perf_counter()
        fresh = {key: f.result() for key, f in encoded.items()}
        samples = [kept.get(r.key) or fresh[r.key] for r in plan.records if r.key in kept or r.key in fresh]
        timings["wait_encode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        marker = {
            "index": plan.index,
            "planned": len(plan.records),
            "count": len(samples),
            "keys": [s["__key__"] for s in samples],
            "failures": failures,
            "planned_keys": plan.keys,
            **self.identity(),
            "config": {k: v for k, v in asdict(self.config).items() if k not in ("teacher", "weights")},
            "device": str(self.device),
            "code_version": __version__,
        }
        if reuse:
            marker["reused"] = len(kept)
        timings["wall_s"] = time.perf_counter() - t0  # up to the write
        marker["timings"] = {k: round(v, 4) for k, v in timings.items()}
        written = write_shard(folder, plan.name, samples, marker)
        written["timings"]["write_s"] = round(time.perf_counter() - t, 4)
        return written

    def close(self) -> None:
        self.pool.shutdown(wait=True)
