"""Scoring a map never trained on saliency (SACT's ponder map) as Figurnov et al. score it on CAT2000.

The raw map is Gaussian-blurred, normalised to [0, 1] and linearly combined with a centre baseline (a
Gaussian centred in the image); the blur width and the baseline's weight are fitted on a calibration
half of the fixation set (the first half of each category's images, where the set has categories, i.e.
stimuli in several folders; else the first half), maximising the mean AUC-Judd, the metric the paper
reports, and the combined map is scored on the other half with all eight metrics.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common import images
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


def center_baseline(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    y = (np.arange(h) + 0.5 - h / 2) / (CENTER_SIGMA * h)
    x = (np.arange(w) + 0.5 - w / 2) / (CENTER_SIGMA * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def combine(raw: np.ndarray, blur_frac: float, center_weight: float) -> np.ndarray:
    """The map blurred, normalised to [0, 1] and mixed with the centre baseline (weights 1 − w and w)."""
    m = metrics.gaussian_blur(raw.astype(np.float32), blur_frac * max(raw.shape))
    lo, hi = float(m.min()), float(m.max())
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    return (1.0 - center_weight) * m + center_weight * center_baseline(raw.shape)


def fit(raws: list[np.ndarray], fixations: list[tuple[np.ndarray, np.ndarray]]) -> Calibration:
    """The blur and centre weight that maximise the mean AUC-Judd over ``raws`` (first best on ties)."""
    best = None
    for blur_frac, weight in itertools.product(BLUR_FRACS, CENTER_WEIGHTS):
        scores = [metrics.auc_judd(combine(raw, blur_frac, weight), ys, xs) for raw, (ys, xs) in zip(raws, fixations)]
        scores = [s for s in scores if not np.isnan(s)]
        mean = float(np.mean(scores)) if scores else float("nan")
        if best is None or mean > best.auc_judd:
            best = Calibration(blur_frac, weight, mean, len(raws))
    return best


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


def evaluate_calibrated(predictor: Predictor, fs: FixationSet, **options) -> tuple[EvalResult, Calibration]:
    """Fit on the calibration half, score the other half (``options`` as :func:`evaluate_fixations`)."""
    calib, test = halves(fs)
    if not calib or not test:
        raise ValueError(f"{fs.name} has {len(fs)} images: calibrating and scoring need at least two per category")
    check_source(fs)
    raws, fixations, failures = [], [], []
    for i in calib:
        try:
            rgb = read_stimulus(fs, i)
        except images.ImageError as e:  # listed with the scored half's failures, left out of the fit
            failures.append({"index": i, "path": fs.paths[i], "reason": f"{e} (calibration half: not in the fit)"})
            continue
        raws += predictor.raw_maps([rgb])
        ys, xs = fs.fixations(i)
        if rgb.shape[:2] != tuple(fs.sizes[i]):
            ys, xs = metrics.rescale_fixations(ys, xs, tuple(fs.sizes[i]), rgb.shape[:2])
        fixations.append((ys, xs))
    if not raws:
        raise ValueError(f"no image of {fs.name}'s calibration half could be read (the first: {failures[0]['path']}: "
                         f"{failures[0]['reason']})")
    calibration = fit(raws, fixations)
    result = evaluate_fixations(CalibratedPredictor(predictor, calibration), fs, indices=test, **options)
    result.failures[:0] = failures
    result.data = f"{result.data}, calibrated on the other {len(calib)}"
    return result, calibration
