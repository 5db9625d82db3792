"""Random-SIGKILL trials of `pipeline label coco --executor local`: does a killed run, re-run to the end,
give the bytes of an uninterrupted run?

\b
    python bench/label_kill_trials.py                  # 20 trials
    python bench/label_kill_trials.py --trials 5 --seed 1 --images 16

A small COCO tree is made from the bundled sample's photos with broken files inside shards (a truncated
JPEG at position 1, an empty file at position 5, a corrupt one at position 10: inside 4-image shards).
Two uninterrupted runs come first, which must give the same tars: a cold one (Python, torch and the page
cache warming up) and the reference, which gives the sha256 of every shard tar and the times the kill window
is drawn from. Each trial starts the same command in a fresh output folder, SIGKILLs its process group at a
random moment while it labels, runs the command again to completion, and compares every tar's sha256 with
the reference (and runs `pipeline verify --deep` on the folder). The moment is drawn from the time between
the reference's label folder appearing and its labels.json appearing, counted from the trial's own label
folder appearing: the 16 images of a small tree are labelled in about 0.1 s on a 2-core CPU, about as much
as the start-up varies from run to run, so a window timed from the start (as it was, on one cold run, ending
at its exit) let every kill land before the labelling or after it.
``--whole-run``: from the start, over the whole reference run (start-up included).

One JSON line per trial, then a summary line (``killed_mid_labelling``: trials killed with some but not all
of the work on disk). Exit status 1 when a resumed run's tars differ from the reference, and when no trial
was killed mid-labelling (a line says so: the trials then did not test resuming partial work).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's pipeline, here and in the commands it runs (env() below)
SAMPLE = ROOT / "samples" / "coco" / "val2017"
#: position in the image list → how that file is broken
BROKEN = {1: "truncated", 5: "empty", 10: "corrupt"}


def make_tree(root: Path, n_images: int) -> None:
    src = sorted(SAMPLE.glob("*.jpg"))
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        data = src[i % len(src)].read_bytes()
        kind = BROKEN.get(i)
        if kind == "truncated":
            data = data[: len(data) // 2]
        elif kind == "empty":
            data = b""
        elif kind == "corrupt":
            data = b"\xff\xd8\xff\xe0" + bytes(random.Random(i).randrange(256) for _ in range(2000))
        (root / "val2017" / name).write_bytes(data)
        images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "object"}]}))


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


def command(coco: Path, out: Path, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "label", "coco", "--teacher", "classic", "--coco-root", str(coco),
            "--out", str(out), "--shard-size", str(shard_size), "--batch-size", "3", "--io-threads", "2",
            "--executor", "local", "--no-progress", "--max-failure-rate", "1"]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def wait_for(proc: subprocess.Popen, path: Path) -> bool:
    """Wait until ``path`` exists (True) or the process has ended (False), looking every 2 ms."""
    while not path.exists():
        if proc.poll() is not None:
            return path.exists()
        time.sleep(0.002)
    return True


def reference_run(coco: Path, out: Path, shard_size: int) -> dict[str, float | None]:
    """An uninterrupted run's times in seconds from its start: ``folder`` (its label folder made: labelling is
    about to start), ``labels_json`` (the work done: what follows is the interpreter's exit) and ``wall`` (None:
    not seen)."""
    folder = out / "classic" / "val2017"
    t0 = time.perf_counter()
    proc = subprocess.Popen(command(coco, out, shard_size), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    times: dict[str, float | None] = {"folder": None, "labels_json": None}
    if wait_for(proc, folder):
        times["folder"] = time.perf_counter() - t0
        if wait_for(proc, folder / "labels.json"):
            times["labels_json"] = time.perf_counter() - t0
    proc.wait()
    times["wall"] = time.perf_counter() - t0
    if proc.returncode != 0 or None in times.values():
        raise click.ClickException(f"an uninterrupted run failed: {proc.stderr.read().strip().splitlines()[-1:]}")
    return times


@click.command(help=__doc__)
@click.option("--trials", default=20, show_default=True, help="Killed-and-resumed runs.")
@click.option("--images", "n_images", default=32, show_default=True, help="Images in the COCO tree.")
@click.option("--shard-size", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the kill moments.")
@click.option("--whole-run", is_flag=True,
              help="Draw kill moments over the whole run (start-up included), not just while it labels.")
@click.option("--keep", is_flag=True, help="Keep the work folder (printed) for a look.")
def main(trials, n_images, shard_size, seed, whole_run, keep):
    from pipeline.label.verify import verify_labels

    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="label-kill-"))
    try:
        make_tree(work / "coco", n_images)
        # a cold run first (Python, torch and the page cache warming up), then the reference the window is timed on
        cold = reference_run(work / "coco", work / "reference-cold", shard_size)
        ref = reference_run(work / "coco", work / "reference", shard_size)
        reference = digests(work / "reference" / "classic" / "val2017")
        cold_digests = digests(work / "reference-cold" / "classic" / "val2017")
        if cold_digests != reference:
            differ = sorted(k for k in set(cold_digests) | set(reference) if cold_digests.get(k) != reference.get(k))
            raise click.ClickException(f"two uninterrupted runs gave different tars: {differ}")
        # the window: from the start (--whole-run), or from the label folder's appearance in the trial itself (the
        # start-up before it varies by more than the labelling of a small tree takes) to the reference's labels.json
        window = (0.0, ref["wall"]) if whole_run else (0.0, ref["labels_json"] - ref["folder"])
        identical = mid = 0
        for trial in range(trials):
            out = work / f"trial-{trial:03d}"
            folder = out / "classic" / "val2017"
            delay = rng.uniform(*window)
            proc = subprocess.Popen(command(work / "coco", out, shard_size), cwd=ROOT, env=env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                if not whole_run:
                    wait_for(proc, folder)
                proc.wait(timeout=delay)
                killed = False  # it finished first
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
            at_kill = {"markers": len(list(folder.glob("shard-*.json"))),
                       "tars": len(list(folder.glob("shard-*.tar"))),
                       "temp_files": len(list(folder.glob(".*.tmp-*"))),
                       "labels_json": (folder / "labels.json").is_file()}
            resumed = run(command(work / "coco", out, shard_size))
            got = digests(folder)
            same = resumed.returncode == 0 and got == reference
            report = verify_labels(folder, deep=True) if folder.is_dir() else None
            identical += same
            mid += killed and 0 < at_kill["markers"] + at_kill["temp_files"] and not at_kill["labels_json"]
            click.echo(json.dumps({
                "trial": trial, "kill_after_s": round(delay, 3), "killed": killed, "at_kill": at_kill,
                "resume_rc": resumed.returncode, "identical": same, "verify_ok": bool(report and report.ok),
                **({"differing": sorted(k for k in set(reference) | set(got) if reference.get(k) != got.get(k)),
                    "resume_error": resumed.stderr.strip().splitlines()[-1:]} if not same else {}),
            }))
            sys.stdout.flush()
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        click.echo(json.dumps({"summary": f"{identical} of {trials} byte-identical", "identical": identical,
                               "trials": trials, "shards": len(reference), "images": n_images,
                               "broken_positions": BROKEN, "reference_s": {k: round(v, 3) for k, v in ref.items()},
                               "cold_reference_wall_s": round(cold["wall"], 2),
                               "kill_after": "start" if whole_run else "the label folder's appearance",
                               "kill_window_s": [round(w, 3) for w in window],
                               "killed_mid_labelling": mid}))
        if identical != trials:
            sys.exit(1)
        if trials and not mid:
            click.echo(f"Error: no trial was killed mid-labelling (with some but not all of the work on disk), so "
                       f"the {trials} resumes did not test resuming partial work; run more --trials or --images",
                       err=True)
            sys.exit(1)
    finally:
        if keep:
            click.echo(f"work folder: {work}", err=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
