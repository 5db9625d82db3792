"""Labelling throughput of one worker, in-process (no Ray), against what bounds it.

\b
    python bench/label_throughput.py --device cpu --teacher classic --images 512
    python bench/label_throughput.py --device cpu --teacher salgan --weights random --teacher-size 96 128 \\
        --images 64 --naive-images 16
    python bench/label_throughput.py --device cuda --teacher salgan --weights random --batch-size 64
    python bench/label_throughput.py --device cuda --teacher salgan --weights random --batch-size 128 \\
        --images 4096 --shard-size 256 --processes 4 --runs worker,null

Five runs (``--runs``), each printed as one JSON line (``--json FILE`` appends them too), then a table:

\b
(a) ``teacher``  the bare teacher forward on pre-decoded tensors already on the device (same batch size,
    same autocast and, on a CPU, the same intra-op threads as the worker; channels-last on a GPU): the
    compute ceiling;
(b) ``worker``   the full worker path: read → decode → resize → teacher → encode → tar → marker, the very
    :class:`ShardLabeler` the Ray actor wraps, shard after shard with the next shard handed on as the
    in-process driver does;
(c) ``naive``    a naive loop: PIL open, fp32, batch 1, one forward per image (torch's default threads),
    each label and image saved to its own file;
(d) ``null``     the worker path with a teacher that does nothing (a fixed map): the CPU / I-O ceiling;
``stages``       CPU milliseconds per image of each stage of the CPU data path, one thread, run alone.

With ``--processes N``, (b) and (d) run N worker processes sharing the device, each on its share of the
shards with ``--io-threads / N`` threads: what ``pipeline label --workers-per-gpu N --io-threads T/N`` gives
on Ray (there each actor runs ``--io-threads`` threads itself). One worker process's threads share one
interpreter lock, so a light teacher on a fast GPU can outrun one process.

For (b) and (d) a second table gives each thread group's CPU seconds and how busy it kept one core
(:class:`ThreadCPU`, sampled from ``/proc``): a single thread near 1.0 is the stage that bounds the path.

Rates are images/s, images/s per core (the cores this process may run on) and images per CPU-second
(user + system time of every thread of the process: on a shared machine the per-core rate the path
would reach with the cores to itself, wait-free); the table adds
(b)/(a) (how much of the teacher's speed the worker keeps) and (b)/(c). Images are the bundled sample's
photos repeated to ``--images`` files, so JPEG decoding costs what it costs on COCO-like photos while the
files themselves come from the page cache (no disk reads are measured).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import torch

from pipeline.common.devices import autocast, available, resolve_device
from pipeline.common.maps import resize_label
from pipeline.common.tables import table
from pipeline.label.config import decode_name
from pipeline.label.sources import folder_records, plan_shards
from pipeline.label.worker import LabelConfig, ShardLabeler
from teachers import Teacher, build_teacher
from teachers.registry import teacher_class

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"


class NullTeacher(Teacher):
    """Does nothing: every image gets the same smooth map (so label encoding still costs what a real map
    costs). What the worker path runs at with it is the ceiling its CPU and I/O allow."""

    name = "null"
    output_kind = "probability_map"

    def __init__(self) -> None:
        super().__init__()
        self.maps: dict[tuple, torch.Tensor] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        key = (h, w, images.device)
        if key not in self.maps:
            y = torch.linspace(-1, 1, h, device=images.device)[:, None]
            x = torch.linspace(-1, 1, w, device=images.device)[None, :]
            self.maps[key] = torch.exp(-(x**2 + y**2) / 0.3)[None, None]
        return self.maps[key].expand(b, 1, h, w)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_teacher(name: str, weights: str | None, teacher_size: tuple[int, int] | None,
                 cuda_graphs: str = "auto") -> Teacher:
    teacher = NullTeacher() if name == "null" else build_teacher(name, weights=weights)
    if teacher_size:
        teacher.input_size = tuple(teacher_size)  # this instance only: a smaller input, for a quicker bench
    if cuda_graphs != "auto":  # this instance only: the worker replays its forward as CUDA graphs, or not
        teacher.cuda_graphs = cuda_graphs == "on"
    return teacher


def run_teacher(labeler: ShardLabeler, records, n_images: int) -> tuple[float, float]:
    """(a): seconds (wall, CPU) for the teacher on ``n_images`` images, batch by batch, inputs already on the device."""
    items = [labeler._load(r) for r in records[: labeler.config.batch_size]]
    items = [it for it in items if not it.error]
    labeler._decode_on_device(items)
    with torch.inference_mode():
        x = labeler._teacher_batch(items)
        if labeler.device.type == "cuda":
            _ = labeler._cuda_ready  # deterministic cuDNN and a channels-last teacher, as in the worker
        batches = max(1, round(n_images / x.shape[0]))

        threads = contextlib.nullcontext if labeler.device.type == "cuda" else labeler._teacher_threads

        def once():  # as the worker runs it: same autocast, same intra-op threads
            with autocast(labeler.device, labeler.autocast), threads():
                return labeler.forward(x)

        once()
        once()  # where the worker replays CUDA graphs, the second batch of a shape is captured: untimed too
        sync(labeler.device)
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(batches):
            once()
        sync(labeler.device)
        scale = n_images / (batches * x.shape[0])
        return (time.perf_counter() - t0) * scale, (cpu_seconds() - c0) * scale


class ThreadCPU:
    """CPU seconds of each thread of this process while the ``with`` block runs, by thread group.

    Every 50 ms each thread's user + system time is read from ``/proc/self/task/*/stat`` (Linux), so the
    per-shard tar threads are counted although they end before the block does. Threads are grouped by
    name with their numbers dropped: Python's names (``MainThread``, ``label-io``, ``label-encode``,
    ``label-tar``) and, for threads Python did not start (torch's, the CUDA driver's), the kernel's name.
    ``busy`` is a group's CPU seconds over the block's wall time: a group of one thread near 1.0 is a stage
    that runs one image at a time and bounds the path (on a GPU, a thread that waits for the device in a
    spin loop also shows busy). Empty where ``/proc`` is missing."""

    INTERVAL = 0.05

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[float, str]] = {}
        self.stop = threading.Event()

    def _names(self) -> dict[int, str]:
        return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}

    def _sample(self) -> None:
        names = self._names()
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        for tid in map(int, tids):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / self.tick
                if tid not in names:
                    with open(f"/proc/self/task/{tid}/comm") as f:
                        names[tid] = f.read().strip()
            except (OSError, IndexError, ValueError):
                continue
            self.first.setdefault(tid, cpu)
            name = names.get(tid) or self.last.get(tid, (0.0, "?"))[1]
            self.last[tid] = (cpu, name)

    def _run(self) -> None:
        while not self.stop.wait(self.INTERVAL):
            self._sample()

    def __enter__(self) -> "ThreadCPU":
        self._sample()
        self.t0 = time.perf_counter()
        self.sampler = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sampler.join()
        self._sample()
        self.wall = time.perf_counter() - self.t0

    def groups(self) -> dict[str, dict]:
        """{group: {"threads": n, "cpu_s": s, "busy": s / wall}}, busiest first (the sampler left out)."""
        import re

        out: dict[str, dict] = {}
        for tid, (cpu, name) in self.last.items():
            group = re.sub(r"[-_]?\d+$", "", re.sub(r"-shard-\d+$", "", name)) or name
            if group == "bench-sampler":
                continue
            g = out.setdefault(group, {"threads": 0, "cpu_s": 0.0})
            g["threads"] += 1
            g["cpu_s"] += cpu - self.first.get(tid, cpu)
        for g in out.values():
            g["cpu_s"] = round(g["cpu_s"], 3)
            g["busy"] = round(g["cpu_s"] / self.wall, 2) if self.wall > 0 else None
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["cpu_s"]))


def run_worker(labeler: ShardLabeler, folder: Path, plans) -> tuple[float, dict, float, dict]:
    """(b) and (d): wall seconds for every shard through ``label_shard``, the markers' summed timings, CPU
    seconds, and the CPU seconds of each thread group (:class:`ThreadCPU`)."""
    (folder / "warm-up").mkdir(parents=True, exist_ok=True)
    # two batches: where the teacher replays CUDA graphs, the second batch of a shape is the one captured
    warm = plan_shards(list(plans[0].records[: 2 * labeler.config.batch_size]), 2 * labeler.config.batch_size)[0]
    warmed = labeler.label_shard(warm, folder / "warm-up")
    t0, c0 = time.perf_counter(), cpu_seconds()
    with ThreadCPU() as threads:
        markers = [labeler.label_shard(p, folder, next_plan=plans[i + 1] if i + 1 < len(plans) else None)
                   for i, p in enumerate(plans)]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    timings = [_timings(m) for m in markers]
    sums = {k: round(sum(t.get(k, 0.0) for t in timings), 3) for k in timings[0]}
    sums["failed_warm_up"] = len(warmed["failures"])
    return wall, sums, cpu, threads.groups()


def _timings(marker: dict) -> dict:
    """A marker's timings and how many of its images failed (a failed image costs no encoding: a rate over
    images that failed would flatter the path, so the table shows them)."""
    return {**marker["timings"], "failed": len(marker["failures"])}


def _one_process(config: LabelConfig, teacher: str, weights, teacher_size, cuda_graphs, folder: Path, plans, barrier,
                 results):
    """One of ``--processes`` workers (a spawned process, as a Ray actor is): its own teacher and labeler,
    a warm-up shard, then, once every process is warm, its share of the shards. A failure is sent to the
    parent (and breaks the barrier), so that it stops at once instead of waiting for this process."""
    labeler = None
    try:
        labeler = ShardLabeler(config, make_teacher(teacher, weights, teacher_size, cuda_graphs))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "warm-up").mkdir(exist_ok=True)
        warm = 2 * config.batch_size  # two batches: the second of a shape is the one a CUDA graph is captured in
        warmed = labeler.label_shard(plan_shards(list(plans[0].records[:warm]), warm)[0], folder / "warm-up")
        barrier.wait()
        c0 = cpu_seconds()
        with ThreadCPU() as threads:
            markers = [labeler.label_shard(p, folder, next_plan=plans[i + 1] if i + 1 < len(plans) else None)
                       for i, p in enumerate(plans)]
        results.put(([_timings(m) for m in markers] + [{"failed_warm_up": len(warmed["failures"])}],
                     cpu_seconds() - c0, threads.groups()))
    except BaseException as e:  # noqa: BLE001 - reported by the parent
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")
    finally:
        if labeler is not None:
            labeler.close()


def run_processes(config: LabelConfig, teacher: str, weights, teacher_size, cuda_graphs, folder: Path, plans,
                  processes: int) -> tuple[float, dict, float, dict]:
    """(b) and (d) with ``processes`` workers sharing the device, each on its share of the shards (round
    robin) and ``io_threads / processes`` threads, in spawned processes: what several Ray actors per GPU
    (``--workers-per-gpu``) do, without Ray. Wall seconds from the moment all are warm to the last shard; the
    thread groups are the first process's."""
    import dataclasses
    import multiprocessing as mp

    if processes > len(plans):
        raise SystemExit(f"--processes {processes} with {len(plans)} shard(s): each process needs one at least "
                         "(more --images or a smaller --shard-size)")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    each = dataclasses.replace(config, io_threads=max(1, config.io_threads // processes))
    procs = [ctx.Process(target=_one_process, args=(each, teacher, weights, teacher_size, cuda_graphs, folder / f"p{k}",
                                                     plans[k::processes], barrier, results))
             for k in range(processes)]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:
            raise SystemExit(f"a worker process failed: {results.get(timeout=60)}") from None
        t0 = time.perf_counter()
        done = [results.get(timeout=600) for _ in procs]
        wall = time.perf_counter() - t0
        failed = [d for d in done if isinstance(d, str)]
        if failed:
            raise SystemExit(f"a worker process failed: {failed[0]}")
    finally:
        for p in procs:
            p.join(timeout=60)
    timings = [t for ts, _, _ in done for t in ts]
    sums = {k: round(sum(t.get(k, 0.0) for t in timings), 3) for k in {k for t in timings for k in t}}
    return wall, sums, sum(c for _, c, _ in done), done[0][2]


def run_naive(teacher: Teacher, device: torch.device, records, image_size, out: Path) -> tuple[float, float]:
    """(c): seconds (wall, CPU): PIL, fp32, one image at a time, one file per label and image."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    size = tuple(teacher.input_size or image_size)
    h, w = image_size

    def one(record):
        with Image.open(record.path) as im:
            rgb = im.convert("RGB")
        x = torch.from_numpy(np.asarray(rgb.resize((size[1], size[0]), Image.BILINEAR))).permute(2, 0, 1)[None]
        with torch.inference_mode():
            label = resize_label(teacher(x.to(device)).float(), teacher.output_kind, image_size)[0, 0].cpu().numpy()
        rgb.resize((w, h), Image.BILINEAR).save(out / f"{record.key}.jpg", quality=95)
        if teacher.output_kind == "log_density":
            np.save(out / f"{record.key}.npy", label.astype(np.float16))
        else:
            Image.fromarray(np.rint(np.clip(label, 0, 1) * 255).astype(np.uint8)).save(out / f"{record.key}.png")

    one(records[0])
    t0, c0 = time.perf_counter(), cpu_seconds()
    for r in records:
        one(r)
    return time.perf_counter() - t0, cpu_seconds() - c0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_stages(records, image_size, quality: int, n: int) -> dict:
    """Where the time of the CPU data path goes: CPU milliseconds per image of each stage, run alone on
    one thread over the same images (read, decode, resize, JPEG encode, label encode, tar write + sha256), and
    the ``cpu-reduced`` path's decode and resize beside them."""
    import io

    from pipeline.common import images
    from pipeline.label.shards import _Hashing, encode_sample
    from pipeline.label.worker import encode_label, quantize_label
    import webdataset as wds

    records = records[:n]
    label = quantize_label(NullTeacher()(torch.zeros(1, 3, *image_size, dtype=torch.uint8))[0, 0],
                           "probability_map").numpy()  # as the teacher's device hands it to the encoders
    stages: dict[str, float] = {}

    def stage(name, f, items):
        c = cpu_seconds()
        out = [f(x) for x in items]
        stages[name] = round((cpu_seconds() - c) * 1e3 / len(items), 3)
        return out

    datas = stage("read", lambda r: images.read_file(r.path), records)
    rgbs = stage("decode", images.decode_image, datas)
    small = stage("resize", lambda x: images.resize(x, image_size), rgbs)
    jpgs = stage("jpeg encode", lambda x: images.encode_jpeg(x, quality), small)
    pngs = stage("label encode (png)", lambda x: encode_label(label, "probability_map"), small)
    samples = [encode_sample({"__key__": f"{i:012d}", "jpg": j, "null.png": p, "json": {"id": i}})
               for i, (j, p) in enumerate(zip(jpgs, pngs))]
    sink = _Hashing(io.BytesIO())
    with wds.TarWriter(sink, mtime=0, user="", group="") as w:
        stage("tar write + sha256", w.write, samples)
    stages["total"] = round(sum(stages.values()), 3)
    # the cpu-reduced path's decode and resize (in place of the two above; not in the total)
    reduced = stage("decode, reduced (cpu-reduced)", lambda d: images.decode_at_least(d, image_size)[0], datas)
    stage("resize of the reduced", lambda x: images.resize(x, image_size), reduced)
    return stages


def row(run: str, what: str, teacher: str, labeler: ShardLabeler, n: int, wall: float, cpu: float, **extra) -> dict:
    rate = n / wall
    return {"run": run, "what": what, "teacher": teacher, "device": str(labeler.device),
            "batch_size": 1 if run == "naive" else labeler.config.batch_size,
            "precision": "fp32" if run in ("naive", "null") or not labeler.autocast else "bf16",
            "images": n, "wall_s": round(wall, 3), "images_per_s": round(rate, 1),
            "images_per_s_per_core": round(rate / cores(), 1), "cores": cores(),
            "cpu_s": round(cpu, 3), "images_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
            "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
            "torch_threads": torch.get_num_threads() if run == "naive" else labeler.teacher_threads, **extra}


@click.command(help=__doc__)
@click.option("--teacher", default="classic", help="Teacher of (a)-(c) (a registered name).")
@click.option("--weights", default=None, help="Its weights (a file, or 'random').")
@click.option("--teacher-size", nargs=2, type=int, default=None,
              help="Override the teacher's input size (H W) for this bench, e.g. salgan at 96 128.")
@click.option("--image-size", nargs=2, type=int, default=(192, 256), show_default=True)
@click.option("--images", "n_images", default=512, show_default=True, help="Images per run (the photos repeated).")
@click.option("--photos", type=click.Path(exists=True, file_okay=False, path_type=Path), default=SAMPLE,
              help="Folder of the JPEGs repeated (default: the bundled val2017 photos, 300-480 px; COCO's are "
                   "mostly 640x480).")
@click.option("--naive-images", default=None, type=int, help="Images of the naive run (default: --images).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--io-threads", default=None, type=int, help="Decode threads (default: the cores available).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True)
@click.option("--decode", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cpu-reduced", "device"]),
              help="Where (b)-(d) decode (`pipeline label --decode`); auto is resolved for --teacher, as `pipeline "
                   "label` resolves it, and the rows record the path.")
@click.option("--shard-size", default=256, show_default=True)
@click.option("--runs", default="teacher,worker,naive,null,stages", show_default=True,
              help="Which runs, comma-separated: teacher, worker, naive, null, stages.")
@click.option("--processes", default=1, show_default=True,
              help="Worker processes sharing the device in (b) and (d), each with --io-threads / N threads "
                   "(as `pipeline label --workers-per-gpu N --io-threads T/N`).")
@click.option("--repeat", default=1, show_default=True, help="Repeat each run; the fastest is reported (a shared machine).")
@click.option("--cuda-graphs", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="Whether (a) and (b) replay the teacher as CUDA graphs on a GPU (auto: as `pipeline label` does, "
                   "where the teacher asks for it: DeepGaze).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Append the JSON lines here.")
def main(teacher, weights, teacher_size, image_size, n_images, naive_images, batch_size, io_threads, device,
         precision, decode, shard_size, runs, processes, repeat, cuda_graphs, json_out, photos):
    runs = [r.strip() for r in runs.split(",") if r.strip()]
    # where --teacher's worker decodes (auto resolved as `pipeline label` does); (d) decodes there too
    decode = decode_name(decode, available(resolve_device(device)).type == "cuda", teacher_class(teacher).decode_on_gpu)
    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    rows: list[dict] = []

    def emit(r: dict) -> None:
        r["best_of"] = max(1, repeat)
        rows.append(r)
        click.echo(json.dumps(r))
        if json_out:
            with open(json_out, "a") as f:
                f.write(json.dumps(r) + "\n")

    def best(f, *args):
        """The fastest of ``repeat`` calls of ``f`` (each returns wall seconds first). A worker run's failed images
        are those of every repeat and warm-up: a repeat where images failed skipped their encoding, so it tends
        to be the fastest, and the one kept must not hide failures of the others."""
        outs = [f(*args) for _ in range(max(1, repeat))]
        fastest = min(outs, key=lambda out: out[0])
        if len(fastest) > 1 and isinstance(fastest[1], dict) and "failed" in fastest[1]:  # the others' (and the
            # warm-ups') failed images, apart: the same image failing in two repeats is two failures there
            fastest[1]["failed_elsewhere"] = sum(out[1].pop("failed_warm_up", 0) + (out is not fastest) * out[1]["failed"]
                                                 for out in outs)
        return fastest

    try:
        src = sorted(photos.glob("*.jpg"))
        if not src:
            raise SystemExit(f"no .jpg in {photos}")
        (work / "images").mkdir()
        for i in range(n_images):  # hard links: quick to make, and read from the page cache like copies
            try:
                os.link(src[i % len(src)], work / "images" / f"{i:08d}.jpg")
            except OSError:
                shutil.copy(src[i % len(src)], work / "images" / f"{i:08d}.jpg")
        records = folder_records(work / "images")
        plans = plan_shards(records, shard_size)

        def config(name: str) -> LabelConfig:
            return LabelConfig(teacher=name, weights=weights, image_size=tuple(image_size), batch_size=batch_size,
                               io_threads=io_threads or cores(), device=device, precision=precision, decode=decode)

        size = list(teacher_size) if teacher_size else None
        if {"teacher", "worker", "naive"} & set(runs):
            labeler = ShardLabeler(config(teacher), make_teacher(teacher, weights, teacher_size, cuda_graphs))
            extra = {"teacher_size": list(labeler._teacher_size), "decode": decode}

            def graphs() -> dict:  # whether the teacher's forward is replayed: graphs captured so far in this
                # process ((b) reuses (a)'s), a capture's failure
                forward = labeler.forward
                return {"cuda_graphs": len(getattr(forward, "graphs", ())), "cuda_graphs_failed": getattr(
                    forward, "failed", None)}
            if "teacher" in runs:
                emit(row("teacher", "(a) bare forward, inputs on the device", teacher, labeler, n_images,
                         *best(run_teacher, labeler, records, n_images), **extra, **graphs()))
            if "worker" in runs and processes > 1:
                wall, sums, cpu, threads = best(run_processes, config(teacher), teacher, weights, teacher_size,
                                                cuda_graphs, work / "worker", plans, processes)
                emit(row("worker", f"(b) worker path, {processes} processes", teacher, labeler, n_images, wall,
                         cpu, **extra, timings=sums, threads=threads, io_threads=labeler.config.io_threads,
                         processes=processes))
            elif "worker" in runs:
                wall, sums, cpu, threads = best(run_worker, labeler, work / "worker", plans)
                emit(row("worker", "(b) worker path", teacher, labeler, n_images, wall, cpu, **extra, **graphs(),
                         timings=sums, threads=threads, io_threads=labeler.config.io_threads, processes=1))
            if "naive" in runs:
                n = naive_images or n_images
                naive = make_teacher(teacher, weights, teacher_size).to(labeler.device).eval()
                emit(row("naive", "(c) naive loop", teacher, labeler, n,
                         *best(run_naive, naive, labeler.device, records[:n], tuple(image_size), work / "naive"),
                         **extra))
            labeler.close()
        if "null" in runs:
            labeler = ShardLabeler(config("null"), make_teacher("null", None, size))
            if processes > 1:
                labeler.close()
                wall, sums, cpu, threads = best(run_processes, config("null"), "null", None, size, work / "null",
                                                plans, processes)
            else:
                wall, sums, cpu, threads = best(run_worker, labeler, work / "null", plans)
                labeler.close()
            emit(row("null", "(d) worker path, do-nothing teacher" + (f", {processes} processes" if processes > 1
                                                                       else ""), "null", labeler, n_images,
                     wall, cpu, decode=decode, timings=sums, threads=threads, io_threads=labeler.config.io_threads,
                     processes=processes))
        if "stages" in runs:
            stage_ms = run_stages(records, tuple(image_size), 95, min(n_images, 256))
            r = {"run": "stages", "what": "CPU ms per image of each stage, one thread", "images": min(n_images, 256),
                 "cores": cores(), "load_avg": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                 "cpu_ms": stage_ms, "best_of": 1}
            click.echo(json.dumps(r))
            if json_out:
                with open(json_out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by = {r["run"]: r for r in rows}
    table_rows = [(r["what"], r["teacher"], r["device"], r["batch_size"], r["precision"], r["images"],
                   f"{r['images_per_s']:.1f}", f"{r['images_per_s_per_core']:.1f}",
                   f"{r['images_per_cpu_s']:.1f}" if r["images_per_cpu_s"] else "",
                   int(r["timings"]["failed"]) if "failed" in r.get("timings", {}) else "") for r in rows]
    click.echo("")
    click.echo(table(["run", "teacher", "device", "batch", "precision", "images", "images/s", "per core",
                      "per CPU-s", "failed"], table_rows, align="llllrrrrrr", rule=True))
    if any(r.get("timings", {}).get("failed") for r in rows):
        click.echo("warning: images failed in a worker run; its rate counts them, though a failed image is not "
                   "encoded or written")
    if any(r.get("timings", {}).get("failed_elsewhere") for r in rows):
        click.echo("warning: images failed in a warm-up or a repeat not kept (failed_elsewhere in the JSON line)")
    ratios = []
    if "worker" in by and "teacher" in by:
        ratios.append(("(b)/(a) worker / bare teacher", f"{by['worker']['images_per_s'] / by['teacher']['images_per_s']:.2f}"))
    if "worker" in by and "naive" in by:
        ratios.append(("(b)/(c) worker / naive loop", f"{by['worker']['images_per_s'] / by['naive']['images_per_s']:.2f}"))
    if ratios:
        click.echo("")
        click.echo(table(None, ratios))
    for r in rows:
        if r.get("threads"):
            click.echo("")
            click.echo(f"threads of {r['what']}" + (" (the first process)" if r.get("processes", 1) > 1 else "")
                       + ": CPU seconds, and busy = CPU seconds per second of the process's labelling")
            click.echo(table(["thread group", "threads", "CPU s", "busy"],
                             [(g, v["threads"], f"{v['cpu_s']:.2f}", f"{v['busy']:.2f}") for g, v in
                              r["threads"].items() if v["cpu_s"] >= 0.01], align="lrrr", rule=True))
    if "stages" in runs:
        click.echo("")
        click.echo(table(["stage (CPU path, one thread)", "CPU ms/image"], list(stage_ms.items()), align="lr", rule=True))
    from _cli import machine_line

    click.echo(f"\n{machine_line(resolve_device(device))}; {cores()} cores usable, load average "
               f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
