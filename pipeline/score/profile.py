"""How big and how fast a model is: parameters, FLOPs (torch's own counter) and measured throughput.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` for one forward pass at the
given input size: 2 per multiply-accumulate of convolutions and matrix products (elementwise ops,
batch norm and activations are not counted). Latency is the median wall time of repeated forward
passes after warm-up (synchronised on GPU); throughput is images per second at the given batch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.common.devices import autocast
from pipeline.common.tables import table
from pipeline.score.predictors import Predictor


@dataclass
class ProfileResult:
    model: str
    device: str
    input_size: tuple[int, int]
    params: int
    gflops: float
    batch_size: int
    latency_ms: float  # one batch, median
    images_per_s: float
    precision: str

    def table(self) -> str:
        rows = [("model", self.model), ("device", self.device), ("precision", self.precision),
                ("input (HxW)", f"{self.input_size[0]}x{self.input_size[1]}"), ("parameters", f"{self.params:,}"),
                ("GFLOPs / image", f"{self.gflops:.3f}"), ("batch", str(self.batch_size)),
                ("latency / batch", f"{self.latency_ms:.2f} ms"), ("images/s", f"{self.images_per_s:.1f}")]
        return table(None, rows)

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile(predictor: Predictor, *, input_size: tuple[int, int] | None = None, batch_size: int = 1,
            warmup: int = 3, iters: int = 10) -> ProfileResult:
    size = tuple(input_size or predictor.input_size or (192, 256))
    model, dev, run = predictor.model, predictor.device, predictor.forward
    x1 = torch.randint(0, 256, (1, 3, *size), dtype=torch.uint8, device=dev)
    with FlopCounterMode(display=False) as counter:
        run(x1)
    flops = counter.get_total_flops()
    x = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, device=dev)
    times = []
    with autocast(dev, predictor.autocast):
        for i in range(warmup + iters):
            _sync(dev)
            t = time.perf_counter()
            run(x)
            _sync(dev)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    median = statistics.median(times)
    return ProfileResult(predictor.name, str(dev), size, sum(p.numel() for p in model.parameters()), flops / 1e9,
                         batch_size, median * 1e3, batch_size / median, "bf16" if predictor.autocast else "fp32")
