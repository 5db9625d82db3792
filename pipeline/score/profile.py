"""How big and how fast a model is: parameters, FLOPs (torch's own counter) and measured throughput.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` at the given input size: 2 per
multiply-accumulate of convolutions and matrix products (elementwise ops, batch norm and activations are not
counted). Latency is the median wall time of repeated forward passes after warm-up (synchronised on GPU);
throughput is images per second at the given batch.

The inputs are one image of random noise, or real images (``images``). A dense model's FLOPs and speed do not
depend on them; SACT's do (a position that halts early skips the rest of its block), and the SACT paper's
measure is the mean over a validation set's images: FLOPs and the model's statistics are then the mean over
``images``, and the timed batches are made of them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.common.devices import autocast
from pipeline.common.tables import table
from pipeline.score.predictors import Predictor
from students import Student


@dataclass
class ModeResult:
    """One way of running the model (a student's execution mode; ``default`` otherwise)."""

    mode: str
    gflops: float  # executed per image, counted while it ran (the mean over the images)
    latency_ms: float  # one batch, median
    images_per_s: float
    stats: dict = field(default_factory=dict)  # the model's statistics of the FLOP-counted pass
    gflops_sd: float | None = None  # the standard deviation over the images (None: one image)
    encoder_gflops: float | None = None  # of the student's encoder_modules alone (None: no such split)
    #: the encoder's FLOPs as a percentage of the first path's, on the same image, mean and sd over the images
    #: (SACT's sparse path against its dense one: the SACT paper's "% of ResNet FLOPs", less the halting heads)
    encoder_percent: float | None = None
    encoder_percent_sd: float | None = None


@dataclass
class ProfileResult:
    model: str
    inputs: str  # "random" (one image of noise) or "N images of PATH"
    device: str
    input_size: tuple[int, int]
    params: int
    gflops: float  # the reference mode's
    batch_size: int
    latency_ms: float  # the reference mode's
    images_per_s: float  # the reference mode's
    precision: str
    modes: list[ModeResult] = field(default_factory=list)

    def table(self) -> str:
        rows = [("model", self.model), ("device", self.device), ("precision", self.precision),
                ("input (HxW)", f"{self.input_size[0]}x{self.input_size[1]}"),
                ("inputs", "one image of random noise" if self.inputs == "random" else self.inputs),
                ("parameters", f"{self.params:,}"),
                ("batch", str(self.batch_size))]
        for m in self.modes:
            tag = "" if len(self.modes) == 1 else f" ({m.mode})"
            spread = "" if m.gflops_sd is None else f" ± {m.gflops_sd:.3f} (sd over the images)"
            rows.append((f"GFLOPs / image{tag}", f"{m.gflops:.3f}{spread}"))
            if m.encoder_gflops is not None:
                rows.append((f"  of which encoder{tag}", f"{m.encoder_gflops:.3f}"))
            if m.encoder_percent is not None:
                sd = "" if m.encoder_percent_sd is None else f" ± {m.encoder_percent_sd:.1f}"
                rows.append((f"  encoder, % of {self.modes[0].mode}{tag}", f"{m.encoder_percent:.1f}{sd}"))
            rows += [(f"latency / batch{tag}", f"{m.latency_ms:.2f} ms"), (f"images/s{tag}", f"{m.images_per_s:.1f}")]
            rows += [(f"{k}{tag}", f"{v:.3f}") for k, v in m.stats.items()]
        return table(None, rows)

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(run, xs: list[torch.Tensor], dev: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of ``run(x)`` after ``warmup`` passes, ``x`` taking each of ``xs`` in turn."""
    times = []
    for i in range(warmup + iters):
        _sync(dev)
        t = time.perf_counter()
        run(xs[i % len(xs)])
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _encoder_flops(counter: FlopCounterMode, model: torch.nn.Module) -> int | None:
    """The FLOPs ``counter`` counted in the student's :attr:`~students.Student.encoder_modules` (None: it names
    none): all of them but those of its other top-level modules (the decoder). The counter files an operation
    under every module on the call stack (SACT's units run inside its ``blocks``, so they are filed under both
    ``SACT.blocks.0`` and ``SACT.resnet.layer1.0``), which is why the decoder's outermost entries are what is
    summed and taken away."""
    parts = getattr(model, "encoder_modules", ())
    if not parts:
        return None
    counts = counter.get_flop_counts()
    root = type(model).__name__
    names = [k for k in counts if k.startswith(f"{root}.") and k.split(".")[1] not in parts]
    outer = [k for k in names if not any(k.startswith(f"{o}.") for o in names)]
    return counter.get_total_flops() - sum(sum(counts[k].values()) for k in outer)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else None


@torch.inference_mode()
def profile(predictor: Predictor, *, input_size: tuple[int, int] | None = None, batch_size: int = 1,
            warmup: int = 3, iters: int = 10, images: list[np.ndarray] | None = None,
            images_from: str = "") -> ProfileResult:
    """Parameters, then for each execution mode of a student (one pass otherwise): GFLOPs executed per image
    (counted while it runs), the model's statistics, the median latency of a batch and images/s.

    ``images``: uint8 ``[1, 3, H, W]`` arrays at the input size (``images_from`` names where they came from):
    FLOPs and statistics are their mean, and the batches timed are made of them; else one image of noise."""
    size = tuple(input_size or predictor.input_size or (192, 256))
    model, dev, run = predictor.model, predictor.device, predictor.forward
    counted = predictor.reference if predictor.reference is not None else model  # FLOPs of the PyTorch model
    count = (lambda x: counted(counted.normalize(x))) if isinstance(counted, Student) else counted
    count_device = dev if counted is model else next(counted.parameters()).device
    if images:  # batches of them in turn, every image in one at least
        singles = [torch.from_numpy(a) for a in images]
        xs = [torch.cat([singles[(k * batch_size + i) % len(singles)] for i in range(batch_size)]).to(dev)
              for k in range(-(-len(singles) // batch_size))]
    else:
        gen = torch.Generator().manual_seed(0)
        singles = [torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, generator=gen)]
        xs = [torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, generator=gen).to(dev)]
    # a runtime's graph (ONNX, compiled) runs the path its student was in when it was made: that one alone
    modes = (model.execution_modes if predictor.student else
             (counted.execution,) if isinstance(counted, Student) else ("default",))
    warmup = max(warmup, getattr(model, "warmup_passes", 0))  # a compiled model's first passes compile
    results = []
    first_encoder: list[int] = []  # the first path's encoder FLOPs, per image
    try:
        for mode in modes:
            if predictor.student:
                model.set_execution(mode)
            with autocast(dev, predictor.autocast):
                sums: dict[str, float] = {}
                totals, encoders = [], []
                for x1 in singles:  # (outside inference mode, in which torch 2.4's FLOP counter counts nothing)
                    with torch.inference_mode(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
                        count(x1.to(count_device))
                    totals.append(counter.get_total_flops())
                    encoders.append(_encoder_flops(counter, counted))
                    for k, v in (counted.last_stats() if isinstance(counted, Student) else {}).items():
                        sums[k] = sums.get(k, 0.0) + v
                stats = {k: v / len(singles) for k, v in sums.items()}
                median = _time(run, xs, dev, warmup, iters)
            gflops, sd = _mean_sd([t / 1e9 for t in totals])
            result = ModeResult(mode, gflops, median * 1e3, batch_size / median, stats, gflops_sd=sd)
            if None not in encoders:
                result.encoder_gflops = statistics.fmean(encoders) / 1e9
                if not results:
                    first_encoder = encoders
                elif all(first_encoder):
                    result.encoder_percent, result.encoder_percent_sd = _mean_sd(
                        [100 * e / f for e, f in zip(encoders, first_encoder)])
            results.append(result)
    finally:
        if predictor.student:
            model.set_execution(modes[0])
    ref = results[0]
    precision = predictor.quantized or ("bf16" if predictor.autocast else "fp32")
    inputs = f"{len(images)} images of {images_from}" if images else "random"
    return ProfileResult(predictor.name, inputs, str(dev), size, sum(p.numel() for p in counted.parameters()),
                         ref.gflops, batch_size, ref.latency_ms, ref.images_per_s, precision, results)
