"""Scoring a map never trained on saliency (SACT's ponder map) as Figurnov et al. score it on CAT2000.

The raw map is Gaussian-blurred, normalised to [0, 1] and linearly combined with a centre baseline (a
Gaussian centred in the image); the blur width and the baseline's weight are fitted on a calibration
half of the fixation set (the first half of each category's images, where the set has categories, i.e.
stimuli in several folders; else the first half), maximising the mean AUC-Judd, the metric the paper
reports, and the combined map is scored on the other half with all eight metrics. The centre baseline alone
(weight 1) is one point of that grid: its AUC-Judd on the calibration half is reported beside the fit's, so
that a map which adds nothing to it shows as such.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import images
from pipeline.common.progress import progress as show_progress
from pipeline.score import metrics
from pipeline.score.evaluate import EvalResult, check_source, evaluate_fixations, read_stimulus
from pipeline.score.fixations import FixationSet
from pipeline.score.predictors import Predictor

#: blur widths tried, as a fraction of the image's longer side (0: no blur)
BLUR_FRACS = (0.0, 0.01, 0.02, 0.04, 0.08)
#: weights of the centre baseline tried
CENTER_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 11))
#: the centre baseline's standard deviation, as a fraction of each side
CENTER_SIGMA = 0.25


@dataclass(frozen=True)
class Calibration:
    blur_frac: float
    center_weight: float
    auc_judd: float  # mean over the calibration half
    images: int  # in the calibration half
    center_auc_judd: float = float("nan")  # the centre baseline alone (weight 1), on the same images

    @property
    def center_only(self) -> bool:
        """The map adds nothing to the centre baseline on the calibration half: the best fit scores no better
        than the centre alone (weight 1, or a flat map mixed with any weight above 0)."""
        return self.auc_judd <= self.center_auc_judd


def halves(fs: FixationSet) -> tuple[list[int], list[int]]:
    """(calibration, test) image indices: the first half of each category (stimulus folder) calibrates."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, path in enumerate(fs.paths):
        groups[str(Path(path).parent)].append(i)
    calib, test = [], []
    for members in groups.values():
        cut = len(members) // 2
        calib += members[:cut]
        test += members[cut:]
    return sorted(calib), sorted(test)


@functools.lru_cache(maxsize=8)
def center_baseline(shape: tuple[int, int]) -> np.ndarray:
    """A Gaussian centred in an image of ``shape``, peak 1 (cached: every map of one size shares it; read only)."""
    h, w = shape
    y = (np.arange(h) + 0.5 - h / 2) / (CENTER_SIGMA * h)
    x = (np.arange(w) + 0.5 - w / 2) / (CENTER_SIGMA * w)
    out = np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))
    out.flags.writeable = False
    return out


def blurred(raw: np.ndarray, blur_frac: float) -> np.ndarray:
    """The map blurred by ``blur_frac`` of its longer side and normalised to [0, 1] (all zeros if flat)."""
    m = metrics.gaussian_blur(raw.astype(np.float32), blur_frac * max(raw.shape))
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def mix(m: np.ndarray, center_weight: float) -> np.ndarray:
    return (1.0 - center_weight) * m + center_weight * center_baseline(m.shape)


def combine(raw: np.ndarray, blur_frac: float, center_weight: float) -> np.ndarray:
    """The map blurred, normalised to [0, 1] and mixed with the centre baseline (weights 1 − w and w)."""
    return mix(blurred(raw, blur_frac), center_weight)


class Fit:
    """The grid search, one image at a time: each map blurred once per width, mixed with each centre weight, its
    AUC-Judd added to that combination's sum (a map is not kept: a calibration half of CAT2000's 1920×1080
    photos would be gigabytes)."""

    def __init__(self) -> None:
        shape = (len(BLUR_FRACS), len(CENTER_WEIGHTS))
        self.sums, self.counts = np.zeros(shape), np.zeros(shape, np.int64)
        self.center_sum, self.center_count, self.images = 0.0, 0, 0

    def add(self, raw: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> None:
        self.images += 1
        for i, blur_frac in enumerate(BLUR_FRACS):
            m = blurred(raw, blur_frac)
            for j, weight in enumerate(CENTER_WEIGHTS):
                score = metrics.auc_judd(mix(m, weight), ys, xs)
                if not np.isnan(score):  # (an image without fixations counts in no mean)
                    self.sums[i, j] += score
                    self.counts[i, j] += 1
        center = metrics.auc_judd(center_baseline(raw.shape), ys, xs)
        if not np.isnan(center):
            self.center_sum, self.center_count = self.center_sum + center, self.center_count + 1

    def best(self) -> Calibration:
        """The blur and centre weight of the highest mean AUC-Judd (the first of the grid on ties)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums / self.counts  # NaN where no image had fixations
        flat = np.where(np.isnan(means), -np.inf, means).ravel()
        i, j = np.unravel_index(int(np.argmax(flat)), means.shape)
        center = self.center_sum / self.center_count if self.center_count else float("nan")
        return Calibration(BLUR_FRACS[i], CENTER_WEIGHTS[j], float(means[i, j]), self.images, float(center))


def fit(raws: list[np.ndarray], fixations: list[tuple[np.ndarray, np.ndarray]]) -> Calibration:
    """The blur and centre weight that maximise the mean AUC-Judd over ``raws`` (first best on ties)."""
    search = Fit()
    for raw, (ys, xs) in zip(raws, fixations):
        search.add(raw, ys, xs)
    return search.best()


class CalibratedPredictor:
    """A predictor whose log densities are its calibrated raw map, normalised to sum 1."""

    def __init__(self, predictor: Predictor, calibration: Calibration):
        self.predictor, self.calibration = predictor, calibration
        c = calibration
        self.name = f"{predictor.name} (blur {c.blur_frac:g}, centre weight {c.center_weight:g})"

    def log_densities(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for raw in self.predictor.raw_maps(rgbs):
            p = combine(raw, self.calibration.blur_frac, self.calibration.center_weight).astype(np.float64)
            p = np.maximum(p, 0.0) + metrics.KL_EPS
            out.append(np.log(p / p.sum()).astype(np.float32))
        return out


def evaluate_calibrated(predictor: Predictor, fs: FixationSet, *, limit: int | None = None, progress: bool = True,
                        **options) -> tuple[EvalResult, Calibration]:
    """Fit on the calibration half, score the other half (``options`` as :func:`evaluate_fixations`; ``limit``
    takes the first N images of each half). The result's time counts both halves."""
    t0 = time.perf_counter()
    calib, test = halves(fs)
    if not calib or not test:
        raise ValueError(f"{fs.name} has {len(fs)} image{'' if len(fs) == 1 else 's'}: calibrating and scoring need at least two per category")
    calib = calib if limit is None else calib[:limit]
    check_source(fs)
    search, failures = Fit(), []
    with show_progress(len(calib), f"calibrate {predictor.name}", enabled=progress) as bar:
        for i in calib:
            try:
                rgb = read_stimulus(fs, i)
            except images.ImageError as e:  # listed with the scored half's failures, left out of the fit
                failures.append({"index": i, "path": fs.paths[i],
                                 "reason": f"{e} (calibration half: not in the fit)"})
                bar.update(1)
                continue
            ys, xs = fs.fixations(i)
            if rgb.shape[:2] != tuple(fs.sizes[i]):
                ys, xs = metrics.rescale_fixations(ys, xs, tuple(fs.sizes[i]), rgb.shape[:2])
            search.add(predictor.raw_maps([rgb])[0], ys, xs)
            bar.update(1)
    if not search.images:
        raise ValueError(f"no image of {fs.name}'s calibration half could be read (the first: {failures[0]['path']}: "
                         f"{failures[0]['reason']})")
    calibration = search.best()
    result = evaluate_fixations(CalibratedPredictor(predictor, calibration), fs, indices=test, limit=limit,
                                progress=progress, **options)
    result.failures[:0] = failures
    result.data = f"{result.data}, calibrated on {search.images} other{'' if search.images == 1 else 's'}"
    result.calibrated = search.images
    result.seconds = time.perf_counter() - t0
    return result, calibration
