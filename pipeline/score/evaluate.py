"""Scoring a predictor: on human fixations (a converted fixation HDF5) or on held-out labelled shards.

On fixations, every image gets the eight benchmark metrics of :mod:`pipeline.score.metrics`
(AUC-Judd, AUC-Borji, sAUC, NSS, CC, KLDiv, SIM, IG); the dataset's score is the mean over images. The
shuffled AUC's negatives are the fixations of all other images, rescaled to the image; the IG
baseline is the centre bias of the dataset's own fixations (or a uniform density); CC, KLDiv and
SIM compare with the fixations blurred by a Gaussian of ``sigma_frac`` × the image's longer side.

On shards, the reference is the teacher's label (no human fixations): CC, KLDiv, SIM, and NSS as
its expectation under fixations drawn from the teacher's density.

Images are read and decoded in a thread pool, go through the model in batches, and are scored
in the pool again, so decoding and scoring overlap the forward pass.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.common import images
from pipeline.common.prefetch import batched, prefetched
from pipeline.common.progress import progress as show_progress
from pipeline.common.tables import plural, table
from pipeline.score import metrics
from pipeline.score.fixations import FixationSet
from pipeline.score.predictors import NOT_FINITE, Predictor
from students import to_log_density

#: MIT benchmark convention: the empirical map is blurred with a Gaussian of about one degree of
#: visual angle; for MIT1003 (1024 px wide, ~35 px per degree) that is ~3.4% of the longer side
DEFAULT_SIGMA_FRAC = 0.034
SHARD_METRICS = ("cc", "kl_div", "sim", "nss")
#: fewer images with fixations than this make information gain's centre-bias baseline coarse (a warning)
FEW_FOR_BASELINE = 100


@dataclass
class EvalResult:
    model: str
    data: str
    metric_names: tuple[str, ...]
    per_image: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    calibrated: int = 0  # images run besides those scored (an extra map's calibration half): in seconds, images/s
    settings: dict = field(default_factory=dict)  # what the scores depend on besides the model and the images

    @property
    def means(self) -> dict[str, float]:
        return _means(self.per_image, self.metric_names)

    @property
    def by_category(self) -> dict[str, dict]:
        """Of a fixation set whose images lie in several folders (CAT2000's 20 categories), per folder: the
        metrics' means and its images scored, as CAT2000's results are read; {} for a set of one folder (MIT1003,
        SALICON) and for label shards."""
        if "dataset" not in self.settings:
            return {}
        groups: dict[str, list[dict]] = {}
        for r in self.per_image:
            groups.setdefault(Path(r["path"]).parent.name, []).append(r)
        if len(groups) < 2:
            return {}
        return {c: {**_means(rows, self.metric_names), "images": len(rows)} for c, rows in sorted(groups.items())}

    @property
    def failed(self) -> int:
        """Images not scored (a failure may stand for several: a shard that ended early)."""
        return sum(f.get("images", 1) for f in self.failures)

    def table(self) -> str:
        rows = [(m, f"{v:.4f}") for m, v in self.means.items()]
        bare = sum(1 for r in self.per_image if r.get("fixations") == 0)  # every metric of it is undefined
        scored = f"{len(self.per_image)}" + (f" ({bare} without fixations: in no mean)" if bare else "")
        rows += [("images scored", scored), ("images failed", str(self.failed))]
        if "baseline" in self.settings:  # (on fixations)
            rows += [("baseline", f"{self.settings['baseline']} (IG)"),
                     ("sigma", f"{self.settings['sigma_frac']:g} of the longer side (CC, KLDiv, SIM)")]
        if self.calibrated:
            rows.append(("images calibrated on", str(self.calibrated)))
        rows += [("wall time", f"{self.seconds:.1f} s"),
                 ("images/s", f"{(len(self.per_image) + self.calibrated) / max(self.seconds, 1e-9):.1f}")]
        text = f"{self.model} on {self.data}\n" + table(None, rows, indent="  ")
        if groups := self.by_category:
            text += "\n" + table(["category", "images", *self.metric_names],
                                 [(c, g["images"], *(f"{g[m]:.4f}" for m in self.metric_names))
                                  for c, g in groups.items()], align="l" + "r" * (1 + len(self.metric_names)),
                                 indent="  ", rule=True)
        return text

    def to_json(self) -> dict:
        """Means, counts and every image's metrics; an undefined value (an image without fixations) is null."""
        def clean(row: dict) -> dict:
            return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()}

        return {"model": self.model, "data": self.data, **({"settings": self.settings} if self.settings else {}),
                "metrics": clean(self.means),
                **({"by_category": {c: clean(g) for c, g in groups.items()}} if (groups := self.by_category) else {}),
                "images": len(self.per_image), "failed": self.failed,
                "seconds": round(self.seconds, 3), "failures": self.failures,
                "per_image": [clean(r) for r in self.per_image]}


def _means(rows: list[dict], names) -> dict[str, float]:
    """Each metric's mean over ``rows`` where it is defined (NaN where it is nowhere)."""
    out = {}
    for m in names:
        values = np.array([r[m] for r in rows], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[m] = float(values.mean()) if values.size else float("nan")
    return out


def _other_fixations(fs: FixationSet) -> tuple[np.ndarray, np.ndarray]:
    """Every fixation's position as a fraction of its image (pixel centres), for shuffled AUC."""
    sizes = fs.sizes[fs.image_index].astype(np.float64)
    return (fs.ys + 0.5) / sizes[:, 0], (fs.xs + 0.5) / sizes[:, 1]


def fixation_cells(fy: np.ndarray, fx: np.ndarray, h: int, w: int) -> np.ndarray:
    """Fixations given as fractions of their images (:func:`_other_fixations`) as pixels of an h×w map, flat."""
    return np.minimum((fy * h).astype(np.intp), h - 1) * w + np.minimum((fx * w).astype(np.intp), w - 1)


class OtherFixations:
    """Shuffled AUC's negatives: for image ``i`` on an h×w map, how many of the other images' fixations fall on
    each pixel. Every fixation of the set is counted on a map size's grid once while that size is among the
    :data:`KEEP` last used (thread-safe), and image ``i``'s own are taken away: per image, every fixation of the
    set had been looked up (N×M for a set of N images and M fixations)."""

    KEEP = 8  # map sizes whose counts are kept (SALICON and CAT2000 have one; MIT1003's many are cheap to count)

    def __init__(self, fy: np.ndarray, fx: np.ndarray, offsets: np.ndarray):
        self.fy, self.fx, self.offsets = fy, fx, offsets
        self.grids: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    @classmethod
    def of(cls, fs: FixationSet) -> "OtherFixations":
        return cls(*_other_fixations(fs), fs.offsets)

    def every(self, h: int, w: int) -> np.ndarray:
        """Every fixation of the set counted on an h×w grid (flat; read only)."""
        with self.lock:
            if (h, w) not in self.grids:
                self.grids[(h, w)] = np.bincount(fixation_cells(self.fy, self.fx, h, w), minlength=h * w
                                                 ).astype(np.int32)
                if len(self.grids) > self.KEEP:
                    self.grids.popitem(last=False)
            self.grids.move_to_end((h, w))
            return self.grids[(h, w)]

    def counts(self, i: int, h: int, w: int) -> np.ndarray:
        """The other images' fixations on image ``i``'s h×w map, per pixel."""
        own = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        mine = np.bincount(fixation_cells(self.fy[own], self.fx[own], h, w), minlength=h * w)
        return (self.every(h, w) - mine).reshape(h, w)


def read_stimulus(fs: FixationSet, i: int) -> np.ndarray:
    """Image ``i`` of ``fs`` as RGB. A file of another aspect ratio than the one its fixations were recorded on
    (beyond a pixel's rounding) is another picture under that name: an :class:`~pipeline.common.images.ImageError`,
    so it is a listed failure, not scored against fixations that were never on it. One of the same aspect ratio
    (the stimuli resized) is scored with its fixations rescaled."""
    rgb = images.read_image(str(fs.image_path(i)))
    (h, w), (rh, rw) = rgb.shape[:2], (int(v) for v in fs.sizes[i])
    if abs(h * rw - w * rh) > max(rh, rw):
        raise images.ImageError(f"the file is {w}x{h} but its fixations were recorded on a {rw}x{rh} image "
                                "(another picture under this name?)")
    return rgb


def check_source(fs: FixationSet) -> None:
    """A dataset moved since its fixation file was made is one sentence, not a failure line per image."""
    if not fs.root.is_dir():
        raise ValueError(f"the images of {fs.name} are not where its fixation file says ({fs.root} does not exist): "
                         "make the file again with `pipeline fixations` from where the dataset is now")


def evaluate_fixations(predictor: Predictor, fs: FixationSet, *, batch_size: int = 8, baseline: str = "centerbias",
                       sigma_frac: float = DEFAULT_SIGMA_FRAC, io_threads: int = 4, limit: int | None = None,
                       indices: list[int] | None = None, progress: bool = True) -> EvalResult:
    """All eight metrics per image of ``fs`` (of ``indices`` when given; the first ``limit`` of them when given).

    The baseline (the centre bias of every other image's fixations) and the shuffled AUC's negatives come from
    the whole set, whatever images are scored.
    """
    t0 = time.perf_counter()
    chosen = list(range(len(fs))) if indices is None else list(indices)
    chosen = chosen if limit is None else chosen[:limit]
    n = len(chosen)
    check_source(fs)
    per_image = np.diff(fs.offsets)  # each image's fixations
    split = f" {fs.split}" if fs.split else ""
    result = EvalResult(predictor.name, f"{fs.name}{split} ({plural(n, 'image')})", metrics.METRICS,
                        settings={"dataset": fs.name, "split": fs.split or None,
                                  "fixations": int(per_image[chosen].sum()), "baseline": baseline,
                                  "sigma_frac": sigma_frac, "ig_unit": "bits per fixation"})
    if baseline not in ("centerbias", "uniform"):
        raise ValueError(f"unknown baseline {baseline!r} (centerbias or uniform)")
    # each image against the centre bias of the other images' fixations (leave one out; uniform where none)
    bias = metrics.CenterBias([(*fs.fixations(i), tuple(fs.sizes[i])) for i in range(len(fs))]) \
        if baseline == "centerbias" else None
    if bias is not None and not bias.counts.any():
        raise ValueError("centerbias_log_density needs at least one fixation")
    fixated = int(np.count_nonzero(per_image))
    if bias is not None and fixated < FEW_FOR_BASELINE:
        warnings.warn(f"information gain's baseline is the centre bias of {fs.name}'s own fixations, here those of "
                      f"{plural(fixated, 'image')}: so few give a coarse baseline over which every "
                      "model's IG is high (on 20 images of 5 fixations drawn from a known density, that density "
                      f"scored 1.1 bits over it and a uniform map 0.5; on {FEW_FOR_BASELINE} images of 15, 0.07 and "
                      "-0.6): compare IGs on one set only"
                      + (" (the image with fixations is scored against a uniform baseline)" if fixated == 1 else ""))

    def baseline_of(i: int) -> np.ndarray:  # (resized to the image's size where it is scored)
        if bias is None or bias.counts.sum() == len(bias.cells[i]):
            return np.zeros((1, 1))  # uniform
        return bias.log_density(without=i)

    negatives = OtherFixations.of(fs)

    def score(i: int, logd: np.ndarray) -> dict:
        h, w = logd.shape
        ys, xs = fs.fixations(i)
        if (h, w) != tuple(fs.sizes[i]):  # the file on disk differs from what the set recorded
            ys, xs = metrics.rescale_fixations(ys, xs, tuple(fs.sizes[i]), (h, w))
        values = metrics.image_metrics(logd, ys, xs, other_counts=negatives.counts(i, h, w),
                                       baseline_log_density=baseline_of(i),
                                       sigma=sigma_frac * max(h, w))
        return {"index": i, "path": fs.paths[i], "fixations": int(len(ys)), **values}

    with ThreadPoolExecutor(io_threads) as pool, \
            show_progress(n, f"eval {predictor.name}", enabled=progress) as bar:
        scoring: list[Future] = []
        read = lambda i: read_stimulus(fs, i)  # noqa: E731
        for batch in batched(prefetched(pool, chosen, read, 3 * batch_size, catch=images.ImageError), batch_size):
            good = [(i, x) for i, x in batch if not isinstance(x, Exception)]
            for i, x in batch:
                if isinstance(x, Exception):
                    result.failures.append({"index": i, "path": fs.paths[i], "reason": str(x)})
            for (i, _), logd in zip(good, predictor.log_densities([x for _, x in good])):
                if not np.isfinite(logd).all():
                    result.failures.append({"index": i, "path": fs.paths[i], "reason": NOT_FINITE})
                    continue
                scoring.append(pool.submit(score, i, logd))
            bar.update(len(batch))
        result.per_image = [f.result() for f in scoring]
    result.seconds = time.perf_counter() - t0
    return result


def evaluate_shards(predictor: Predictor, folder: str | Path, *, val_shards: int = 1, batch_size: int = 8,
                    limit: int | None = None, progress: bool = True) -> EvalResult:
    """CC, KLDiv, SIM and expected NSS against the teacher's labels in the last ``val_shards`` shards (0:
    every shard), their first ``limit`` images when given."""
    from pipeline.train.data import BadSamples, open_label_set, shard_loader, split_shards, verify_shards

    t0 = time.perf_counter()
    labels = open_label_set(folder)
    if val_shards >= len(labels.tars) > 0:  # (0 asks for all of them)
        warnings.warn(f"--val-shards {val_shards}: {folder} has {len(labels.tars)} shard"
                      f"{'' if len(labels.tars) == 1 else 's'}, all scored (the training shards too, if the model "
                      "was trained on this folder)")
    _, held_out = split_shards(labels.tars, val_shards) if 0 < val_shards < len(labels.tars) else ((), labels.tars)
    shards = labels.shards()
    verify_shards({tar: shards[tar] for tar in held_out})  # as `train` does: a tar changed after labelling
    # is no reference to score against
    which = (f"all {len(held_out)} shard{'' if len(held_out) == 1 else 's'}" if len(held_out) == len(labels.tars)
             else f"last {len(held_out)} of {len(labels.tars)} shards")
    result = EvalResult(predictor.name, f"{labels.teacher} labels in {folder} ({which})", SHARD_METRICS)
    bad = BadSamples()
    loader = shard_loader(labels, list(held_out), batch_size=batch_size, workers=0, bad=bad)
    with show_progress(None, f"eval {predictor.name}", enabled=progress) as bar:
        for imgs, targets, keys in loader:
            if limit is not None:
                room = limit - len(result.per_image)
                if room <= 0:
                    break
                imgs, targets, keys = imgs[:room], targets[:room], keys[:room]
            rgbs = [x.permute(1, 2, 0).numpy() for x in imgs]
            for key, logd, target in zip(keys, predictor.log_densities(rgbs), targets):
                if not np.isfinite(logd).all():
                    result.failures.append({"path": key, "reason": NOT_FINITE})
                    continue
                pred = np.exp(logd.astype(np.float64))
                t = to_log_density(target[None], labels.label_kind)[0, 0].double().exp().numpy()
                result.per_image.append({"key": key, "cc": metrics.cc(pred, t), "kl_div": metrics.kl_div(pred, t),
                                         "sim": metrics.sim(pred, t), "nss": metrics.expected_nss(pred, t)})
            bar.update(len(keys))
    for (shard, key), count in bad.seen.items():  # samples the reader skipped are failures of the score too
        if count:
            result.failures.append({"path": f"{shard} {key}", "reason": bad.reasons[shard, key], "images": count})
    result.seconds = time.perf_counter() - t0
    return result
