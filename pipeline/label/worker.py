"""The labelling worker: a plain class that holds one teacher and turns a shard plan into a shard.

Tests and benchmarks drive it in-process; :mod:`pipeline.label.driver` wraps it in a Ray actor.

The data path is a pipeline of bounded stages that overlap: a decode pool (``io_threads`` threads)
reads, decodes and resizes images a window ahead of the teacher, and carries on into the next shard
(``next_plan``) before this one's tar is finished; the main thread batches and runs the teacher
(on a GPU one batch stays in flight: inputs staged in pinned memory, copies non-blocking, JPEGs
decoded by nvJPEG and resized on the device); an encode pool turns labels and images into PNG/npy
and JPEG bytes; a writer thread streams the samples, in plan order, into the tar while hashing it.
A CPU teacher runs on the threads the decode pool leaves (:attr:`ShardLabeler.teacher_threads`).

The same inputs give the same tar bytes on a CPU (tested) and, with cuDNN's deterministic kernels, on one
kind of GPU with one software stack (measured on an H200; another GPU or cuDNN may differ in the last bits).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline import __version__
from pipeline.common import images
from pipeline.common.cuda_graphs import GraphedForward
from pipeline.common.devices import autocast, available, resolve_device, use_autocast
from pipeline.common.errors import error_message, storage_error
from pipeline.common.maps import resize_label
from pipeline.common.prefetch import LoadAhead
from pipeline.common.storage import as_path
from pipeline.label.config import (FOR_GOOD, FOR_GOOD_THERE, LabelConfig, OutputRefused, StoreRefused, decode_name,
                                   label_identity, precision_name)
from pipeline.label.shards import (ENCODING_VERSION, SOURCE_FIELDS, ShardWriter, TarStream, encode_sample,
                                   read_samples, tar_path)
from pipeline.label.sources import ImageRecord, ShardPlan, inside
from teachers import Teacher, build_teacher


@dataclass
class _Item:
    record: ImageRecord
    image: np.ndarray | None = None  # at training size, RGB (H, W, 3)
    teacher_input: np.ndarray | None = None
    original_size: tuple[int, int] | None = None
    error: str | None = None
    data: torch.Tensor | None = None  # a JPEG left for the device to decode (its bytes as a uint8 tensor)
    nbytes: int | None = None  # the size of the file read (recorded: a later run tells a replaced image by it)
    mtime_ns: int | None = None  # … its modification time, and its content's digest (images.content_digest)
    content: str | None = None
    device_image: torch.Tensor | None = None  # decoded on the device: [3, H, W] at training size
    device_input: torch.Tensor | None = None  # … and at the teacher's size
    bgr: bool = False  # ``image`` holds its channels in OpenCV's order (made so on the device)


_CHUNK = 8  # samples per encode job


def quantize_label(maps: torch.Tensor, kind: str) -> torch.Tensor:
    """Labels at the precision the shard stores, computed where the maps are (a GPU does a batch at once):
    log density → float16; probability map → 8 bits, ``rint(clip(p, 0, 1) * 255)`` in float32 as NumPy
    computes it (the same bytes: one IEEE multiply, rounding half to even)."""
    if kind == "log_density":
        return maps.to(torch.float16)
    return maps.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def encode_label(label: np.ndarray, kind: str) -> bytes | np.ndarray:
    """A :func:`quantize_label` label as the tar holds it: log density → the float16 array (written as .npy);
    probability map → 8-bit PNG bytes."""
    return label if kind == "log_density" else images.encode_png(label)


def _inside(filename, folder) -> bool:
    """Whether ``filename`` (an error's: a str, bytes or None) is ``folder`` or lies in it (a URL folder never)."""
    return (isinstance(filename, str) and isinstance(folder, (str, os.PathLike))
            and inside(os.path.abspath(filename), os.path.abspath(folder)))


class ShardLabeler:
    """Holds a frozen teacher; ``label_shard(plan, folder)`` writes one finished shard."""

    def __init__(self, config: LabelConfig, teacher: Teacher | None = None):
        self.config = config
        self.device = available(resolve_device(config.device))
        self.autocast = use_autocast(self.device, config.precision)
        self.teacher = (teacher or build_teacher(config.teacher, weights=config.weights)).to(self.device).eval()
        self.pool = ThreadPoolExecutor(max(1, config.io_threads), thread_name_prefix="label-io")
        self._real_roots: dict[str, str] = {}  # an image folder → its real path

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
        }, precision_name(self.autocast), self._decode)

    # -- the stages ----------------------------------------------------------------------------
    @cached_property
    def encode_pool(self) -> ThreadPoolExecutor:
        """Label and JPEG encoding, apart from the decode pool (``self.pool``): neither waits behind the other."""
        return ThreadPoolExecutor(max(1, self.config.io_threads // 2), thread_name_prefix="label-encode")

    @cached_property
    def _ahead(self) -> LoadAhead:
        return LoadAhead(self.pool, self._load, 2 * self.config.batch_size + self.config.io_threads)

    @cached_property
    def _decode(self) -> str:
        """Where and how this worker decodes: one of ``DECODE_PATHS`` (:func:`decode_name`)."""
        return decode_name(self.config.decode, self.device.type == "cuda", self.teacher.decode_on_gpu)

    @cached_property
    def forward(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The teacher's forward pass as batches go through it: replayed as CUDA graphs on a GPU where the
        teacher asks for it (``Teacher.cuda_graphs``), its output then valid until the next batch."""
        if self.device.type == "cuda" and self.teacher.cuda_graphs:
            return GraphedForward(self.teacher)
        return self.teacher

    @cached_property
    def _device_decode(self) -> bool:
        return self._decode == "device"

    @cached_property
    def _teacher_size(self) -> tuple[int, int]:
        return tuple(self.teacher.input_size or self.config.image_size)

    @cached_property
    def teacher_threads(self) -> int:
        """Intra-op threads of a CPU teacher: the process's threads less the decode pool's, at least one. The
        decode threads run beside the forward pass; OpenMP threads on cores they occupy wait at every barrier
        (on a 2-core machine, 2 threads ran the classic teacher 2-4x slower than 1 amid decoding)."""
        return max(1, torch.get_num_threads() - self.config.io_threads)

    @contextlib.contextmanager
    def _teacher_threads(self) -> Iterator[None]:
        """Run the CPU teacher on :attr:`teacher_threads` threads, as they were afterwards (the setting is
        the process's; nothing else of the worker runs torch meanwhile)."""
        before = torch.get_num_threads()
        n = self.teacher_threads
        if n != before:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if n != before:
                torch.set_num_threads(before)

    @cached_property
    def _cuda_ready(self) -> bool:
        """Once, before the first batch on a GPU: cuDNN runs deterministic kernels, and the teacher takes
        channels-last input (what tensor cores want). With ``cudnn.benchmark`` cuDNN picked kernels by timing
        them, and two runs of DeepGaze IIE on one H200 gave labels one float16 step apart in every image; with
        deterministic kernels the tars were byte-identical, at the same speed (docs/benchmarks.md)."""
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        self.teacher.to(memory_format=torch.channels_last)
        return True

    def _real_root(self, root: str) -> str:
        if root not in self._real_roots:
            self._real_roots[root] = os.path.realpath(root)
        return self._real_roots[root]

    def _load(self, record: ImageRecord) -> _Item:
        """Read one image and (unless it is a JPEG the device decodes) decode and resize it."""
        item = _Item(record)
        try:
            root = self._real_root(record.root) if record.root is not None else None
            data, st = images.read_source(record.path, self.config.max_image_bytes, root=root)
            item.nbytes, item.mtime_ns, item.content = len(data), st.st_mtime_ns, images.content_digest(data)
            if self._device_decode and images.is_jpeg(data) and images.decodable_size(data):
                item.data = images.as_tensor(data)  # here, on a decode thread, not on the one that runs the GPU
                return item
            if self._decode == "cpu-reduced":
                self._resized(item, *images.decode_at_least(data, self._decoded_size))
            else:
                self._resized(item, images.decode_image(data))
        except images.ImageError as e:
            item.error = str(e)
        return item

    @cached_property
    def _decoded_size(self) -> tuple[int, int]:
        """The least (H, W) a photo is decoded at on the ``cpu-reduced`` path: both sizes it is resized to."""
        return tuple(max(a, b) for a, b in zip(self.config.image_size, self._teacher_size))

    def _resized(self, item: _Item, rgb: np.ndarray, original_size: tuple[int, int] | None = None) -> None:
        """Resize a decoded photo for the shard and the teacher; ``original_size``: its full (H, W), where it was
        decoded reduced."""
        item.original_size = tuple(original_size or rgb.shape[:2])
        item.image = images.resize(rgb, self.config.image_size)
        size = self._teacher_size
        item.teacher_input = item.image if size == tuple(self.config.image_size) else images.resize(rgb, size)

    def _loaded(self, records: tuple[ImageRecord, ...], then: tuple[ImageRecord, ...] = ()) -> Iterator[_Item]:
        """Items in order, decoding at most a few batches ahead of the consumer; once every record is
        under way, the decoding of ``then`` (the next shard's records) starts."""
        return (item for _, item in self._ahead.run(records, then))

    def _decode_on_device(self, batch: list[_Item]) -> None:
        """Decode the batch's JPEGs on the teacher's device in one call and resize them there; an image the
        device cannot decode takes the CPU path (and its error, if it fails there too, is the item's). On a GPU
        this runs between the teacher's batches (on an H100, decoding on a thread of its own while the teacher ran,
        resizing on the teacher's stream, hid none of it: ``bench/device_decode.py``)."""
        todo = [it for it in batch if it.data is not None]
        if not todo:
            return
        size, tsize = tuple(self.config.image_size), self._teacher_size
        decoded = []
        for it, img in zip(todo, images.decode_jpegs([it.data for it in todo], self.device)):
            data, it.data = it.data, None
            if img is None:
                try:
                    self._resized(it, images.decode_image(data.numpy().tobytes()))
                except images.ImageError as e:
                    it.error = str(e)
                continue
            it.original_size = tuple(img.shape[1:])
            decoded.append((it, img))
        if not decoded:
            return
        shard = images.resize_tensors([img for _, img in decoded], size)
        teacher = shard if tsize == size else images.resize_tensors([img for _, img in decoded], tsize)
        for (it, _), image, x in zip(decoded, shard, teacher):
            it.device_image, it.device_input = image, x

    def _staged(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """Host images ``(H, W, 3)`` → ``[n, 3, H, W]`` uint8 on the device (channels-last memory); on a
        GPU stacked straight into pinned memory and copied without blocking."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        staged = torch.empty((len(arrays), *arrays[0].shape), dtype=torch.uint8, pin_memory=True)
        np.stack(arrays, out=staged.numpy())
        return staged.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def _teacher_batch(self, batch: list[_Item]) -> torch.Tensor:
        on_device = [i for i, it in enumerate(batch) if it.device_input is not None]
        if not on_device:
            return self._staged([it.teacher_input for it in batch])
        if len(on_device) == len(batch):  # the usual case on a GPU: no index (a list index is copied to the device)
            x = torch.stack([it.device_input for it in batch])
            return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x
        # some decoded on the host (a PNG, a JPEG nvJPEG refused): staged together, then stacked in batch order
        # (indexing a GPU tensor with a list would copy the list from pageable memory: a wait for the GPU)
        staged = iter(self._staged([it.teacher_input for it in batch if it.device_input is None]).unbind(0))
        x = torch.stack([it.device_input if it.device_input is not None else next(staged) for it in batch])
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    @torch.inference_mode()
    def _submit(self, batch: list[_Item]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Start the teacher on ``batch`` (every item decoded). Returns a function that waits for the labels,
        ``[B, H, W]`` at the shard's size as :func:`quantize_label` stores them, and whether each is finite
        (``[B]`` bool), and fills ``item.image`` of the images decoded on the device (in OpenCV's channel
        order, ready for its JPEG encoder). On a GPU nothing here blocks: results come back through pinned
        memory."""
        cuda = self.device.type == "cuda"
        if cuda:
            _ = self._cuda_ready
        x = self._teacher_batch(batch)
        on_device = [it for it in batch if it.device_image is not None]
        shard_images = None
        if on_device:  # [n, H, W, 3], BGR
            shard_images = torch.stack([it.device_image for it in on_device]).permute(0, 2, 3, 1).flip(-1)
        for it in on_device:
            it.device_image = it.device_input = None
            it.bgr = True
        with contextlib.nullcontext() if cuda else self._teacher_threads():
            with autocast(self.device, self.autocast):
                maps = self.forward(x)
            maps = resize_label(maps.float(), self.teacher.output_kind, self.config.image_size)[:, 0]
            finite = torch.isfinite(maps).flatten(1).all(1)
            maps = quantize_label(maps, self.teacher.output_kind)
        if not cuda:  # views, no copies (a torch copy would wake its OpenMP threads, which then spin)
            labels, ok = maps.numpy(), finite.numpy()
            host = shard_images.contiguous().numpy() if on_device else None
            event = None
        else:
            labels_t = torch.empty(maps.shape, dtype=maps.dtype, pin_memory=True)
            labels_t.copy_(maps, non_blocking=True)
            labels = labels_t.numpy()
            ok_t = torch.empty(finite.shape, dtype=torch.bool, pin_memory=True)
            ok_t.copy_(finite, non_blocking=True)
            ok = ok_t.numpy()
            host = None
            if on_device:
                host_t = torch.empty(shard_images.shape, dtype=torch.uint8, pin_memory=True)
                host_t.copy_(shard_images, non_blocking=True)
                host = host_t.numpy()
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # (the teacher's GPU's stream, not GPU 0's)

        def wait() -> tuple[np.ndarray, np.ndarray]:
            if event is not None:
                event.synchronize()
            for it, img in zip(on_device, host if host is not None else ()):
                it.image = img
            return labels, ok

        return wait

    def _sample(self, item: _Item, label: np.ndarray) -> dict:
        t = self.teacher
        h, w = item.original_size
        return {
            "__key__": item.record.key,
            "jpg": images.encode_jpeg(item.image, self.config.jpeg_quality, bgr=item.bgr),
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

    def _encoded(self, pairs: list[tuple[_Item, np.ndarray]]) -> list[dict]:
        """Samples as the tar holds them (bytes per member), made on an encode thread."""
        return [encode_sample(self._sample(item, label)) for item, label in pairs]

    def label_shard(self, plan: ShardPlan, folder: str | Path, progress: Callable[[int], None] | None = None,
                    reuse: dict | None = None, next_plan: ShardPlan | None = None) -> dict:
        """:meth:`write_shard`, a refusal of object storage raised as :class:`StoreRefused`, and a filesystem that
        refuses every write (full, read-only) as :class:`OutputRefused`."""
        try:
            # cuda:N the current device meanwhile: the streams, events, pinned buffers and graphs that name none
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                return self.write_shard(plan, folder, progress=progress, reuse=reuse, next_plan=next_plan)
        except Exception as e:
            refused = storage_error(e)
            if refused:
                raise StoreRefused(refused) from None
            # a full disk, or a folder made read-only mid-run: no shard after it would fare better
            if isinstance(e, OSError) and (e.errno in FOR_GOOD or (e.errno in FOR_GOOD_THERE
                                                                   and _inside(e.filename, folder))):
                limit = (" (a file-size limit below a shard's size, `ulimit -f`: raise it, or label with a smaller "
                         "--shard-size)") if e.errno == errno.EFBIG else ""
                raise OutputRefused(error_message(e) + limit) from None
            raise

    def write_shard(self, plan: ShardPlan, folder: str | Path, progress: Callable[[int], None] | None = None,
                    reuse: dict | None = None, next_plan: ShardPlan | None = None) -> dict:
        """Label every image of ``plan`` and write ``<folder>/<plan.name>.tar`` + marker; returns the marker.

        ``reuse``: the marker of this shard's finished tar; its labelled samples are copied as they are
        and only the images it lists as failed are labelled again (``--retry-failed``). The tar holds
        the samples in plan order either way, so it is the tar a run where they never failed writes.
        When every one of them fails again, nothing is rewritten and ``reuse`` is returned.

        ``next_plan``: the shard this worker will most likely be handed next; its images start decoding
        once this shard's are all under way (a guess that turns out wrong costs only that decoding).
        """
        folder = as_path(folder)
        t0 = time.perf_counter()
        timings = {"forward_s": 0.0, "wait_decode_s": 0.0, "device_decode_s": 0.0, "wait_encode_s": 0.0}
        failures: list[dict] = []
        kept = {}
        if reuse:
            try:
                kept = read_samples(tar_path(folder, plan.name))
            except (OSError, ValueError, tarfile.TarError):
                kept = {}
            if list(kept) != reuse.get("keys"):  # not the tar the marker describes: label it all again
                kept, reuse = {}, None
        todo = tuple(r for r in plan.records if r.key not in kept)
        order = {r.key: i for i, r in enumerate(plan.records)}
        kept_left = deque(r.key for r in plan.records if r.key in kept)  # plan order
        fresh: set[str] = set()
        # what each source was (bytes, modification time, content digest): a later run tells a replaced one by it
        sources = {field: {k: v for k, v in ((reuse or {}).get(field) or {}).items() if k in kept}
                   for field in SOURCE_FIELDS}
        stream = TarStream(folder, plan.name, depth=2 * self.config.batch_size // _CHUNK + 2, writer=ShardWriter)
        in_flight: deque = deque()  # (items, wait) of batches on the device
        depth = 1 if self.device.type == "cuda" else 0

        def fail(item: _Item) -> None:
            failures.append({"key": item.record.key, "id": item.record.source_id,
                             "file": item.record.path, "reason": item.error})
            if progress:
                progress(1)

        def emit(batch: list[_Item], wait: Callable[[], tuple[np.ndarray, np.ndarray]]) -> None:
            """A batch's labels are back: encode its samples and queue them for the tar, in plan order."""
            t = time.perf_counter()
            labels, finite = wait()
            timings["forward_s"] += time.perf_counter() - t
            chunk: list = []  # encoded together: one job and one queue entry per few samples, not per sample

            def put_chunk():
                if chunk:
                    stream.put(self.encode_pool.submit(self._encoded, chunk.copy()))
                    chunk.clear()

            done = 0
            for it, label, ok in zip(batch, labels, finite):
                if not ok:  # a label of NaN or inf would be stored as garbage and poison training
                    it.error = "the teacher's map holds NaN or inf values"
                    fail(it)
                    continue
                done += 1
                if kept_left and order[kept_left[0]] < order[it.record.key]:
                    put_chunk()
                    while kept_left and order[kept_left[0]] < order[it.record.key]:
                        stream.put(kept[kept_left.popleft()])
                chunk.append((it, label))
                fresh.add(it.record.key)
                if it.nbytes is not None:
                    for field, value in zip(SOURCE_FIELDS, (it.nbytes, it.mtime_ns, it.content)):
                        sources[field][it.record.key] = value
                if len(chunk) == _CHUNK:
                    put_chunk()
            put_chunk()
            if progress:
                progress(done)

        def flush(batch: list[_Item]) -> None:
            t = time.perf_counter()
            if self._device_decode:
                self._decode_on_device(batch)
            timings["device_decode_s"] += time.perf_counter() - t
            t = time.perf_counter()
            ok = [it for it in batch if not it.error]
            for it in batch:
                if it.error:
                    fail(it)
            if ok:
                in_flight.append((ok, self._submit(ok)))
            timings["forward_s"] += time.perf_counter() - t
            while len(in_flight) > depth:
                emit(*in_flight.popleft())

        try:
            batch: list[_Item] = []
            t = time.perf_counter()
            for item in self._loaded(todo, next_plan.records if next_plan is not None else ()):
                timings["wait_decode_s"] += time.perf_counter() - t
                if item.error:
                    fail(item)
                else:
                    batch.append(item)
                    if len(batch) == self.config.batch_size:
                        flush(batch)
                        batch = []
                t = time.perf_counter()
            if batch:
                flush(batch)
            while in_flight:
                emit(*in_flight.popleft())
            if reuse and not fresh:
                return reuse  # every failed image failed again: the finished shard stays as it is
            while kept_left:
                stream.put(kept[kept_left.popleft()])
            t = time.perf_counter()
            stream.drain()
            timings["wait_encode_s"] = time.perf_counter() - t
            timings.update(stream.seconds)  # where the tar's stage waited, and how long it wrote
        except BaseException:
            stream.abort()
            raise
        failures.sort(key=lambda f: order[f["key"]])
        keys = [r.key for r in plan.records if r.key in kept or r.key in fresh]
        t = time.perf_counter()
        marker = {
            "index": plan.index,
            "planned": len(plan.records),
            "count": len(keys),
            "keys": keys,
            "failures": failures,
            "planned_keys": plan.keys,
            **{field: {k: got[k] for k in keys if k in got} for field, got in sources.items()},
            **self.identity(),
            "config": {k: v for k, v in asdict(self.config).items() if k not in ("teacher", "weights")},
            "device": str(self.device),
            "code_version": __version__,
        }
        if reuse:
            marker["reused"] = len(kept)
        timings["wall_s"] = time.perf_counter() - t0  # up to the write
        marker["timings"] = {k: round(v, 4) for k, v in timings.items()}
        written = stream.writer.finish(marker)
        written["timings"]["write_s"] = round(time.perf_counter() - t, 4)
        return written

    def close(self) -> None:
        if "_ahead" in self.__dict__:
            self._ahead.cancel()
        self.pool.shutdown(wait=True)
        if "encode_pool" in self.__dict__:
            self.encode_pool.shutdown(wait=True)
