"""A module's forward pass replayed as CUDA graphs: the same kernels without the Python and launch cost of
each of its operations.

DeepGaze IIE runs about 39,000 torch operations per forward pass (four backbones, 120 readout heads and
their blurs), most on maps of a few thousand values: on an H200, at 192×256, a batch of 64 took as long as the
CPU took to issue them (264 ms of wall-clock, 264 ms of CPU), and one image 210 ms (docs/benchmarks.md). A
CUDA graph records the kernels once and replays them in one call, so the GPU, not the interpreter, sets the
pace, and the worker's other threads get the interpreter lock back.

:class:`GraphedForward` keeps one graph per input shape, dtype, memory format and autocast state, all in one
memory pool (the GPU holds one batch's activations for them, not one per shape: a shard's last, smaller batch
is a second shape). The first batch of a shape runs eagerly (it fills the module's caches and warms cuDNN);
the second is captured and every later one replays. The graph runs the kernels eager mode ran (cuDNN
deterministic, as the label worker sets it), so the outputs are the same bits. The output is a buffer of the
pool, overwritten by the next call: use it on the current stream before calling again (the label worker
resizes it at once), or clone it. The graphs read the module's parameters and caches where they were when
captured: move or convert the module before its first call, not after, and keep the shapes few (DeepGaze's
centre bias keeps 16 sizes: a seventeenth would drop a tensor a graph still reads; the worker has one size). A capture that fails leaves the module
eager for good, with one warning; a forward that reads a value back from the GPU cannot be captured, and a
failed capture can leave PyTorch's allocator holding some memory for the rest of the process, so only a teacher
whose forward never synchronises asks for graphs (``Teacher.cuda_graphs``; DeepGaze IIE's is tested so).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch


class GraphedForward:
    """``fn(x)`` replayed as a CUDA graph per kind of input (see the module's docstring); eager on a CPU."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_graphs: int = 4, warmup: int = 2):
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.seen: set[tuple] = set()
        self.failed: str | None = None
        self.pool = None  # the graphs' one memory pool, made at the first capture

    @staticmethod
    def _key(x: torch.Tensor) -> tuple:
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        autocast = torch.is_autocast_enabled("cuda")
        return (tuple(x.shape), x.dtype, x.device, channels_last, autocast,
                torch.get_autocast_dtype("cuda") if autocast else None, torch.is_inference_mode_enabled())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or self.failed is not None or torch.is_grad_enabled():
            return self.fn(x)
        key = self._key(x)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return self.fn(x)
            graph = self._capture(x, key)
            if graph is None:
                return self.fn(x)
        g, static_in, static_out = graph
        with torch.cuda.device(x.device):
            static_in.copy_(x)
            g.replay()
        return static_out

    def _capture(self, x: torch.Tensor, key: tuple):
        memory_format = torch.channels_last if key[3] else torch.contiguous_format
        autocast = torch.autocast("cuda", dtype=key[5] or torch.bfloat16, enabled=key[4], cache_enabled=False)
        with torch.cuda.device(x.device):  # the graph, its streams and pool on x's GPU, whichever is current
            before = torch.cuda.current_stream()
            try:
                static_in = x.clone(memory_format=memory_format)
                side = torch.cuda.Stream()
                side.wait_stream(before)
                with torch.cuda.stream(side), autocast:
                    for _ in range(self.warmup):  # capture wants its kernels warmed up off the default stream
                        self.fn(static_in)
                before.wait_stream(side)
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                g = torch.cuda.CUDAGraph()
                # thread_local: the label worker's other threads may touch CUDA meanwhile (pinned buffers freed)
                with autocast, torch.cuda.graph(g, pool=self.pool, stream=torch.cuda.Stream(),
                                                capture_error_mode="thread_local"):
                    static_out = self.fn(static_in)
            except Exception as e:  # noqa: BLE001 — any capture failure: eager from now on, said once
                torch.cuda.set_stream(before)  # a capture that failed to end leaves its stream current
                first = e.__context__ or e  # (ending a capture that failed raises over the error that failed it)
                self.failed = f"{type(first).__name__}: {first}".splitlines()[0]
                self.graphs.clear()
                warnings.warn(f"CUDA graphs off for this run ({self.failed}); the forward pass runs eagerly",
                              RuntimeWarning, stacklevel=3)
                return None
        self.graphs[key] = (g, static_in, static_out)
        return self.graphs[key]
