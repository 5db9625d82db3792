"""int8 students for the CPU: ONNX Runtime's static quantization of an exported student, calibrated on real
images, and how far its maps lie from PyTorch's.

The exported graph (:func:`pipeline.score.serving.onnx_bytes`) is shape-inferred and fused
(``quant_pre_process``), then quantized statically (``quantize_static``): weights int8 per output channel,
activations uint8 with ranges observed on the calibration images (MinMax), operators as ``QLinear*``
(QOperator), which ONNX Runtime runs with VNNI on x86 CPUs that have it. The calibration images are the
images the student will see: a label folder's stored JPEGs (the shards' ``jpg``), or a folder of images
resized to the graph's input size. They are taken in sorted order, so the same inputs give the same file.
"""

from __future__ import annotations

import logging
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.common.images import ImageError, decode_image, read_image, resize
from pipeline.score.predictors import PredictorError
from students import to_log_density

#: images after the calibration ones on which the int8 maps are compared with PyTorch's (fewer if the folder
#: has fewer; with none left over, the calibration images themselves, and a warning says so)
CHECK_IMAGES = 16
#: below this lowest map CC with PyTorch's, a warning says the int8 graph agrees poorly (a FastSal (A) trained 4
#: epochs on the sample, calibrated on its 12 val2017 photos, agreed at 0.986 to 0.993 on other photos; calibrated
#: on one black image, at 0.59 to 0.73)
LOW_MAP_CC = 0.95
#: students whose exported graphs ONNX Runtime's quantizer fails on (their halting branches)
NOT_QUANTIZED = ("sact", "act")


def quantize_mistake(student: str | None) -> str | None:
    """Why ``student`` cannot be quantized to int8 (refused before any work), or None."""
    if student in NOT_QUANTIZED:
        return (f"{student} cannot be quantized to int8: ONNX Runtime's quantizer fails on SACT's and ACT's "
                "halting graphs (FastSal (A) and (C) quantize); serve it as float (--runtime onnx, or export without "
                "--quantize)")
    return None


def calibration_images(path: str | Path, size: tuple[int, int], n: int, option: str = "--calibration"
                       ) -> list[np.ndarray]:
    """Up to ``n`` images of ``path`` as uint8 ``[1, 3, H, W]`` arrays at ``size``: the stored JPEGs of a label
    folder (its shards in order; a URL is read through fsspec, as training reads it), or the image files of a
    local folder (sorted, unreadable ones skipped). Errors name ``option``. What a folder's images leave out is
    a ``note:`` line on stderr, as ``predict`` says it: its files of other suffixes, and the image files that
    could not be read, counted with the first named."""
    from pipeline.common.storage import as_path, is_url
    from pipeline.label.shards import read_samples
    from pipeline.label.sources import SourceError, folder_records, left_out_note
    from pipeline.train.data import DataError, open_label_set

    path = as_path(path)
    out: list[np.ndarray] = []

    def add(rgb: np.ndarray) -> None:
        out.append(np.ascontiguousarray(resize(rgb, size).transpose(2, 0, 1)[None]))

    if (path / "labels.json").is_file():
        try:
            tars = open_label_set(path).tars
        except DataError as e:
            raise PredictorError(f"{option} {path}: {e}") from None
        for tar in tars:
            try:
                samples = read_samples(tar)
                for _, sample in sorted(samples.items()):
                    if len(out) < n and "jpg" in sample:
                        add(decode_image(sample["jpg"]))
            except (ValueError, OSError, tarfile.TarError, ImageError) as e:  # a damaged shard: one line
                raise PredictorError(f"{option} {path}: shard {Path(str(tar)).name} cannot be read ({e})") from None
            if len(out) >= n:
                break
    elif is_url(path):
        raise PredictorError(f"{option} {path}: no labels.json there; a URL is read as a label folder (a folder of "
                             "image files must be local)")
    elif path.is_dir():
        others: list[str] = []
        try:
            records = folder_records(path, keys=False, others=others)  # read by path: x.jpg beside x.png is fine
        except SourceError as e:
            raise PredictorError(f"{option} {path}: {e}") from None
        unreadable: list[tuple[str, str]] = []
        for record in records:
            if len(out) >= n:
                break
            try:
                add(read_image(record.path))
            except ImageError as e:
                unreadable.append((str(record.source_id), str(e)))
        if others:
            print(left_out_note(others), file=sys.stderr)
        if unreadable:
            k, (first, why) = len(unreadable), unreadable[0]
            print(f"note: left out {k} image file{'s' if k > 1 else ''} of {path} that could not be read "
                  f"({'the first, ' if k > 1 else ''}{first}: {why})", file=sys.stderr)
    else:
        raise PredictorError(f"{option} {path}: not a label folder (labels.json) or a folder of images")
    if not out:
        raise PredictorError(f"{option} {path}: no readable images")
    return out


def quantize_int8(data: bytes, images: list[np.ndarray]) -> bytes:
    """The ONNX graph ``data`` quantized to int8, calibrated on ``images`` (see the module's docstring); its
    metadata is kept, with ``quantized`` = ``int8`` and ``calibration_images`` added."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"images": x}

    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    with tempfile.TemporaryDirectory(prefix="pipeline-int8-") as tmp:
        src, pre, dst = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(data)
        logging.disable(logging.WARNING)  # the quantizer logs each tensor it leaves in float on the root logger
        try:
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except Exception as e:  # noqa: BLE001 - the quantizer's own failure, in one line
            student = meta.get("student", "this student")
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            raise PredictorError(f"ONNX Runtime's quantizer cannot quantize {student} to int8 ({type(e).__name__}: "
                                 f"{why})") from None
        finally:
            logging.disable(logging.NOTSET)
        graph = onnx.load(str(dst))
    meta.update(quantized="int8", calibration_images=str(len(images)))
    del graph.metadata_props[:]
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


def map_agreement(run, reference: torch.nn.Module, kind: str, images: list[np.ndarray]) -> float:
    """The lowest Pearson CC, over ``images``, between the maps of ``run`` (uint8 batch → logits, numpy) and
    those of ``reference`` (the PyTorch serving model)."""
    from pipeline.score.metrics import cc

    worst = 1.0
    for x in images:
        with torch.inference_mode():
            want = to_log_density(reference(torch.from_numpy(x)).float(), kind).exp()[0, 0].numpy()
        got = to_log_density(torch.from_numpy(run(x)).float(), kind).exp()[0, 0].numpy()
        worst = min(worst, float(cc(got, want)))
    return worst
