"""Training images/s from labelled shards (the data path of ``pipeline train``) vs from the same data in memory.

    python bench/train_throughput.py --device cpu --batch-size 16 --steps 6 --workers 1        # CPU, short
    python bench/train_throughput.py --device cuda --batch-size 256 --steps 50 --workers 8 \\
        --labels data/labels/deepgaze/train2017                                             # GPU

Without ``--labels`` the bundled sample (``samples/coco``, ``--split``, 256 photos in train2017) is labelled
first by the ``classic`` teacher at ``--size`` in shards of ``--shard-size`` (``pipeline label coco
--executor local``, into ``--workdir``, reused when finished there).

Both columns run ``Trainer.train_epoch`` of ``pipeline.train.loop`` — the loop ``pipeline train`` runs: the
batch to the device, normalisation, the student (bf16 autocast on GPU), the distillation loss, backward, an
SGD step, the step losses read back every few steps — on the same ``Trainer`` (same student, batch size,
optimizer) for ``--steps`` steps:

- ``shards``: its own loader, as in ``pipeline train``: WebDataset over the shards, ``--workers`` decoding
  processes, shuffle buffer, pinned memory on GPU; the loader starts anew every epoch, as in training;
- ``memory``: the same batches (read once beforehand from the same loader), already decoded, as uint8 / label
  tensors in memory (pinned on GPU), handed over in order.

Each column trains ``--rounds`` + 1 consecutive epochs, as ``pipeline train`` does (so each epoch's loader
is started a few steps before the previous epoch ends, as there); the first is a warm-up, the figure is the
median over the others. ``ratio`` = shards / memory: how much of the training speed the data path keeps (target on GPU:
>= 0.8). Prints one JSON line per figure, then a table and the machine with its load average.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.common.tables import table
from pipeline.train.config import TrainConfig
from pipeline.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]


class _Bar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


def make_labels(args) -> Path:
    folder = Path(args.workdir) / "classic" / args.split
    if (folder / "labels.json").is_file():
        return folder
    cmd = [sys.executable, "-m", "pipeline", "label", "coco", "--teacher", "classic", "--coco-root",
           str(ROOT / "samples" / "coco"), "--split", args.split, "--out", str(args.workdir), "--image-size",
           f"{args.size[0]}x{args.size[1]}", "--shard-size", str(args.shard_size), "--executor", "local",
           "--no-progress"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(f"labelling failed:\n{done.stdout}{done.stderr}")
    print(f"# labelled samples/coco/{args.split} with classic in {time.perf_counter() - t:.1f} s: {folder}",
          file=sys.stderr)
    return folder


def timed_epoch(trainer: Trainer, epoch: int) -> tuple[float, int]:
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    t = time.perf_counter()
    _, n, _ = trainer.train_epoch(epoch, _Bar(), io.StringIO())  # ends with the losses read back (a sync)
    return time.perf_counter() - t, n


def main() -> None:
    from _cli import HelpFormatter, machine_line  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--student", default="fastsal_a")
    p.add_argument("--labels", default=None, help="a finished label folder (default: label the bundled sample)")
    p.add_argument("--split", default="train2017", help="without --labels: the sample's split to label")
    p.add_argument("--size", default="192x256", help="without --labels: the label size HxW")
    p.add_argument("--shard-size", type=int, default=32, help="without --labels: images per shard")
    p.add_argument("--workdir", default=None, help="without --labels: where to label (default: a temporary folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="steps per timed epoch (both columns)")
    p.add_argument("--workers", type=int, default=2, help="the shard loader's decoding processes")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-ahead", action="store_true",
                   help="start each epoch's loader at its first step (not a few steps before the last epoch ends)")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], default="auto", help="auto: bf16 on GPU")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.size = tuple(int(v) for v in args.size.lower().split("x"))
        assert len(args.size) == 2 and all(v > 0 for v in args.size)
    except (ValueError, AssertionError):
        p.error("--size takes HxW, e.g. 192x256")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        if args.labels is None:
            args.workdir = args.workdir or str(Path(tmp) / "labels")
        labels = Path(args.labels) if args.labels else make_labels(args)
        config = TrainConfig(labels=(str(labels),), run=str(Path(tmp) / "run"), student=args.student,
                             batch_size=args.batch_size, workers=args.workers, shuffle_buffer=args.shuffle_buffer,
                             device=args.device, amp=args.amp, backbone_weights="none", steps_per_epoch=args.steps)
        trainer = Trainer(config)
        if args.no_ahead:
            trainer.start_epoch = lambda epoch: None
        n_train = trainer.labels.images_in(trainer.train_tars)
        if n_train < args.steps * args.batch_size:
            raise SystemExit(f"{labels} holds {n_train} training images, fewer than --steps x --batch-size = "
                             f"{args.steps * args.batch_size}: fewer steps, a smaller batch or more labels")
        shard_loader = trainer.loader
        pin = trainer.device.type == "cuda"
        memory = [(i.pin_memory(), t.pin_memory(), k) if pin else (i, t, k)
                  for (i, t, k), _ in zip(shard_loader(trainer.train_tars, 0, True), range(args.steps))]

        def in_memory(tars, epoch, train):
            return iter(memory)

        timings: dict[str, list[float]] = {"shards": [], "memory": []}
        images = {}
        for name, loader in (("shards", shard_loader), ("memory", in_memory)):
            trainer.loader = loader  # consecutive epochs, as training runs them: each starts the next one's loader
            for r in range(args.rounds + 1):  # epoch 0: warm-up
                seconds, n = timed_epoch(trainer, r)
                if r:
                    timings[name].append(seconds)
                    images[name] = n
        rows = []
        common = {"bench": "train_throughput", "student": args.student, "device": str(trainer.device),
                  "batch": args.batch_size, "steps": args.steps, "workers": args.workers, "ahead": not args.no_ahead,
                  "amp": "bf16" if trainer.amp else "off", "image_size": list(trainer.labels.image_size)}
        ips = {}
        for name in ("shards", "memory"):
            s = statistics.median(timings[name])
            ips[name] = images[name] / s
            row = {**common, "source": name, "images_per_s": round(ips[name], 2), "images": images[name],
                   "round_images_per_s": [round(images[name] / t, 1) for t in timings[name]],
                   "load_avg_1min": round(os.getloadavg()[0], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ratio = ips["shards"] / ips["memory"]
        print(json.dumps({**common, "source": "ratio shards/memory", "ratio": round(ratio, 3),
                          "load_avg_1min": round(os.getloadavg()[0], 2)}), flush=True)
    load_after = os.getloadavg()
    print()
    print(table(["student", "source", "batch", "steps", "img/s", "rounds (img/s)"],
                [(r["student"], r["source"], r["batch"], r["steps"], f"{r['images_per_s']:.1f}",
                  " ".join(f"{v:.1f}" for v in r["round_images_per_s"])) for r in rows]
                + [(args.student, "ratio shards/memory", "", "", f"{ratio:.2f}", "")],
                align="llrrrl", rule=True))
    print(f"\n{machine_line(common['device'])}, {args.workers} loader workers, amp {common['amp']}, labels "
          f"{'x'.join(map(str, common['image_size']))}; load average (1/5/15 min) "
          f"{'/'.join(f'{v:.1f}' for v in load_before)} before, {'/'.join(f'{v:.1f}' for v in load_after)} after")


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
