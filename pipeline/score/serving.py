"""Students at serving speed: ONNX export, an ONNX Runtime predictor and a ``torch.compile`` predictor.

The exported graph is the student *with its input normalisation*: ``images`` uint8 RGB ``[B,3,H,W]``
(dynamic batch, the size it was exported at) → ``logits`` ``[B,1,H,W]``, so a server needs nothing but
ONNX Runtime. The file's metadata records the student, its options, the opset, the input size and how
its logits become a map (``map_kind``). ``onnx`` and ``onnxruntime`` are an optional extra
(``pip install 'saliency-pipeline[onnx]'``).

The ONNX Runtime session runs the graph fully optimised (``ORT_ENABLE_ALL``), sequentially, on
``torch.get_num_threads()`` intra-op threads (the cores, or ``OMP_NUM_THREADS``) that sleep rather than spin
between operators: on a CPU shared with other work, spinning threads halved batch-1 throughput, and
sleeping ones cost 10–13 % on a nearly idle one (``docs/benchmarks.md``).

``--runtime onnx-int8`` and ``export --quantize int8`` run the same graph quantized to int8 on calibration
images (:mod:`pipeline.score.quantize`).

``--runtime compile`` is the student under ``torch.compile``: ``mode="reduce-overhead"`` on CUDA (CUDA graphs,
for batch 1), inductor's default on the CPU (which needs a C++ compiler).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.atomic import atomic_open
from pipeline.common.tables import plural
from pipeline.score.predictors import Predictor, PredictorError
from students import Student
from teachers.backbones import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_OPSET = 17
#: how many images calibrate an int8 graph unless told (``--calibration-images``)
DEFAULT_CALIBRATION_IMAGES = 64


class ServingModel(torch.nn.Module):
    """uint8 images → the student's logits (its own normalisation inside).

    The ImageNet normalisation every student uses, ``(x / 255 − mean) / std``, is one multiply-add per channel
    here (``x · scale + shift``): one pass over the image instead of three in the exported graph."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.fused = type(student).normalize is Student.normalize
        if self.fused:
            device = next(student.parameters()).device
            mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
            self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.student(self.student.normalize(images))
        return self.student(torch.addcmul(self.shift, images.float(), self.scale))


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise PredictorError(f"this needs {module}: pip install 'saliency-pipeline[onnx]' "
                             "(onnx and onnxruntime)") from None


def onnx_bytes(predictor: Predictor, input_size: tuple[int, int], opset: int = DEFAULT_OPSET) -> bytes:
    """The student of ``predictor`` as an ONNX graph with a dynamic batch dimension."""
    if not predictor.student or predictor.map_name != "saliency":
        raise PredictorError("ONNX export is for students' saliency maps (--checkpoint or --student)")
    predictor.model.check_size(*input_size)
    onnx = _need("onnx")  # before the export: torch's exporter needs it too, and says so in a traceback
    model = ServingModel(predictor.model).cpu().eval()
    example = torch.randint(0, 256, (2, 3, *input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: a plain graph, exported in seconds
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks (constant here)
            torch.onnx.export(model, (example,), buf, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                              **kwargs)
    finally:
        predictor.model.to(predictor.device)
    graph = onnx.load_from_string(buf.getvalue())
    # the output's shape as declared for every student, [batch, 1, H, W] (the exporter leaves a resize's unnamed)
    dims = graph.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, ("batch", 1, *input_size)):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    h, w = input_size
    meta = {"student": predictor.model.name, "student_options": json.dumps(predictor.model.options()),
            "map_kind": predictor.kind, "input_size": f"{h}x{w}", "opset": str(opset), "source": predictor.name,
            "input": f"images: uint8 [batch, 3, {h}, {w}], RGB (not BGR), 0-255, the image resized to {h}x{w} "
                     "whatever its aspect ratio (no normalisation: it is in the graph)",
            "output": f"logits: float32 [batch, 1, {h}, {w}]; "
                      + ("softmax over the H*W pixels gives the saliency density" if predictor.kind == "logits" else
                         "their sigmoid gives the saliency map (normalise it to sum 1 for a density)")
                      + "; resize the map to the image's size"}
    if len(predictor.model.execution_modes) > 1:  # SACT, ACT: the graph traces the path that runs every unit
        meta["execution"] = f"{predictor.model.execution_modes[0]} (every unit at every position, masked)"
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    return graph.SerializeToString()


@dataclass
class ExportResult:
    out: Path
    opset: int
    input_size: tuple[int, int]
    max_abs_diff: float  # ONNX Runtime vs PyTorch on a random batch of 3, logits
    quantized: str = "no"  # or "int8 (N calibration images)"
    map_cc: float | None = None  # int8: the lowest map CC with PyTorch's on real images
    map_cc_images: str = ""  # which images those were

    def table(self) -> str:
        from pipeline.common.tables import table

        rows = [("output", str(self.out)), ("opset", str(self.opset)),
                ("input (HxW)", f"{self.input_size[0]}x{self.input_size[1]}, batch dynamic"),
                ("quantized", self.quantized), ("max |onnx − torch|", f"{self.max_abs_diff:.2e} (logits)")]
        if self.map_cc is not None:
            rows.append(("map CC with torch, lowest", f"{self.map_cc:.4f} ({self.map_cc_images})"))
        return table(None, rows)


def export_onnx(predictor: Predictor, out: str | Path, *, input_size: tuple[int, int] | None = None,
                opset: int = DEFAULT_OPSET, calibration: str | Path | None = None,
                calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> ExportResult:
    """Write the student as ONNX to ``out`` (atomically; a URL: written locally, then uploaded), then check ONNX
    Runtime against PyTorch on it. With ``calibration`` (a label folder or a folder of images) the graph is
    quantized to int8 on its first ``calibration_images`` images (:mod:`pipeline.score.quantize`) and its maps
    are compared with PyTorch's on the images after those."""
    from pipeline.common.storage import as_path

    size = tuple(input_size or predictor.input_size or (192, 256))
    _need("onnxruntime")  # the check after writing needs it: nothing is written without it
    if calibration is not None:
        from pipeline.score.quantize import quantize_mistake

        if mistake := quantize_mistake(predictor.model.name):  # (before the export and the calibration)
            raise PredictorError(mistake)
    x = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ServingModel(predictor.model).eval()(x.to(predictor.device)).float().cpu().numpy()
    if not np.isfinite(want).all():  # (a NaN difference passes every comparison; and the quantizer fails on it)
        raise PredictorError(f"{predictor.name} gives logits that are not finite (NaN or ±inf) on a random batch: "
                             "its weights are broken; nothing was written")
    data = onnx_bytes(predictor, size, opset)
    quantized, map_cc, which = "no", None, ""
    session = None
    if calibration is not None:
        from pipeline.score.quantize import (CHECK_IMAGES, LOW_MAP_CC, calibration_images as load, map_agreement,
                                             quantize_int8)

        images = load(calibration, size, calibration_images + CHECK_IMAGES)
        calib = images[:calibration_images]
        n = len(calib)
        check, which = (images[calibration_images:], f"{len(images) - calibration_images} held-out images") \
            if len(images) > calibration_images else (calib, f"the {plural(n, 'calibration image')}")
        data = quantize_int8(data, calib)
        session = OnnxSession(data)
        quantized = f"int8 ({plural(n, 'calibration image')})"
        map_cc = map_agreement(session.run, ServingModel(predictor.model).cpu().eval(), predictor.kind, check)
        if check is calib:
            warnings.warn(f"the int8 maps were compared with PyTorch's on the {plural(n, 'calibration image')} "
                          f"alone ({calibration} holds no more than --calibration-images {calibration_images}), which "
                          "a graph calibrated on unrepresentative images can match: give more images (or fewer "
                          "--calibration-images) to check it on held-out ones")
        if map_cc < LOW_MAP_CC:
            warnings.warn(f"the int8 maps agree poorly with PyTorch's (lowest CC {map_cc:.3f}, under {LOW_MAP_CC}): "
                          "calibrate on more images like those the student will serve, or serve the float graph")
    got = (session or OnnxSession(data)).run(x.numpy())
    if not np.isfinite(got).all():
        raise PredictorError(f"ONNX Runtime gives logits that are not finite (NaN or ±inf) where PyTorch's are on a "
                             f"random batch ({'the int8 graph' if session else 'the graph'}); nothing was written")
    out = as_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as f:
        f.write(data)
    return ExportResult(out, opset, size, float(np.abs(got - want).max()), quantized, map_cc, which)


class OnnxSession:
    """An ONNX Runtime CPU session over an exported student: uint8 ``[B,3,H,W]`` → logits."""

    def __init__(self, data: bytes, threads: int | None = None, spinning: bool = False):
        ort = _need("onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(images)})[0]


class OnnxModule(torch.nn.Module):
    """An ONNX Runtime session seen as a module of uint8 images → logits, for :class:`Predictor`."""

    def __init__(self, session: OnnxSession):
        super().__init__()
        self.session = session

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(images.cpu().numpy()))


def onnx_predictor(predictor: Predictor, input_size: tuple[int, int] | None = None, *,
                   calibration: str | Path | None = None,
                   calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> Predictor:
    """The same student served by ONNX Runtime on the CPU (exported in memory at ``input_size``); with
    ``calibration``, quantized to int8 on its first ``calibration_images`` images first."""
    size = tuple(input_size or predictor.input_size or (192, 256))
    if calibration is not None:
        from pipeline.score.quantize import calibration_images as load, quantize_int8, quantize_mistake

        if mistake := quantize_mistake(predictor.model.name):
            raise PredictorError(mistake)
    data, quantized = onnx_bytes(predictor, size), None
    if calibration is not None:
        data, quantized = quantize_int8(data, load(calibration, size, calibration_images)), "int8"
    return Predictor(f"{predictor.name} [onnxruntime{' int8' if quantized else ''}]", OnnxModule(OnnxSession(data)),
                     predictor.kind, size, torch.device("cpu"), autocast=False, reference=predictor.model,
                     quantized=quantized)


def _cxx() -> str | None:
    """The C++ compiler inductor would use on the CPU, if there is one."""
    from torch._inductor import config

    names = [c for c in config.cpp.cxx if c] + [os.environ.get("CXX", ""), "g++", "clang++", "c++"]
    return next((shutil.which(c) for c in names if c and shutil.which(c)), None)


class CompiledModule(torch.nn.Module):
    """The student under ``torch.compile`` (its normalisation inside), seen as a module of uint8 images → logits.

    On CUDA ``mode="reduce-overhead"`` replays each input shape as a CUDA graph, whose output buffer the next
    replay overwrites: each call's output is cloned."""

    #: the first passes compile (and on CUDA record graphs): ``profile`` warms up this many before timing
    warmup_passes = 8

    def __init__(self, student: torch.nn.Module, device: torch.device):
        super().__init__()
        self.serving = ServingModel(student).eval()
        self.cuda_graphs = device.type == "cuda"
        self.compiled = torch.compile(self.serving, mode="reduce-overhead" if self.cuda_graphs else None,
                                      dynamic=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.compiled(images)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(images).clone()


def compile_predictor(predictor: Predictor) -> Predictor:
    """The same student under ``torch.compile`` on its own device (compiled on the first batch of each size)."""
    if not predictor.student or predictor.map_name != "saliency":
        raise PredictorError("--runtime compile is for students' saliency maps (--checkpoint or --student)")
    if predictor.device.type == "cpu" and _cxx() is None:
        raise PredictorError("--runtime compile on the CPU needs a C++ compiler for torch.compile's inductor "
                             "(g++ or clang++, or $CXX): install one, or use --runtime torch or onnx")
    module = CompiledModule(predictor.model, predictor.device)
    return Predictor(f"{predictor.name} [torch.compile]", module, predictor.kind, predictor.input_size,
                     predictor.device, autocast=predictor.autocast, reference=predictor.model)
