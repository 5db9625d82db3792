"""Scoring speed on human fixations, in-process: ``metrics.image_metrics`` alone, or ``evaluate_fixations``.

    python bench/eval_metrics.py --mode metrics --images 200
    python bench/eval_metrics.py --mode eval --images 200 --io-threads 4
    python bench/eval_metrics.py --mode eval --predictor classic --device cuda

The fixation set is synthetic and built in memory (no dataset needed): ``--images`` images of
SALICON / MIT1003-like sizes (480x640, 768x1024, 1024x768), each with 20-60 fixations
(``--fixations``) clustered around 1-4 random centres (drawn towards the middle, as human
fixations are).

``--mode metrics`` times :func:`pipeline.metrics.image_metrics` on one realistic log density per
image, with the same inputs ``evaluate_fixations`` gives it (other images' fixations rescaled for
the shuffled AUC, the pooled centre bias resized for IG); it then times each part of it on its own
(``--no-breakdown`` skips that), and projects the time for ``--project`` images. The shuffled
AUC's negatives are *all other images' fixations*, counted per pixel once per map size (each image
takes its own away): the projection re-times that with a ``--project``-image set's fixations.

``--mode eval`` times :func:`pipeline.evaluate.evaluate_fixations` end to end (JPEG decoding in
the thread pool, the predictor, the scoring), on JPEGs written to a temporary folder (the
bundled sample photos resized to each image's size). ``--predictor blob`` is a near-free
Gaussian-blob log density, so the numbers are decoding + scoring; ``--predictor classic`` (or any
teacher name, with ``--weights``) runs a real teacher. Before that, one image at a time, it
measures decode / predict / score separately, to show how much the thread pool overlaps.

Prints a table; ``--out FILE`` also writes the rows and settings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipeline.common.tables import table
from pipeline.common import images  # main() calls images.opencv(): cv2 on 1 thread, as `pipeline eval` sets it
from pipeline.score import evaluate, metrics  # noqa: F401
from pipeline.score.fixations import FixationSet
import teachers

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"
#: (height, width) drawn for each image: SALICON (COCO) is 480x640, MIT1003 mostly 768x1024 / 1024x768
SIZES = ((480, 640), (768, 1024), (1024, 768))
#: distinct log densities per size in --mode metrics (they are reused cyclically to bound memory)
POOL_PER_SIZE = 6


# --------------------------------------------------------------------------------------------
# synthetic data


def synthetic_fixations(n: int, seed: int, root: Path, fix_range=(20, 60)) -> FixationSet:
    rng = np.random.default_rng(seed)
    sizes = np.array([SIZES[k] for k in rng.integers(0, len(SIZES), n)], dtype=np.int32)
    ys_l, xs_l, idx_l, subj_l = [], [], [], []
    for i, (h, w) in enumerate(sizes):
        m = int(rng.integers(fix_range[0], fix_range[1] + 1))
        k = int(rng.integers(1, 5))
        centres = np.clip(rng.normal([h / 2, w / 2], [h / 5, w / 5], size=(k, 2)), 0, [h - 1, w - 1])
        which = rng.integers(0, k, m)
        spread = rng.uniform(0.02, 0.06, k)[which, None] * max(h, w)
        pts = centres[which] + rng.normal(0, 1, (m, 2)) * spread
        pts = np.rint(np.clip(pts, 0, [h - 1, w - 1])).astype(np.int32)
        ys_l.append(pts[:, 0])
        xs_l.append(pts[:, 1])
        idx_l.append(np.full(m, i, np.int32))
        subj_l.append(rng.integers(0, 15, m).astype(np.int32))
    return FixationSet(name="synthetic", root=root, paths=[f"images/{i:06d}.jpg" for i in range(n)], sizes=sizes,
                       ys=np.concatenate(ys_l), xs=np.concatenate(xs_l), image_index=np.concatenate(idx_l),
                       subject=np.concatenate(subj_l), names=[f"{i:06d}" for i in range(n)])


def blob_log_density(shape: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """A float32 log density: a centre bias plus (with ``rng``) a few random blobs, as a model's output."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    dens = np.exp(-0.5 * (y[:, None] / 0.25) ** 2) * np.exp(-0.5 * (x[None, :] / 0.25) ** 2)
    if rng is not None:
        for _ in range(int(rng.integers(2, 6))):
            cy, cx = rng.uniform(-0.4, 0.4, 2)
            s = rng.uniform(0.03, 0.12)
            dens = dens + rng.uniform(0.5, 2.0) * np.exp(-0.5 * ((y[:, None] - cy) / s) ** 2) \
                * np.exp(-0.5 * ((x[None, :] - cx) / s) ** 2)
        dens = dens * rng.uniform(0.9, 1.1, dens.shape)  # pixel noise: few ties, as in a real map
    logd = np.log(dens + 1e-12)
    return (logd - metrics._logsumexp(logd)).astype(np.float32)


class BlobPredictor:
    """The ``Predictor`` interface evaluate_fixations uses (``name``, ``log_densities``), at ~no cost."""

    name = "blob"

    def __init__(self):
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def log_densities(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for x in rgbs:
            shape = x.shape[:2]
            if shape not in self._cache:
                self._cache[shape] = blob_log_density(shape)
            out.append(self._cache[shape].copy())
        return out


def write_jpegs(fs: FixationSet) -> None:
    """The sample photos, resized to each image's size, as ``fs.root/images/*.jpg`` (real decoding cost)."""
    src = sorted(SAMPLE.glob("*.jpg"))
    if not src:
        raise SystemExit(f"no sample photos in {SAMPLE}")
    encoded: dict[tuple[int, tuple[int, int]], bytes] = {}
    (fs.root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(len(fs)):
        key = (i % len(src), tuple(int(v) for v in fs.sizes[i]))
        if key not in encoded:
            rgb = images.read_image(str(src[key[0]]))
            encoded[key] = images.encode_jpeg(cv2.resize(rgb, key[1][::-1], interpolation=cv2.INTER_LINEAR), 90)
        fs.image_path(i).write_bytes(encoded[key])


# --------------------------------------------------------------------------------------------
# what evaluate_fixations computes per image before image_metrics (kept identical to its score())


class ScoreInputs:
    def __init__(self, fs: FixationSet):
        self.fs = fs
        self.negatives = evaluate.OtherFixations.of(fs)
        self.base = metrics.centerbias_log_density([(*fs.fixations(i), tuple(fs.sizes[i])) for i in range(len(fs))])

    def __call__(self, i: int, shape: tuple[int, int]):
        h, w = shape
        ys, xs = self.fs.fixations(i)
        counts = self.negatives.counts(i, h, w)
        return ys, xs, counts, metrics.resize_log_density(self.base, (h, w))


def _ms(seconds: float) -> float:
    return round(1000.0 * seconds, 2)


def _breakdown(logd, ys, xs, counts, base, sigma) -> dict[str, float]:
    """Seconds of each step of image_metrics, as it does them (one image)."""
    t = {}
    t0 = time.perf_counter()
    ld = metrics._as_map(logd, "log_density")
    t["to float64 + checks"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    smap = np.exp(metrics._normalised_log(ld, "log_density"))
    t["exp(normalised log)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    emp = metrics.empirical_saliency_map(ys, xs, ld.shape, sigma)
    t["empirical map (blur)"] = time.perf_counter() - t0
    for name, fn in (("auc_judd", lambda: metrics.auc_judd(ld, ys, xs)),
                     ("auc_borji", lambda: metrics.auc_borji(smap, ys, xs)),
                     ("sauc", lambda: metrics.shuffled_auc_counts(ld, ys, xs, counts)),
                     ("nss", lambda: metrics.nss(smap, ys, xs)),
                     ("cc", lambda: metrics.cc(smap, emp)),
                     ("kl_div", lambda: metrics.kl_div(smap, emp)),
                     ("sim", lambda: metrics.sim(smap, emp)),
                     ("ig", lambda: metrics.information_gain(ld, base, ys, xs))):
        t0 = time.perf_counter()
        fn()
        t[name] = time.perf_counter() - t0
    return t


# --------------------------------------------------------------------------------------------
# modes


def run_metrics(args, fs: FixationSet) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(args.seed + 1)
    pool = {s: [blob_log_density(s, rng) for _ in range(POOL_PER_SIZE)] for s in SIZES}
    prep = ScoreInputs(fs)
    n = len(fs)
    shapes = [tuple(int(v) for v in fs.sizes[i]) for i in range(n)]
    # the resized baseline depends on the size only: one per size, so memory stays bounded
    base = {s: metrics.resize_log_density(prep.base, s) for s in set(shapes)}
    t0 = time.perf_counter()
    for i, s in enumerate(shapes):  # timed apart, results dropped (as score() does per image)
        prep(i, s)
    t_prep = time.perf_counter() - t0

    def item(i: int):  # (each image's negatives, a map of counts, made when it is scored: 200 would fill memory)
        s = shapes[i]
        return (pool[s][i % POOL_PER_SIZE], *prep(i, s)[:3], base[s], args.sigma_frac * max(s))

    def call(logd, ys, xs, counts, base, sigma):
        return metrics.image_metrics(logd, ys, xs, other_counts=counts, baseline_log_density=base, sigma=sigma)

    for i in range(min(3, n)):  # warm-up
        call(*item(i))
    per_size: dict[tuple[int, int], list[float]] = {}
    wall = 0.0
    for i in range(n):
        args_i = item(i)
        t0 = time.perf_counter()
        call(*args_i)
        took = time.perf_counter() - t0
        per_size.setdefault(shapes[i], []).append(took)
        wall += took

    rows = []
    for shape, ts in sorted(per_size.items()):
        rows.append({"what": f"image_metrics {shape[0]}x{shape[1]}", "images": len(ts),
                     "ms_per_image": _ms(statistics.mean(ts)), "median_ms": _ms(statistics.median(ts)),
                     "images_per_s": round(len(ts) / sum(ts), 1)})
    rows.append({"what": "image_metrics, all sizes", "images": n, "ms_per_image": _ms(wall / n),
                 "median_ms": _ms(statistics.median([t for ts in per_size.values() for t in ts])),
                 "images_per_s": round(n / wall, 1)})
    rows.append({"what": "per-image prep in score() (sAUC negatives, IG baseline resize)", "images": n,
                 "ms_per_image": _ms(t_prep / n), "median_ms": None, "images_per_s": round(n / t_prep, 1)})

    parts: dict[str, float] = {}
    if args.breakdown:
        for i in range(n):
            for k, v in _breakdown(*item(i)).items():
                parts[k] = parts.get(k, 0.0) + v
        for k, v in parts.items():
            rows.append({"what": f"  part: {k}", "images": n, "ms_per_image": _ms(v / n), "median_ms": None,
                         "images_per_s": None})

    # projection: the sAUC negatives are every other image's fixations, counted per pixel once per map size; per
    # image only its own are taken away, so a larger set changes little: re-timed with a fake set of --project
    # images' fixations (its counts per size made first, timed apart: once per size in a run)
    mean_fix = fs.n_fixations / n
    m_big = int(round(mean_fix * args.project))
    rng2 = np.random.default_rng(args.seed + 2)
    big_fy, big_fx = rng2.random(m_big), rng2.random(m_big)
    big_offsets = np.searchsorted(np.sort(rng2.integers(0, args.project, m_big)), np.arange(args.project + 1))

    sample = list(range(min(20, n)))
    big = evaluate.OtherFixations(big_fy, big_fx, big_offsets)
    t0 = time.perf_counter()
    for s in {shapes[i] for i in sample}:
        big.every(*s)
    t_grids = (time.perf_counter() - t0) / max(len(big.grids), 1)
    t = {"neg_small": 0.0, "neg_big": 0.0, "sauc_small": 0.0, "sauc_big": 0.0}
    for i in sample:
        logd, ys, xs = item(i)[:3]
        h, w = logd.shape
        for size, negatives in (("small", prep.negatives), ("big", big)):
            t0 = time.perf_counter()
            counts = negatives.counts(i, h, w)
            t1 = time.perf_counter()
            metrics.shuffled_auc_counts(logd, ys, xs, counts)
            t["neg_" + size] += t1 - t0
            t["sauc_" + size] += time.perf_counter() - t1
    k = len(sample)
    per_image = wall / n + t_prep / n
    per_image_big = per_image + (t["neg_big"] - t["neg_small"] + t["sauc_big"] - t["sauc_small"]) / k
    rows.append({"what": "image_metrics + prep, this set", "images": n, "ms_per_image": _ms(per_image),
                 "median_ms": None, "images_per_s": round(1.0 / per_image, 1),
                 "projected_s": round(per_image * args.project, 1)})
    rows.append({"what": f"projected to {args.project} images ({m_big - round(mean_fix)} sAUC negatives each)",
                 "images": args.project, "ms_per_image": _ms(per_image_big), "median_ms": None,
                 "images_per_s": round(1.0 / per_image_big, 1),
                 "projected_s": round(per_image_big * args.project, 1)})
    extra = {"projected_seconds": round(per_image_big * args.project, 1),
             "sauc_ms": {"this_set": _ms(t["sauc_small"] / k), f"{args.project}_images": _ms(t["sauc_big"] / k)},
             "sauc_negatives_build_ms": {"this_set": _ms(t["neg_small"] / k),
                                         f"{args.project}_images": _ms(t["neg_big"] / k)},
             f"sauc_counts_per_size_ms_{args.project}_images": _ms(t_grids)}
    return rows, extra


def run_eval(args, fs: FixationSet) -> tuple[list[dict], dict]:
    if args.predictor == "blob":
        predictor = BlobPredictor()
    else:
        from pipeline.score.predictors import teacher_predictor

        predictor = teacher_predictor(args.predictor, args.weights, device=args.device, precision=args.precision)
    t0 = time.perf_counter()
    write_jpegs(fs)
    t_write = time.perf_counter() - t0
    n = len(fs)

    # warm-up (torch kernels, page cache of the JPEGs, cv2)
    evaluate.evaluate_fixations(predictor, fs, batch_size=args.batch_size, sigma_frac=args.sigma_frac,
                                io_threads=args.io_threads, limit=min(4, n), progress=False)
    for i in range(n):
        fs.image_path(i).read_bytes()

    # serial per-stage costs, one image at a time
    prep = ScoreInputs(fs)
    k = min(n, args.stage_images)
    st = {"decode": 0.0, "predict": 0.0, "score": 0.0}
    for i in range(k):
        t0 = time.perf_counter()
        rgb = images.read_image(str(fs.image_path(i)))
        t1 = time.perf_counter()
        logd = predictor.log_densities([rgb])[0]
        t2 = time.perf_counter()
        ys, xs, counts, base = prep(i, logd.shape)
        metrics.image_metrics(logd, ys, xs, other_counts=counts, baseline_log_density=base,
                              sigma=args.sigma_frac * max(logd.shape))
        t3 = time.perf_counter()
        st["decode"] += t1 - t0
        st["predict"] += t2 - t1
        st["score"] += t3 - t2

    t0 = time.perf_counter()
    result = evaluate.evaluate_fixations(predictor, fs, batch_size=args.batch_size, sigma_frac=args.sigma_frac,
                                         io_threads=args.io_threads, progress=False)
    wall = time.perf_counter() - t0
    if k < n:  # the overlap's speed-up compares the same images: the first k, end to end as well
        t0 = time.perf_counter()
        evaluate.evaluate_fixations(predictor, fs, batch_size=args.batch_size, sigma_frac=args.sigma_frac,
                                    io_threads=args.io_threads, limit=k, progress=False)
        wall_k = time.perf_counter() - t0
    else:
        wall_k = wall
    if result.failures:
        raise SystemExit(f"{len(result.failures)} images failed: {result.failures[:3]}")

    rows = []
    for name, v in st.items():
        rows.append({"what": f"serial: {name}", "images": k, "ms_per_image": _ms(v / k),
                     "images_per_s": round(k / v, 1) if v else None})
    serial = sum(st.values()) / k
    rows.append({"what": "serial: decode + predict + score", "images": k, "ms_per_image": _ms(serial),
                 "images_per_s": round(1 / serial, 1)})
    rows.append({"what": f"evaluate_fixations, {args.io_threads} io threads, batch {args.batch_size}",
                 "images": n, "ms_per_image": _ms(wall / n), "images_per_s": round(n / wall, 1)})
    rows.append({"what": f"projected: x {args.project} images (linear)", "images": args.project,
                 "ms_per_image": _ms(wall / n), "images_per_s": round(n / wall, 1),
                 "projected_s": round(wall / n * args.project, 1)})
    means = {m: round(v, 4) for m, v in result.means.items()}
    if args.predictor != "blob":
        import torch

        extra_dev = {"device": str(predictor.device), "torch_threads": torch.get_num_threads()}
    else:
        extra_dev = {}
    extra = {"predictor": predictor.name, **extra_dev, "wall_s": round(wall, 3), "jpeg_write_s": round(t_write, 2),
             "overlap_speedup": round(serial / (wall_k / k), 2), "metric_means": means}
    return rows, extra


# --------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    cols = [c for c in ("what", "images", "ms_per_image", "median_ms", "images_per_s", "projected_s")
            if any(c in r for r in rows)]
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    print(table(cols, cells, align="lr", rule=True))


def main(argv=None) -> None:
    from _cli import HelpFormatter  # (bench/ is the script's folder: first on sys.path)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--mode", choices=("metrics", "eval"), default="metrics")
    p.add_argument("--images", type=int, default=200, help="synthetic images (default 200)")
    p.add_argument("--fixations", default="20,60",
                   help="MIN,MAX fixations per image (default 20,60; SALICON has a few hundred)")
    p.add_argument("--sigma-frac", type=float, default=evaluate.DEFAULT_SIGMA_FRAC,
                   help=f"empirical-map blur, fraction of the long side (default {evaluate.DEFAULT_SIGMA_FRAC})")
    p.add_argument("--io-threads", type=int, default=4, help="eval mode: evaluate_fixations' thread pool")
    p.add_argument("--batch-size", type=int, default=8, help="eval mode: predictor batch size")
    p.add_argument("--predictor", default="blob", choices=["blob", *teachers.available()],
                   help="eval mode: blob (near-free Gaussian blobs) or a teacher name, e.g. classic")
    p.add_argument("--weights", default=None, help="eval mode: teacher weights (for teachers that need them)")
    p.add_argument("--device", default="auto", help="eval mode, teacher predictor: auto | cpu | cuda")
    p.add_argument("--precision", default="auto", help="eval mode, teacher predictor: auto | fp32 | bf16")
    p.add_argument("--stage-images", type=int, default=20, help="eval mode: images for the serial per-stage timing")
    p.add_argument("--project", type=int, default=5000, help="project the time for this many images (default 5000)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="metrics mode: skip timing each metric on its own")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads for a teacher predictor (default 0: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the rows and settings to this JSON file")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    try:
        fix_range = tuple(int(v) for v in args.fixations.split(","))
        assert len(fix_range) == 2 and 1 <= fix_range[0] <= fix_range[1]
    except (ValueError, AssertionError):
        p.error("--fixations takes MIN,MAX with 1 <= MIN <= MAX, e.g. 20,60")

    # OpenCV as `pipeline eval` runs it (one thread per call): the import no longer sets it, the first decode
    # does, and --mode metrics decodes nothing, so without this its blurs and resizes ran on OpenCV's own threads
    images.opencv()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        fs = synthetic_fixations(args.images, args.seed, work, fix_range)
        runner = run_metrics if args.mode == "metrics" else run_eval
        rows, extra = runner(args, fs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    sizes = {f"{h}x{w}": int(c) for (h, w), c in zip(*np.unique(fs.sizes, axis=0, return_counts=True))}
    info = {"mode": args.mode, "images": args.images, "fixations": fs.n_fixations, "sizes": sizes,
            "sigma_frac": args.sigma_frac, "io_threads": args.io_threads if args.mode == "eval" else None,
            "cpu_count": os.cpu_count(), "load_avg_1min_before": round(load_before, 2),
            "cv2_threads": cv2.getNumThreads(), "numpy": np.__version__,
            "python": platform.python_version(), **extra}
    print(f"\n{args.mode}: {args.images} synthetic images {sizes}, {fs.n_fixations} fixations, "
          f"sigma_frac {args.sigma_frac}, {os.cpu_count()} CPUs (load {load_before:.1f} before), "
          f"cv2 threads {cv2.getNumThreads()}")
    print_table(rows)
    for k, v in extra.items():
        print(f"  {k}: {v}")
    for row in rows:  # one JSON line per figure, with the run's settings
        print(json.dumps({**row, "mode": args.mode, "predictor": extra.get("predictor", args.predictor)}))
    if args.out:
        args.out.write_text(json.dumps({"settings": info, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    import _cli  # (bench/ is the script's folder: first on sys.path)

    _cli.run(main)
