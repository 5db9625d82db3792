"""Serving speed of the students: batch-1 latency and large-batch throughput per runtime.

    python bench/student_latency.py --device cpu --large-batch 8 --iters 20            # CPU, short
    python bench/student_latency.py --device cpu --students fastsal_a --large-batch 0  # the ONNX target only
    python bench/student_latency.py --device cuda --runtimes torch,compile             # GPU: batch 1 and 256

Every figure is what ``pipeline profile`` measures (``pipeline.score.profile.profile``): the median wall time
of ``--iters`` passes after the warm-up (synchronised on GPU), on random uint8 images at ``--size``, the
student's normalisation included, for students built with ``backbone_weights="none"`` (the weights do not
change the speed). ``profile`` copies the input batches to the device before it starts timing, so host→device
copies are not in any figure (on a GPU a served batch would pay them too); the ONNX rows run on the CPU, on
NumPy arrays, with no copy to make. Runtimes:

- ``torch``: eager PyTorch on ``--device`` (bf16 autocast on GPU unless ``--precision fp32``); SACT's two
  execution paths (``dense``, ``sparse``) are both measured, but not like for like: the sparse path keeps its
  activations channels-last (and where some positions have halted runs the unit with its batch norms folded
  into its convolutions), the dense path keeps the input's layout and its batch norms. The SACT built here is
  untrained, so every unit runs on both paths: the two rows differ by layout and bookkeeping, not by skipped
  work. ``bench/sact_speed.py`` compares the paths like for like (both folded, both channels-last, about half
  the unit-positions halted);
- ``onnx``: ``pipeline profile --runtime onnx``: the student exported in memory, ONNX Runtime on the CPU
  (only with ``--device cpu``);
- ``onnx-int8``: ``pipeline profile --runtime onnx-int8``: the same graph quantized to int8 (ONNX Runtime's
  static quantization, calibrated on ``--calibration``'s images, the bundled sample's by default), in the
  same session; alternated with ``onnx`` in the same rounds;
- ``onnx-session``: the session ``onnx`` uses (``pipeline.score.serving.OnnxSession``), timed by a bare loop
  over ``session.run`` (batch 1 only): ``onnx`` minus ``profile``'s own overhead;
- ``onnx-spin``: that session with its intra-op threads spinning between operators (ORT's default, which
  ``pipeline`` turns off: on a loaded machine spinning threads wait for each other's cores), same bare loop;
- ``onnx-plain``: the same exported graph in a plain ``onnxruntime.InferenceSession`` with ORT's default
  options (but ``--threads``, when given, as its intra-op threads; ORT's default is one per core), timed by
  the same bare loop (batch 1 only): the reference ``onnx`` is held to.
  The ONNX rows at batch 1 are measured in alternating rounds (``--rounds``) so that the load of a shared
  machine falls on all alike; the figure is the median over rounds;
- ``compile``: ``pipeline profile --runtime compile``: ``torch.compile`` (CUDA graphs on CUDA). On a CPU it
  takes minutes to compile, so it is left out there unless ``--runtimes`` names it.

With ``onnx``, one more row on the CPU: the ``fp32 GEMM ceiling``, the images/s the student's FLOPs would allow
at the rate of a large fp32 matrix product on the same threads (torch's, 2048×2048), and the share of that rate
the ``onnx`` row reaches.

Targets (docs/benchmarks.md): CPU, ``onnx`` at batch 1, FastSal (A) at 192x256: >= 150 img/s; GPU: FastSal (A)
>= 1,000 img/s at batch 1 and >= 15,000 img/s at batch 256.

Prints one JSON line per figure, then a summary table and the machine (torch version, threads, the 1-minute
load average before and after: other work on the machine slows every figure).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from pipeline.common.devices import resolve_device
from pipeline.common.tables import table
from pipeline.score.predictors import build_predictor
from pipeline.score.profile import profile
from students import available

RUNTIMES = ("torch", "onnx", "onnx-int8", "onnx-session", "onnx-spin", "onnx-plain", "compile")
#: what ``onnx-int8`` is calibrated on unless ``--calibration`` says otherwise: the bundled sample's photos
SAMPLE_PHOTOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "coco",
                             "train2017")


def emit(rows: list[dict], **row) -> None:
    row = {"bench": "student_latency", **row, "load_avg_1min": round(os.getloadavg()[0], 2)}
    rows.append(row)
    print(json.dumps(row), flush=True)


def bare_loop(session, size: tuple[int, int], warmup: int, iters: int):
    """A function timing ``iters`` runs of an ONNX Runtime ``session`` at batch 1 (median seconds)."""
    x = np.random.default_rng(0).integers(0, 256, (1, 3, *size), dtype=np.uint8)

    def run() -> float:
        times = []
        for i in range(warmup + iters):
            t = time.perf_counter()
            session.run(None, {"images": x})
            if i >= warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    return run


def gemm_gflops(n: int = 2048, passes: int = 5) -> float:
    """This CPU's fp32 matrix-product rate on torch's threads (median of ``passes`` n×n products): about the
    most FLOPs per second a dense model reaches here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def bench_student(name: str, args, rows: list[dict]) -> None:
    from pipeline.score.serving import OnnxSession, compile_predictor, onnx_bytes, onnx_predictor

    base = build_predictor(student=name, device=args.device, precision=args.precision, require_weights=False,
                           student_options={})
    base.model.eval()
    size, dev = args.size, str(base.device)
    common = {"student": name, "device": dev, "size": f"{size[0]}x{size[1]}"}
    batches = [1] + ([args.large_batch] if args.large_batch else [])

    def measure(predictor, runtime: str, batch: int, iters: int, precision: str) -> None:
        r = profile(predictor, input_size=size, batch_size=batch, iters=iters, warmup=args.warmup)
        for m in r.modes:
            emit(rows, **common, runtime=runtime, mode=m.mode, batch=batch, precision=precision,
                 images_per_s=round(m.images_per_s, 2), ms=round(m.latency_ms, 3))

    precision = "bf16" if base.autocast else "fp32"
    if "torch" in args.runtimes:
        for batch in batches:
            measure(base, "torch", batch, args.iters if batch == 1 else args.large_iters, precision)
    if "compile" in args.runtimes:
        try:
            compiled = compile_predictor(base)
        except Exception as e:  # noqa: BLE001 - a refusal (no C++ compiler) is a result, not a crash
            emit(rows, **common, runtime="compile", error=str(e))
        else:
            for batch in batches:
                measure(compiled, "compile", batch, args.iters if batch == 1 else args.large_iters, precision)
    want_onnx = [r for r in ("onnx", "onnx-int8", "onnx-session", "onnx-spin", "onnx-plain") if r in args.runtimes]
    if want_onnx and base.device.type != "cpu":
        print(f"# {name}: onnx runs on the CPU: measured with --device cpu only", file=sys.stderr)
    elif want_onnx:
        import onnxruntime as ort

        cpu = build_predictor(student=name, device="cpu", precision="fp32", require_weights=False, student_options={})
        served = onnx_predictor(cpu, size)
        int8 = onnx_predictor(cpu, size, calibration=args.calibration) if "onnx-int8" in want_onnx else None
        data = onnx_bytes(cpu, size)
        def plain():  # ORT's default options; with --threads, that many intra-op threads (ORT's default: the cores)
            options = ort.SessionOptions()
            if args.threads:
                options.intra_op_num_threads = args.threads
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

        bare = {"onnx-plain": plain,
                "onnx-session": lambda: OnnxSession(data).session,
                "onnx-spin": lambda: OnnxSession(data, spinning=True).session}
        loops = {r: bare_loop(make(), size, args.warmup, args.iters) for r, make in bare.items() if r in want_onnx}
        per_round = {r: [] for r in want_onnx}
        for _ in range(args.rounds):  # alternating: the machine's load falls on all alike
            for r, loop in loops.items():
                per_round[r].append(loop())
            for r, predictor in (("onnx", served), ("onnx-int8", int8)):
                if r in want_onnx:
                    per_round[r].append(profile(predictor, input_size=size, batch_size=1, iters=args.iters,
                                                warmup=args.warmup).latency_ms / 1e3)
        for runtime in want_onnx:
            s = statistics.median(per_round[runtime])
            emit(rows, **{**common, "device": "cpu"}, runtime=runtime, mode="default", batch=1,
                 precision="int8" if runtime == "onnx-int8" else "fp32",
                 images_per_s=round(1 / s, 2), ms=round(s * 1e3, 3), rounds=args.rounds,
                 round_images_per_s=[round(1 / t, 1) for t in per_round[runtime]])
        if "onnx" in want_onnx:  # what an fp32 graph of this many FLOPs could reach at the GEMM rate
            gflops = profile(cpu, input_size=size, batch_size=1, iters=1, warmup=0).gflops
            rate = gemm_gflops()
            emit(rows, **{**common, "device": "cpu"}, runtime="fp32 GEMM ceiling", mode="default", batch=1,
                 precision="fp32", images_per_s=round(rate / gflops, 2), gemm_gflops_per_s=round(rate, 1),
                 gflops_per_image=round(gflops, 3),
                 onnx_share_of_gemm_rate=round(1 / statistics.median(per_round["onnx"]) * gflops / rate, 3))
        if "onnx" in want_onnx and args.large_batch:
            measure(served, "onnx", args.large_batch, args.large_iters, "fp32")
        if "onnx-int8" in want_onnx and args.large_batch:
            measure(int8, "onnx-int8", args.large_batch, args.large_iters, "int8")


def main() -> None:
    from _cli import HelpFormatter, machine_line  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (onnx always runs on the CPU)")
    p.add_argument("--students", default="fastsal_a,fastsal_c,sact", help="comma-separated")
    p.add_argument("--runtimes", default=None,
                   help=f"comma-separated of {', '.join(RUNTIMES)} (default: torch,onnx,onnx-session,onnx-spin,onnx-plain on CPU; "
                        "torch,compile on GPU)")
    p.add_argument("--size", default="192x256", help="HxW, multiples of 32")
    p.add_argument("--large-batch", type=int, default=256, help="the throughput batch (0: batch 1 only)")
    p.add_argument("--iters", type=int, default=30, help="timed passes at batch 1")
    p.add_argument("--large-iters", type=int, default=5, help="timed passes at the large batch")
    p.add_argument("--warmup", type=int, default=3, help="warm-up passes (compile: at least 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the ONNX rows at batch 1")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU")
    p.add_argument("--calibration", default=SAMPLE_PHOTOS,
                   help="onnx-int8's calibration images: a label folder or a folder of images (default: the sample)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of torch and of every ONNX session, onnx-plain's too; 0: torch's own "
                        "choice, and ORT's default (one per core) for onnx-plain")
    args = p.parse_args()
    names = [s.strip() for s in args.students.split(",") if s.strip()]
    if not names or any(s not in available() for s in names):
        p.error(f"--students: known are {', '.join(available())}")
    dev = resolve_device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible to torch")
    default = "torch,onnx,onnx-session,onnx-spin,onnx-plain" if dev.type == "cpu" else "torch,compile"
    args.runtimes = [r.strip() for r in (args.runtimes or default).split(",") if r.strip()]
    if not args.runtimes or any(r not in RUNTIMES for r in args.runtimes):
        p.error(f"--runtimes: of {', '.join(RUNTIMES)}")
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2 and all(v > 0 and v % 32 == 0 for v in args.size)
    except (ValueError, AssertionError):
        p.error("--size takes HxW, both multiples of 32, e.g. 192x256")
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows: list[dict] = []
    for name in names:
        bench_student(name, args, rows)
    load_after = os.getloadavg()
    print()
    print(table(["student", "runtime", "path", "batch", "precision", "img/s", "ms / batch", "load"],
                [(r["student"], r["runtime"], r.get("mode", ""), r.get("batch", ""), r.get("precision", ""),
                  f"{r['images_per_s']:.1f}" if "images_per_s" in r else r.get("error", ""),
                  f"{r['ms']:.2f}" if "ms" in r else "", f"{r['load_avg_1min']:.1f}") for r in rows],
                align="lllrlrrr", rule=True))
    if any(r.get("mode") == "sparse" for r in rows):
        print("\nSACT's dense and sparse rows are not like for like: the sparse path runs channels-last (and folds batch "
              "norms where positions have halted), and this untrained SACT runs every unit on both paths, so neither "
              "skips work; bench/sact_speed.py compares the paths like for like.")
    print(f"\n{machine_line(dev)}; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.1f}' for v in load_before)} before, {'/'.join(f'{v:.1f}' for v in load_after)} after")


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
