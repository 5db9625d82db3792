"""Does the GPU decode overlap the teacher? Seconds for N photos of the bundled sample:

\b
- decode: nvJPEG decode + resize to the teacher's size (``images.decode_jpegs``, ``images.resize_tensors``),
  batch by batch, as the worker's device path does;
- forward: the teacher on batches already on the device;
- both: the two at once, the decode in a thread of its own, the teacher on the main thread (what a worker
  decoding the next batch while the teacher runs would do); with ``--stream shared`` the decode thread's
  resizes run on the teacher's stream (as the worker's decode thread of stop 24 ran them), with ``--stream
  own`` on a stream of their own (nvJPEG always decodes on torchvision's own stream).

If ``both`` is close to ``max(decode, forward)`` the two overlap on the GPU; close to their sum, they take
turns, and decoding ahead in a thread cannot help. ``overlap`` = (decode + forward − both) / the shorter of
the two, kept within 0–1: 1 when the shorter one is hidden entirely, 0 when they took turns (``both`` at least
their sum; longer than the sum, as in stop 25's 1.683 s against 1.674, is 0 too, the excess in
``overlap_raw``). One JSON line per run (``--json`` appends them)::

\b
    python bench/device_decode.py --teacher salgan --weights random --images 4096 --batch-size 128
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.common import images  # noqa: E402
from teachers import build_teacher  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"


@click.command(help=__doc__)
@click.option("--teacher", default="salgan", show_default=True)
@click.option("--weights", default="random", show_default=True)
@click.option("--images", "n_images", default=4096, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--device", default="cuda", show_default=True, help="(cpu: only to try the script out.)")
@click.option("--stream", type=click.Choice(["shared", "own"]), default="shared", show_default=True,
              help="The stream the decode thread's resizes run on: the teacher's, or one of their own.")
@click.option("--repeat", default=2, show_default=True, help="Each measurement's fastest of this many.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(teacher, weights, n_images, batch_size, device, stream, repeat, json_out):
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no GPU visible to torch (--device cpu only tries the script out)")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    model = build_teacher(teacher, weights=weights).to(device).eval().to(memory_format=torch.channels_last)
    if model.input_size is None:
        raise click.UsageError(f"--teacher {teacher} takes images at any size: this bench needs one with a fixed "
                               "input size (salgan, deepgaze2e, deepgaze2, deepgaze)")
    size = tuple(model.input_size)
    datas = [images.as_tensor(p.read_bytes()) for p in sorted(SAMPLE.glob("*.jpg"))]
    batches = [[datas[(b * batch_size + i) % len(datas)] for i in range(batch_size)]
               for b in range(max(1, n_images // batch_size))]
    x = torch.randint(0, 256, (batch_size, 3, *size), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)

    side = torch.cuda.Stream(device) if cuda and stream == "own" else None

    def decode_all():
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            decode_batches()
        if side is not None:
            side.synchronize()

    def decode_batches():
        for batch in batches:
            images.resize_tensors([d for d in images.decode_jpegs(batch, device) if d is not None], size)
        if cuda:
            torch.cuda.current_stream(device).synchronize()

    @torch.inference_mode()
    def forward_all():
        for _ in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                model(x)
        sync()

    def both():
        t = threading.Thread(target=decode_all, name="decode")
        t.start()
        forward_all()
        t.join()

    def timed(f) -> float:
        f()  # warm-up (cuDNN, the decoder, the allocator)
        best = float("inf")
        for _ in range(repeat):
            sync()
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best

    n = len(batches) * batch_size
    got = {name: timed(f) for name, f in (("decode", decode_all), ("forward", forward_all), ("both", both))}
    row = {"teacher": teacher, "images": n, "batch_size": batch_size, "stream": stream, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "torch": torch.__version__, **{f"{k}_s": round(v, 3) for k, v in got.items()},
           **{f"{k}_images_per_s": round(n / v, 1) for k, v in got.items()},
           "overlap_raw": round((got["decode"] + got["forward"] - got["both"]) / min(got["decode"], got["forward"]), 2)}
    if got["both"] < 0.95 * max(got["decode"], got["forward"]):  # faster together than the longer alone: no
        row["overlap"] = None  # overlap to speak of (the load changed between the runs, or too short a warm-up)
    else:  # (above 1 within 5%: the shorter one hidden entirely; below 0: together took longer than in turn)
        row["overlap"] = min(max(row["overlap_raw"], 0.0), 1.0)
    click.echo(json.dumps(row))
    if json_out:
        with open(json_out, "a") as f:
            f.write(json.dumps(row) + "\n")
    click.echo(f"decode {got['decode']:.3f} s, forward {got['forward']:.3f} s, both at once {got['both']:.3f} s "
               f"(sum {got['decode'] + got['forward']:.3f}, max {max(got['decode'], got['forward']):.3f}); "
               + (f"overlap {row['overlap']:.2f} (1: the shorter one hidden entirely, 0: none"
                  + (f"; both took {got['both'] - got['decode'] - got['forward']:.3f} s longer than the sum"
                     if row["overlap_raw"] < 0 else "") + ")" if row["overlap"] is not None
                  else "no overlap figure: both at once took less than the longer alone (a load change between the "
                       "runs? more --repeat)"))


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
