"""Does SACT's sparse execution turn skipped FLOPs into wall-clock? Dense-masked vs sparse, batch 1 (or --batch).

    python bench/sact_speed.py                                   # 192x256 and 480x640, tiles 1, 2, 5, CPU
    python bench/sact_speed.py --sizes 480x640 --tiles 1,5 --runs 9 --threads 2
    python bench/sact_speed.py --weights runs/sact/checkpoint.pth --force none   # a trained model as it is
    python bench/sact_speed.py --devices cuda --batch 32 --no-tf32               # GPU, 32 copies, exact fp32

The model: ``sact`` (or ``--student act``) from ``--weights`` (a whole-student checkpoint), else with a
random ResNet-50 whose batch-norm statistics are taken from the bench image itself (a few train-mode
passes, so activations have a trained network's scale). Unless ``--force none``, its halting heads
are then re-drawn (normal, std ``--halting-scale``/√fan_in for the 3×3 convolution, 1/√fan_in for the
pooled term: scores that vary over the image) and biased so that about ``--target`` (default 0.5:
about half the units skipped) of each block's unit-positions are evaluated (``--force per-block``,
one bias per block, bisected block by block), or of the whole network's (``--force global``, one
bias; first units included; mostly whole blocks stopping early, since the blocks' scores differ in
scale). Each bias is rounded to 0.1 after bisection: bisection alone would stop where some
position's cumulative score sits exactly on 1 − ε, where float rounding decides its N. The image is
scikit-image's astronaut photo at each size, in channels-last memory format for both paths (the
faster format for the dense path on CPU); ``--batch N`` times N copies of it (each halts alike).
On CUDA, fp32 convolutions and matrix products use TF32 as torch's defaults allow (cuDNN's
convolutions do, matrix products do not unless set); the two paths round differently there, and a
position whose cumulative halting score is near 1 − ε can stop one unit apart, so ``max |diff|`` can be
of the order of the maps themselves: ``--no-tf32`` turns TF32 off for an exact comparison.

Both paths run on one copy of the model whose batch norms are folded into the convolutions before
them (the sparse path folds them anyway; the dense path would otherwise pay batch-norm passes the
sparse one does not); ``dense ref`` is the unfolded model's dense time, for reference.

Per configuration (size, tile, device): the executed FLOPs of each path, counted by
``torch.utils.flop_counter.FlopCounterMode`` around the very forward whose output is compared; the
median wall-clock of ``--runs`` forwards of each path under ``torch.inference_mode`` (dense and sparse
interleaved, after one untimed forward each; CUDA synchronised); their ratios and
``quotient = (1 − time ratio) / (1 − FLOP ratio)``, the share of the FLOP saving that shows up as
wall-clock saving (target ≥ 0.6); the same quotient from the fastest run of each path; the ratio
of the median process CPU times (all threads); and the machine's load average before and after: on
a CPU shared with other work, two threads wait for each other at every operation, and the path with
more (smaller) operations, the sparse one, loses more. One JSON line per configuration, then a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from pipeline.common.tables import table
from students import build_student, normalize
from students.sact import SACT


def bench_image(h: int, w: int) -> torch.Tensor:
    import skimage.data

    img = cv2.resize(np.asarray(skimage.data.astronaut()), (w, h), interpolation=cv2.INTER_AREA)
    return normalize(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous())


def batch_of(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` copies of the one image ``x``, channels-last."""
    return x.repeat(n, 1, 1, 1).contiguous(memory_format=torch.channels_last)


def calibrate_bn(model: SACT, x: torch.Tensor) -> None:
    """Batch-norm running statistics from ``x`` and its mirror image (cumulative averages)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
        model(x.flip(-1))
    model.eval()


def executed_fraction(model: SACT) -> float:
    """Unit-positions the sparse path evaluates (mean N · positions, summed over blocks) / all of them."""
    stats = model.block_stats
    return sum(s.units * s.total / b.num_units for s, b in zip(stats, model.blocks)) / sum(s.total for s in stats)


def force_halting(model: SACT, x: torch.Tensor, target: float, seed: int, scale: float = 6.0,
                  per_block: bool = True) -> list[float]:
    """Random halting heads, then biases bisected so about ``target`` of the unit-positions run: of
    each block's (``per_block``, one bias per block, block by block) or of the whole network's (one
    bias for every head). Returns the biases, rounded to 0.1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for head in block.heads:
                c = head.fc.in_features
                if head.conv is not None:
                    head.conv.weight.copy_(torch.randn(head.conv.weight.shape, generator=gen) * scale / (9 * c) ** 0.5)
                head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=gen) / c ** 0.5)
    model.execution = "sparse"

    def fraction(bias: float, blocks) -> float:
        with torch.no_grad():
            for block in blocks:
                for head in block.heads:
                    head.fc.bias.fill_(bias)
            model(x)
        if len(blocks) == 1:
            k = list(model.blocks).index(blocks[0])
            return model.block_stats[k].units / blocks[0].num_units
        return executed_fraction(model)

    groups = [[b] for b in model.blocks] if per_block else [list(model.blocks)]
    biases = []
    for blocks in groups:
        lo, hi = -10.0, 10.0  # the fraction falls as the bias rises
        for _ in range(14):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if fraction(mid, blocks) > target else (lo, mid)
        biases.append(round((lo + hi) / 2, 1))
        fraction(biases[-1], blocks)
    return biases


def fuse_bn(model: SACT) -> SACT:
    """A copy whose ResNet batch norms are folded into the convolutions before them (eval mode)."""
    model = copy.deepcopy(model).eval()
    r = model.resnet
    r.conv1, r.bn1 = fuse_conv_bn_eval(r.conv1, r.bn1), nn.Identity()
    for layer in r.layers:
        for unit in layer:
            for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")):
                setattr(unit, conv, fuse_conv_bn_eval(getattr(unit, conv), getattr(unit, bn)))
                setattr(unit, bn, nn.Identity())
            if unit.downsample is not None:
                unit.downsample = nn.Sequential(fuse_conv_bn_eval(unit.downsample[0], unit.downsample[1]))
    return model


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def forward(model: SACT, x: torch.Tensor, execution: str, dev: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU time of one forward."""
    model.execution = execution
    sync(dev)
    t, c = time.perf_counter(), time.process_time()
    model(x)
    sync(dev)
    return time.perf_counter() - t, time.process_time() - c


def measure(model: SACT, x: torch.Tensor, runs: int, dev: torch.device) -> dict:
    fused = fuse_bn(model)
    load_before = os.getloadavg()[0]
    out, flops = {}, {}
    with torch.inference_mode():
        for execution in ("dense", "sparse"):
            fused.execution = execution
            with FlopCounterMode(display=False) as counter:
                out[execution] = fused.maps(x)
            flops[execution] = counter.get_total_flops()
        stats = fused.block_stats
        for execution in ("dense", "sparse"):
            forward(fused, x, execution, dev)
        times = {"dense": [], "sparse": [], "ref": []}
        cpu = {"dense": [], "sparse": []}
        forward(model, x, "dense", dev)
        for _ in range(runs):
            for execution in ("dense", "sparse"):
                wall, proc = forward(fused, x, execution, dev)
                times[execution].append(wall)
                cpu[execution].append(proc)
            times["ref"].append(forward(model, x, "dense", dev)[0])
    diff = max(float((out["sparse"][k] - out["dense"][k]).abs().max()) for k in ("saliency", "ponder"))
    flop_ratio = flops["sparse"] / flops["dense"]
    med = {k: statistics.median(v) for k, v in times.items()}
    time_ratio = med["sparse"] / med["dense"]
    min_ratio = min(times["sparse"]) / min(times["dense"])
    return {
        "executed_fraction": round(executed_fraction(fused), 4),
        "units_per_block": [round(s.units, 3) for s in stats],
        "ponder_per_block": [round(s.ponder, 3) for s in stats],
        "gflops_dense": round(flops["dense"] / 1e9, 3), "gflops_sparse": round(flops["sparse"] / 1e9, 3),
        "flop_ratio": round(flop_ratio, 4),
        "ms_dense": round(med["dense"] * 1e3, 1), "ms_sparse": round(med["sparse"] * 1e3, 1),
        "ms_dense_unfolded_bn": round(med["ref"] * 1e3, 1),
        "ms_min_dense": round(min(times["dense"]) * 1e3, 1), "ms_min_sparse": round(min(times["sparse"]) * 1e3, 1),
        "time_ratio": round(time_ratio, 4),
        "cpu_time_ratio": round(statistics.median(cpu["sparse"]) / statistics.median(cpu["dense"]), 4),
        "quotient": round((1 - time_ratio) / (1 - flop_ratio), 3) if flop_ratio < 1 else None,
        "quotient_of_min_times": round((1 - min_ratio) / (1 - flop_ratio), 3) if flop_ratio < 1 else None,
        "max_abs_diff": diff,
        # 1-minute load average of the machine before and after (other work on a shared CPU)
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    from _cli import HelpFormatter  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--student", choices=("sact", "act"), default="sact")
    p.add_argument("--weights", default=None, help="a whole-student checkpoint (default: random, see above)")
    p.add_argument("--depth", type=int, choices=(50, 101), default=50)
    p.add_argument("--sizes", default="192x256,480x640", help="HxW list (multiples of 32)")
    p.add_argument("--tiles", default="1,2,5", help="tile sizes; a tile that does not divide a size is skipped")
    p.add_argument("--target", type=float, default=0.5, help="fraction of unit-positions evaluated (default 0.5)")
    p.add_argument("--force", choices=("per-block", "global", "none"), default="per-block",
                   help="halting heads re-drawn and biased so --target of each block's unit-positions run "
                        "(per-block, default) or of the network's (global); none: keep the model's")
    p.add_argument("--halting-scale", type=float, default=6.0,
                   help="std·√fan_in of the forced 3×3 halting convolutions (default 6)")
    p.add_argument("--runs", type=int, default=7, help="timed forwards per path (median; default 7)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU (default 2)")
    p.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda skipped when absent)")
    p.add_argument("--batch", type=int, default=1, help="copies of the image per forward (default 1)")
    p.add_argument("--no-tf32", action="store_true", help="CUDA: fp32 convolutions and matrix products "
                   "without TF32 (an exact comparison of the paths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON lines to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.batch < 1:
        p.error("--batch: at least 1")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    asked = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not asked or any(d not in ("cpu", "cuda") for d in asked):
        p.error(f"--devices: cpu and/or cuda (got {args.devices!r})")
    devices = [d for d in asked if d == "cpu" or torch.cuda.is_available()]
    if "cuda" in asked and "cuda" not in devices:
        print("# cuda: no GPU visible to torch, skipped")
    if not devices:
        p.error("--devices cuda: no GPU visible to torch, and no other device asked for")
    try:
        sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
        assert sizes and all(len(hw) == 2 and all(v > 0 and v % 32 == 0 for v in hw) for hw in sizes)
    except (ValueError, AssertionError):
        p.error("--sizes takes HxW,HxW…, multiples of 32, e.g. 192x256,480x640")
    rows = []
    for h, w in sizes:
        size = f"{h}x{w}"
        x_cpu = bench_image(h, w).contiguous(memory_format=torch.channels_last)
        for tile in (int(t) for t in args.tiles.split(",")):
            if args.student == "act" and tile != 1:
                continue
            if any((h // s) % tile or (w // s) % tile for s in (4, 8, 16, 32)):
                print(f"# skipped {size} tile {tile}: the tile does not divide every block's feature map")
                continue
            torch.manual_seed(args.seed)
            options = {"depth": args.depth, "tile": tile}
            if args.weights:
                model = build_student(args.student, weights=args.weights, **options)
                if hasattr(model, "tile"):  # a checkpoint trained with another tile: the tile asked for
                    model.tile = tile
                    for block in model.blocks:
                        block.tile = tile
            else:
                model = build_student(args.student, backbone_weights="none", **options)
                calibrate_bn(model, x_cpu)
            model.eval()
            bias = None
            if args.force != "none":
                bias = force_halting(model, x_cpu, args.target, args.seed, args.halting_scale,
                                     per_block=args.force == "per-block")
            for dev_name in devices:
                dev = torch.device(dev_name)
                cuda = dev_name == "cuda"
                row = {"student": args.student, "depth": args.depth, "size": size, "tile": tile,
                       "device": dev_name, "threads": None if cuda else args.threads, "batch": args.batch,
                       "tf32": cuda and torch.backends.cudnn.allow_tf32, "forced_bias": bias,
                       **measure(model.to(dev), batch_of(x_cpu, args.batch).to(dev), args.runs, dev)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    gpu = torch.cuda.get_device_name(0) if "cuda" in devices else ""
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} threads{', ' + gpu if gpu else ''}")
    head = ("size", "tile", "device", "batch", "executed", "GFLOPs dense", "sparse", "FLOP ratio", "ms dense", "sparse",
            "time ratio", "quotient", "(min)", "CPU-time ratio", "ms dense ref", "max |diff|", "load")
    print(table(head, [(r["size"], r["tile"], r["device"] + (" tf32" if r["tf32"] else ""), r["batch"],
                        f"{r['executed_fraction']:.3f}", r["gflops_dense"],
                        r["gflops_sparse"], f"{r['flop_ratio']:.3f}", r["ms_dense"], r["ms_sparse"],
                        f"{r['time_ratio']:.3f}", r["quotient"], r["quotient_of_min_times"],
                        f"{r['cpu_time_ratio']:.3f}", r["ms_dense_unfolded_bn"], f"{r['max_abs_diff']:.1e}",
                        "→".join(map(str, r["loadavg"]))) for r in rows], align="lllrrrrrrrrrrrrrl", rule=True))


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
