"""Labelling throughput of one worker, in-process (no Ray): images/s and where the time goes.

    python bench/label_throughput.py --teacher classic --images 256
    python bench/label_throughput.py --teacher salgan --weights random --device cuda --batch-size 64

Images are the bundled sample's photos repeated to ``--images`` files (real JPEG decoding cost).
Prints one table row per run; ``--json`` appends the row to a file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click

from pipeline.label.worker import LabelConfig, ShardLabeler
from pipeline.label.sources import folder_records, plan_shards

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"


@click.command()
@click.option("--teacher", default="classic")
@click.option("--weights", default=None)
@click.option("--images", "n_images", default=256, help="Images to label (the sample repeated).")
@click.option("--batch-size", default=32)
@click.option("--io-threads", default=4)
@click.option("--device", default="auto")
@click.option("--precision", default="auto")
@click.option("--shard-size", default=1000)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(teacher, weights, n_images, batch_size, io_threads, device, precision, shard_size, json_out):
    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    try:
        src = sorted(SAMPLE.glob("*.jpg"))
        (work / "images").mkdir()
        for i in range(n_images):
            shutil.copy(src[i % len(src)], work / "images" / f"{i:08d}.jpg")
        plans = plan_shards(folder_records(work / "images"), shard_size)
        config = LabelConfig(teacher=teacher, weights=weights, batch_size=batch_size, io_threads=io_threads,
                             device=device, precision=precision)
        labeler = ShardLabeler(config)
        labeler.label_shard(plan_shards(folder_records(work / "images"), batch_size)[0], work)  # warm-up
        t0 = time.perf_counter()
        markers = [labeler.label_shard(p, work) for p in plans]
        wall = time.perf_counter() - t0
        labeler.close()
        sums = {k: sum(m["timings"][k] for m in markers) for k in markers[0]["timings"]}
        row = {"teacher": teacher, "device": str(labeler.device), "batch_size": batch_size,
               "io_threads": io_threads, "images": n_images, "wall_s": round(wall, 3),
               "images_per_s": round(n_images / wall, 1), **{k: round(v, 3) for k, v in sums.items()}}
        click.echo("  ".join(f"{k}={v}" for k, v in row.items()))
        if json_out:
            with open(json_out, "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
