"""Training and inference throughput of the students (FastSal (A), (C), SACT, ACT), in-process, on random batches.

    python bench/train_step.py --batch-size 4 --steps 3                  # CPU smoke run
    python bench/train_step.py --device cuda --batch-size 64 --steps 50 --amp bf16

One training step is what ``pipeline train`` does per batch (``Trainer.loss`` + ``train_epoch``):
the uint8 batch goes to the device, the student's ``normalize``, the student's ``forward_train`` under bf16
autocast when ``--amp bf16`` (CUDA only, as in the trainer), the logits in float32 into the loss
(``--loss density``: ``density_teacher_loss`` against a teacher log density; ``--loss map``:
``map_teacher_loss`` against a [0, 1] map) plus the student's own loss terms (SACT's and ACT's ponder
cost), ``zero_grad``, ``backward``, an SGD step (lr 0.01, momentum 0.9, the trainer's defaults) and
``float(loss)`` (the trainer logs every step's loss, which also synchronises the GPU). Images are random uint8 at ``--size`` (default 192x256), the
targets random smooth maps at the same size; students start from ``backbone_weights='none'``.

``--warmup`` steps run first and are not timed; then ``--steps`` timed steps. The inference
column is ``model(model.normalize(x))`` in eval mode under ``torch.inference_mode()`` (same autocast),
timed over the same number of batches. On CUDA every timed region starts and ends with
``torch.cuda.synchronize``. The training figures include each batch's host→device copy (images and
targets, pinned and non-blocking on CUDA, as the trainer's loader hands over CPU tensors); the inference
figures do not: its batches are copied to the device before the timing starts.

Prints a table; ``--out FILE`` also writes the rows and settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.common.devices import autocast, resolve_device
from pipeline.common.tables import table
from students import available, build_student
from students.losses import density_teacher_loss, map_teacher_loss


def device(name: str) -> torch.device:
    dev = resolve_device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    return dev


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_targets(b: int, size: tuple[int, int], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Smooth random maps ``[B,1,H,W]``: a log density (float16, as labels are stored) or a [0,1] map."""
    h, w = size
    coarse = torch.randn(b, 1, max(1, h // 16), max(1, w // 16), generator=gen)
    smooth = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False) * 2.0
    if kind == "density":
        return F.log_softmax(smooth.reshape(b, -1), dim=1).reshape(b, 1, h, w).half()
    return torch.sigmoid(smooth)


def bench_student(name: str, args, dev: torch.device, amp: bool) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build_student(name, backbone_weights="none").to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    h, w = args.size
    # a few distinct host batches, cycled (the trainer's loader hands over CPU tensors each step)
    host = [torch.randint(0, 256, (args.batch_size, 3, h, w), dtype=torch.uint8, generator=gen) for _ in range(2)]
    targets = [random_targets(args.batch_size, (h, w), args.loss, gen) for _ in range(2)]
    if dev.type == "cuda":
        host = [x.pin_memory() for x in host]
        targets = [t.pin_memory() for t in targets]
    loss_fn = density_teacher_loss if args.loss == "density" else map_teacher_loss

    def train_step(k: int) -> float:
        images = host[k % 2].to(dev, non_blocking=True)
        target = targets[k % 2].to(dev, non_blocking=True)
        x = model.normalize(images)
        with autocast(dev, amp):
            out = model.forward_train(x)  # as the trainer's StageView: logits and extra loss terms
            logits = out.logits.float()
        loss = loss_fn(logits, target)
        for term in out.losses.values():  # SACT's and ACT's ponder cost (none for FastSal)
            loss = loss + term.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    for k in range(args.warmup):
        train_step(k)
    sync(dev)
    step_times, losses = [], []
    t_start = time.perf_counter()
    for k in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step(k))  # float(loss) waits for the step, as the trainer's logging does
        sync(dev)
        step_times.append(time.perf_counter() - t0)
    train_wall = time.perf_counter() - t_start
    peak_train = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None

    model.eval()
    dev_batches = [x.to(dev) for x in host]
    with torch.inference_mode():
        def infer(k: int) -> torch.Tensor:
            with autocast(dev, amp):
                return model(model.normalize(dev_batches[k % 2]))

        for k in range(args.warmup):
            infer(k)
        sync(dev)
        t0 = time.perf_counter()
        for k in range(args.steps):
            infer(k)
        sync(dev)
        infer_wall = time.perf_counter() - t0

    n_train = args.steps * args.batch_size
    return {
        "student": name, "params_M": round(n_params / 1e6, 2), "device": str(dev),
        "amp": "bf16" if amp else "off", "loss": args.loss, "batch_size": args.batch_size,
        "size": f"{h}x{w}", "steps": args.steps,
        "train_ms_per_step": round(1000 * train_wall / args.steps, 1),
        "train_median_ms": round(1000 * statistics.median(step_times), 1),
        "train_img_per_s": round(n_train / train_wall, 1),
        "infer_ms_per_batch": round(1000 * infer_wall / args.steps, 1),
        "infer_img_per_s": round(n_train / infer_wall, 1),
        "peak_train_MiB": round(peak_train) if peak_train is not None else None,
        "last_loss": round(losses[-1], 4),
    }


COLUMNS = (("student", "student"), ("params_M", "params M"), ("device", "device"), ("amp", "amp"),
           ("batch_size", "batch"), ("size", "size"), ("train_ms_per_step", "train ms/step"),
           ("train_median_ms", "median"), ("train_img_per_s", "train img/s"),
           ("infer_ms_per_batch", "infer ms/batch"), ("infer_img_per_s", "infer img/s"),
           ("peak_train_MiB", "peak MiB"), ("last_loss", "loss"))


def print_table(rows: list[dict]) -> None:
    cols = [(k, t) for k, t in COLUMNS if any(r.get(k) is not None for r in rows)]
    cells = [[("" if r.get(k) is None else str(r[k])) for k, _ in cols] for r in rows]
    print(table([t for _, t in cols], cells, align="lr", rule=True))


def main(argv=None) -> None:
    from _cli import HelpFormatter  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--students", default="fastsal_a,fastsal_c",
                   help=f"comma-separated, of {', '.join(available())} (default fastsal_a,fastsal_c)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32 (the trainer's default)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--size", default="192x256", help="HxW of the batches (default 192x256; multiples of 32)")
    p.add_argument("--loss", choices=("density", "map"), default="density",
                   help="density_teacher_loss (density teachers) or map_teacher_loss (map teachers)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("auto", "off", "bf16"), default="auto",
                   help="bf16 autocast on CUDA; auto: bf16 on CUDA, off on CPU (as pipeline train)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the rows and settings to this JSON file")
    args = p.parse_args(argv)

    names = [s.strip() for s in args.students.split(",") if s.strip()]
    unknown = [s for s in names if s not in available()]
    if not names or unknown:
        p.error(f"unknown student(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(available())}")
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2 and all(v > 0 and v % 32 == 0 for v in args.size)
    except (ValueError, AssertionError):
        p.error("--size takes HxW, both multiples of 32 (the students' stride), e.g. 192x256")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = device(args.device)
    if args.amp == "bf16" and dev.type != "cuda":
        p.error("--amp bf16 needs a GPU (as in pipeline train); use --amp off on CPU")
    amp = dev.type == "cuda" and args.amp in ("auto", "bf16")

    load_before = os.getloadavg()[0]
    rows = [bench_student(name, args, dev, amp) for name in names]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    print(f"\n{dev}{f' ({gpu})' if gpu else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs (load {load_before:.1f} before), {args.warmup} warm-up + {args.steps} timed "
          f"steps, loss {args.loss}, SGD lr 0.01 momentum 0.9")
    print_table(rows)
    for row in rows:  # one JSON line per figure
        print(json.dumps({**row, "device": str(dev), "amp": "bf16" if amp else "off", "size": list(args.size)}))
    if args.out:
        info = {"device": str(dev), "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "load_avg_1min_before": round(load_before, 2),
                "python": platform.python_version(), "warmup": args.warmup, "steps": args.steps,
                "size": list(args.size), "loss": args.loss, "amp": "bf16" if amp else "off"}
        args.out.write_text(json.dumps({"settings": info, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
