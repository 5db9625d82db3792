"""What a data-parallel launch costs: ``pipeline train --ray-workers N`` against ``torchrun --nproc-per-node N -m
pipeline train`` (and, for scale, the same training in one process), on the same tiny run.

    python bench/launch_overhead.py                        # 2 processes on the CPU, 2 rounds
    python bench/launch_overhead.py --processes 4 --rounds 3 --device cuda --epochs 2

The bundled sample (``samples/coco``, val2017, 12 photos) is labelled first by the ``classic`` teacher at
64x96 in shards of 4 (``pipeline label --executor local``, into ``--workdir``, reused when finished there).
Each launcher then trains ``--epochs`` epochs of FastSal (A) from scratch into a fresh run folder (batch 2,
no shuffle buffer, no loader workers, no ImageNet weights): training itself is a second or two, so what is
measured is the launch — processes, imports, Ray's actors, the process group — and its end.

The launchers run in turn, ``--rounds`` times, alternated. For each run: the wall time of the command, and
the CPU seconds of the whole machine over it (from ``/proc/stat``: every process the launcher started,
and anything else running, so run it on an idle machine; the load average is printed). One JSON line per
run, then a table with the median of each launcher. With 2 or more processes the final weights of the
Ray Train and torchrun runs are compared (equal on the CPU: the same loop, the same Gloo all-reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.common.tables import table  # noqa: E402


def machine_cpu_seconds() -> float | None:
    """Busy CPU seconds of the whole machine since boot (user + nice + system + irq + softirq), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def make_labels(workdir: Path) -> Path:
    folder = workdir / "classic" / "val2017"
    if (folder / "labels.json").is_file():
        return folder
    cmd = [sys.executable, "-m", "pipeline", "label", "coco", "--teacher", "classic", "--coco-root",
           str(ROOT / "samples" / "coco"), "--split", "val2017", "--out", str(workdir), "--image-size", "64x96",
           "--shard-size", "4", "--executor", "local", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise SystemExit(f"labelling failed:\n{done.stdout}{done.stderr}")
    return folder


def command(launcher: str, args, labels: Path, run: Path) -> list[str]:
    fit = ["train", "--labels", str(labels), "--run-dir", str(run), "--epochs", str(args.epochs), "--batch-size",
           "2", "--workers", "0", "--shuffle-buffer", "0", "--backbone-weights", "none", "--device", args.device,
           "--no-progress"]
    if launcher == "ray":
        return [sys.executable, "-m", "pipeline", *fit, "--ray-workers", str(args.processes)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.processes), "-m", "pipeline", *fit]
    return [sys.executable, "-m", "pipeline", *fit]


def final_weights(run: Path) -> dict:
    import torch

    name = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)["model"]


def main() -> None:
    from _cli import HelpFormatter  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--processes", type=int, default=2, help="data-parallel processes (Ray Train workers)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--launchers", default="ray,torchrun,single", help="comma-separated of ray, torchrun, single")
    p.add_argument("--workdir", default=None, help="where the labels go (default: a temporary folder)")
    args = p.parse_args()
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    if not launchers or any(name not in ("ray", "torchrun", "single") for name in launchers):
        p.error(f"--launchers: comma-separated of ray, torchrun, single (got {args.launchers!r})")
    own = tempfile.TemporaryDirectory(prefix="launch-overhead-")
    workdir = Path(args.workdir or own.name)
    labels = make_labels(workdir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    rows: dict[str, list[tuple[float, float | None]]] = {name: [] for name in launchers}
    runs: dict[str, Path] = {}
    for r in range(args.rounds):
        for name in launchers:
            run = workdir / f"run-{name}"
            shutil.rmtree(run, ignore_errors=True)
            cpu0, t0 = machine_cpu_seconds(), time.perf_counter()
            done = subprocess.run(command(name, args, labels, run), capture_output=True, text=True, cwd=ROOT, env=env)
            wall, cpu1 = time.perf_counter() - t0, machine_cpu_seconds()
            if done.returncode:
                raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            rows[name].append((wall, cpu))
            runs[name] = run
            print(json.dumps({"launcher": name, "round": r, "processes": 1 if name == "single" else args.processes,
                              "epochs": args.epochs, "device": args.device, "wall_s": round(wall, 2),
                              "machine_cpu_s": None if cpu is None else round(cpu, 2)}), flush=True)
    same = None
    if args.processes > 1 and {"ray", "torchrun"} <= set(runs):
        a, b = final_weights(runs["ray"]), final_weights(runs["torchrun"])
        same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)

    def median(values):
        values = [v for v in values if v is not None]
        return f"{statistics.median(values):.1f}" if values else "—"

    print()
    print(table(["launcher", "processes", "wall s (median)", "machine CPU s (median)", "rounds"],
                [[name, 1 if name == "single" else args.processes, median([w for w, _ in rows[name]]),
                  median([c for _, c in rows[name]]), len(rows[name])] for name in launchers]))
    if same is not None:
        print(f"Ray Train and torchrun final weights {'equal' if same else 'DIFFER'}")
    from _cli import machine_line

    print(f"{machine_line(args.device)}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    own.cleanup()


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
