"""Saliency benchmark metrics (MIT / Tübingen saliency benchmark definitions, as in pysaliency).

Each metric is computed for **one image**; fixations are integer pixel indices ``ys`` (rows) and
``xs`` (columns), 0-based, inside the image.  Duplicate fixations at one pixel count as separate
fixations everywhere (as pysaliency indexes maps per fixation).  Note the argument order: this
module takes ``(ys, xs)``; pysaliency's ``NSS(saliency_map, xs, ys)`` takes x first.

Which pysaliency definition each function follows (github.com/matthias-k/pysaliency, files
``pysaliency/metrics.py``, ``pysaliency/saliency_map_models.py``, ``pysaliency/models.py``,
``pysaliency/roc_cython.pyx`` / ``pysaliency/numba_utils.py``):

``auc_judd``
    ``SaliencyMapModel.AUC_Judd``: ``AUC(nonfixations='unfixated', thresholds='fixations')``, i.e.
    ``general_roc(positives, negatives, judd=1)``.  Positives are the map values at the
    fixations (one per fixation, duplicates included); negatives are the values of all pixels that
    were *not* fixated (not all pixels - that is the plain ``AUC(nonfixations='uniform')``).  The
    thresholds are the fixated values plus one value above and one below everything; at a
    threshold ``t`` a value counts as "above" when it is ``>= t``; the area is the trapezoid rule
    over the resulting (FPR, TPR) points.  So negatives lying strictly between two consecutive
    fixation values, and negatives tied with a fixation value, all fall on one straight segment of
    the curve - the AUC-Judd approximation, which is not the Mann-Whitney statistic.
    *Deliberate difference*: pysaliency (and the MIT ``AUC_Judd.m``) by default add random jitter
    (Gaussian, sd 1e-7) to the map to break ties; we add none, so the result is deterministic and
    equals pysaliency's ``AUC_Judd(..., jitter=False)``.  Because the jitter is absolute, it is not
    negligible for density maps (values ~1e-6), another reason to leave it out.  A constant map
    gives exactly 0.5.  (The MIT Matlab code also counts a pixel fixated twice only once as a
    positive; pysaliency counts each fixation, and so do we.)

``shuffled_auc``
    ``SaliencyMapModel.AUC(nonfixations='shuffled')`` with the default ``thresholds='all'``, i.e.
    ``general_roc(positives, negatives, judd=0)`` where the negatives are the map values at the
    fixations of all *other* images, rescaled to this image (``FullShuffledNonfixationProvider``).
    With every value as a threshold the trapezoid area equals P(pos > neg) + 0.5 P(pos == neg)
    (ties count half), which is how it is computed here (no sort of the negatives needed).  The
    caller passes the other images' fixations already in this image's pixel coordinates;
    :func:`rescale_fixations` does that rescaling.
    *Difference*: pysaliency rescales continuous coordinates and truncates (``int(x * w / w')``);
    for integer pixel indices we map pixel centres, ``floor((x + 0.5) * w / w')``, which is the
    identity for equal sizes and does not shift points towards the top-left corner.

``auc_borji``
    Not in pysaliency: the MIT benchmark's ``AUC_Borji.m`` (Borji et al., 2013), the "bAUC" of FastSal's
    Table IV.  The map is min-max normalised to [0, 1]; positives are its values at the fixated pixels, a
    pixel fixated twice counting once (the Matlab code reads a binary fixation map); each of 100 splits draws
    as many negatives uniformly from all pixels, with replacement; thresholds run from the largest value in
    play down to 0 in steps of 0.1; (0, 0) and (1, 1) close each curve; the score is the mean trapezoid area.
    It is evaluated on ``exp(log_density)`` (the thresholds are values, not ranks).  *Differences*: the draws
    come from numpy's seeded generator, not Matlab's ``randi``, so a score matches the Matlab one to within
    its sampling noise, and the same inputs always give the same number; a constant map scores 0.5 (chance,
    as AUC-Judd's does), where ``mat2gray`` makes the Matlab code's NaN.

``nss``
    ``pysaliency.metrics.NSS``: standardise the map with its mean and *population* std (ddof=0),
    average the values at the fixations.  For a constant map (std 0) pysaliency does not divide,
    so NSS is 0.  pysaliency's dataset score averages over all fixations; to reproduce it from
    these per-image means weight each image by its fixation count.

``cc``
    ``pysaliency.metrics.CC``: Pearson correlation of the two maps.  pysaliency returns 0.0 when
    the *first* map is constant and the second is not, and NaN when both are constant (and NaN,
    with a warning, when only the second is constant).  *Deliberate difference*: we return 0.0
    when exactly one of the maps is constant, in either order; both constant stays NaN.

``kl_div``
    ``pysaliency.metrics.MIT_KLDiv(pred, gt)``: ``image_based_kl_divergence`` with
    ``minimum_value=0`` and ``log_regularization = quotient_regularization = 2.2204e-16``.  Both
    maps become densities via ``convert_saliency_map_to_density`` (subtract the minimum if it is
    negative, divide by the sum; an all-zero map becomes uniform), then
    ``KL = sum(gt * log(eps + gt / (pred + eps)))`` (natural log).  pysaliency goes through
    ``exp(log(density))``; we use the densities directly (the same up to rounding).

``sim``
    ``pysaliency.metrics.SIM``: both maps to densities as above, sum of the pixelwise minimum.

``information_gain``
    ``ScanpathModel.information_gains`` / ``information_gain``: per fixation
    ``(log p_model(x) - log p_baseline(x)) / log(2)`` (bits), averaged over the image's fixations.
    *Deliberate difference*: both log densities are renormalised to sum to 1 over the image
    (subtracting their logsumexp) before they are read; pysaliency takes them as given.  For
    proper densities this changes nothing; for a model whose output is off by a constant it stops
    that constant from showing up as information.

``empirical_saliency_map``
    Fixation counts blurred with ``cv2.GaussianBlur`` (sigma in pixels, kernel truncated at 4
    sigma by OpenCV, ``BORDER_REFLECT`` so that a fixation on the border keeps its full mass),
    normalised to sum 1; ``sigma <= 0`` means no blur.  (pysaliency's ``FixationMap`` models use
    scipy's ``gaussian_filter``; the MIT benchmark its own FFT blur.)

``CenterBias`` / ``centerbias_log_density`` / ``resize_log_density``
    A simple centre-bias baseline: all images' fixations pooled on a common grid (``CenterBias``: or all but
    one image's, the baseline that image is scored against, which holds none of its own), blurred, mixed
    with a little uniform density (``regularization``, like the uniform component of pysaliency's
    ``RegularizedKernelDensityEstimator``) so that it is finite everywhere, returned as a log
    density.  ``resize_log_density`` follows pysaliency's ``ResizingModel``: bilinear
    interpolation of the *log* density, then subtract its logsumexp so it sums to 1 again.
    (pysaliency uses ``scipy.ndimage.zoom(order=1, mode='nearest')``, corner-aligned; we use
    ``cv2.resize`` with ``INTER_LINEAR``, pixel-centre aligned.)

``image_metrics``
    All eight for one image.  The saliency map is ``exp(log_density)``; CC, KL and SIM compare it
    with ``empirical_saliency_map(ys, xs, shape, sigma)``, and AUC-Borji thresholds its values.
    AUC-Judd and sAUC are evaluated on ``log_density`` itself: they only depend on the order of the
    values, and ``exp`` is strictly increasing, so this is the same number without the ties that
    ``exp`` creates when it underflows to 0.  The baseline is resized to the image if its shape differs.

Everything is vectorised numpy: the AUCs bin the negatives against the (few) distinct fixated
values with ``searchsorted``/``bincount``, so one 480x640 image costs a few milliseconds per metric;
the Gaussian blur of the empirical map dominates for large sigma.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from students.base import EPS

#: the regularisation constant of the MIT benchmark's KLdiv.m (Matlab's ``eps``, rounded)
KL_EPS = EPS

METRICS = ("auc_judd", "auc_borji", "sauc", "nss", "cc", "kl_div", "sim", "ig")
#: AUC-Borji's random draws of negatives per image (the MIT benchmark's Nsplits)
BORJI_SPLITS = 100


# --------------------------------------------------------------------------------------------
# input handling


def _as_map(a, name: str = "saliency_map", *, infinite: bool = False) -> np.ndarray:
    """``a`` as a float64 map; NaN is refused, and so is ±inf unless ``infinite`` (log densities, where -inf is a
    zero density, and the rank-based AUC-Judd and sAUC, where ±inf ranks): NSS, CC, SIM, KL and AUC-Borji would
    standardise or threshold it into a plausible score (pysaliency's NSS and CC give NaN)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-d array, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    if not infinite and np.isinf(a).any():
        raise ValueError(f"{name} contains inf")
    return a


def _as_fixations(ys, xs, shape: tuple[int, int], name: str = "fixations") -> tuple[np.ndarray, np.ndarray]:
    ys = np.asarray(ys)
    xs = np.asarray(xs)
    if ys.ndim != 1 or xs.ndim != 1 or ys.shape != xs.shape:
        raise ValueError(f"{name}: ys and xs must be 1-d of equal length, got {ys.shape} and {xs.shape}")
    if ys.size and not (np.issubdtype(ys.dtype, np.integer) and np.issubdtype(xs.dtype, np.integer)):
        if not (np.array_equal(ys, np.round(ys)) and np.array_equal(xs, np.round(xs))):
            raise ValueError(f"{name}: coordinates must be integer pixel indices")
    ys = ys.astype(np.intp, copy=False)
    xs = xs.astype(np.intp, copy=False)
    h, w = shape
    if ys.size and (ys.min() < 0 or xs.min() < 0 or ys.max() >= h or xs.max() >= w):
        raise ValueError(f"{name}: coordinates outside the {h}x{w} image")
    return ys, xs


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")


def _to_density(a: np.ndarray) -> np.ndarray:
    """pysaliency's ``convert_saliency_map_to_density(minimum_value=0)``."""
    lo = a.min()
    if lo < 0:
        a = a - lo
    total = a.sum()
    if total:
        return a / total
    return np.full(a.shape, 1.0 / a.size)


def _logsumexp(a: np.ndarray) -> float:
    m = np.max(a)
    if not np.isfinite(m):
        return float(m)
    return float(m + np.log(np.exp(a - m).sum()))


def _normalised_log(log_density, name: str) -> np.ndarray:
    ld = _as_map(log_density, name, infinite=True)
    if np.isposinf(ld).any():
        raise ValueError(f"{name} contains +inf")
    z = _logsumexp(ld)
    if not np.isfinite(z):
        raise ValueError(f"{name} has no mass (all -inf)")
    return ld - z


# --------------------------------------------------------------------------------------------
# ROC areas


def _auc_fixation_thresholds(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Area of pysaliency's ``general_roc(positives, negatives, judd=1)``.

    Thresholds: one above everything, every positive value, one below everything; a value is
    "above" threshold t when it is >= t.  Repeated thresholds only add zero-width segments, so
    the distinct positive values suffice.
    """
    m, n = positives.size, negatives.size
    thr = np.unique(positives)  # ascending
    pos_ge = m - np.searchsorted(np.sort(positives), thr, side="left")  # positives >= thr[j]
    # k = number of thresholds <= value, so a negative is >= thr[j] iff k >= j + 1
    k = np.searchsorted(thr, negatives, side="right")
    suffix = np.cumsum(np.bincount(k, minlength=thr.size + 1)[::-1])[::-1]
    neg_ge = suffix[1:]
    # points from the highest threshold down: (0,0) start, (0,0) for the value above all,
    # one point per distinct fixated value, (1,1) for the value below all
    tpr = np.concatenate(([0.0, 0.0], pos_ge[::-1] / m, [1.0]))
    fpr = np.concatenate(([0.0, 0.0], neg_ge[::-1] / n, [1.0]))
    return float(np.trapezoid(tpr, fpr))  # (numpy >= 2.0, the floor)


def _auc_all_thresholds(positives: np.ndarray, negatives: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area of pysaliency's ``general_roc(positives, negatives, judd=0)``.

    With every value a threshold, the trapezoid area is the Mann-Whitney statistic with ties
    counted half: mean over (pos, neg) pairs of [pos > neg] + 0.5 [pos == neg]. ``weights``: how many
    times each negative counts (whole numbers: the same sums, so the same area, as the negatives repeated).
    """
    m = positives.size
    n = negatives.size if weights is None else float(weights.sum())
    vals, counts = np.unique(positives, return_counts=True)
    left = np.searchsorted(vals, negatives, side="left")  # distinct positive values < neg
    tied = vals.take(left, mode="clip") == negatives  # neg == vals[left] (past the end: the last, below neg)
    right = left + tied  # distinct positive values <= neg
    # neg < vals[j]  iff  right <= j
    below = np.cumsum(np.bincount(right, weights=weights, minlength=vals.size + 1))[: vals.size]
    equal = np.bincount(left[tied], weights=None if weights is None else weights[tied], minlength=vals.size)[
        : vals.size]
    score = (counts * (below + 0.5 * equal)).sum()
    return float(score / (m * n))


def auc_judd(saliency_map: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> float:
    """AUC-Judd: fixated values vs. unfixated pixels, fixated values as thresholds.

    NaN if there are no fixations or no unfixated pixels.
    """
    s = _as_map(saliency_map, infinite=True)
    ys, xs = _as_fixations(ys, xs, s.shape)
    if ys.size == 0:
        return float("nan")
    fixated = np.zeros(s.shape, dtype=bool)
    fixated[ys, xs] = True
    negatives = s[~fixated]
    if negatives.size == 0:
        return float("nan")
    return _auc_fixation_thresholds(s[ys, xs], negatives)


def auc_borji(saliency_map, ys, xs, *, splits: int = BORJI_SPLITS, step: float = 0.1, seed: int = 0) -> float:
    """AUC-Borji (the MIT benchmark's ``AUC_Borji.m``): the map normalised to [0, 1]; fixated pixels (each
    once) vs. as many pixels drawn uniformly from the whole image, with replacement, in each of ``splits``
    draws; thresholds every ``step`` from 0 to the largest value in play; the mean area. Random, so seeded:
    the same inputs give the same number. 0.5 for a constant map; NaN if there are no fixations.
    """
    s = _as_map(saliency_map)
    ys, xs = _as_fixations(ys, xs, s.shape)
    if ys.size == 0:
        return float("nan")
    if _constant(s):
        return 0.5
    s = (s - s.min()) / (s.max() - s.min())
    fixated = np.zeros(s.shape, dtype=bool)
    fixated[ys, xs] = True
    positives = s[fixated]
    n = positives.size
    negatives = s.ravel()[np.random.default_rng(seed).integers(0, s.size, size=(splits, n))]
    # one grid of thresholds for every split: those above a split's largest value add (0, 0) points, no area
    top = max(float(positives.max()), float(negatives.max()))
    thresholds = step * np.arange(int(np.floor(top / step + 1e-9)), -1, -1)  # descending, 0 last
    tpr = (positives[None, :] >= thresholds[:, None]).mean(axis=1)
    fpr = (negatives[:, None, :] >= thresholds[None, :, None]).mean(axis=2)  # (splits, thresholds)
    tpr = np.concatenate(([0.0], tpr, [1.0]))
    fpr = np.concatenate((np.zeros((splits, 1)), fpr, np.ones((splits, 1))), axis=1)
    return float(np.trapezoid(np.broadcast_to(tpr, fpr.shape), fpr, axis=1).mean())


def shuffled_auc(saliency_map, ys, xs, other_ys, other_xs) -> float:
    """Shuffled AUC: fixated values vs. values at other images' fixations (in this image's pixels).

    NaN if either set is empty.
    """
    s = _as_map(saliency_map, infinite=True)
    ys, xs = _as_fixations(ys, xs, s.shape)
    oys, oxs = _as_fixations(other_ys, other_xs, s.shape, "other fixations")
    if ys.size == 0 or oys.size == 0:
        return float("nan")
    return _auc_all_thresholds(s[ys, xs], s[oys, oxs])


def shuffled_auc_counts(saliency_map, ys, xs, other_counts) -> float:
    """:func:`shuffled_auc` with the other images' fixations given as how many fall on each pixel (an
    integer map of the map's shape): the same area, in time of the map's size rather than of every fixation of
    the dataset (counted once per map size, :func:`pipeline.score.evaluate.evaluate_fixations`)."""
    s = _as_map(saliency_map, infinite=True)
    ys, xs = _as_fixations(ys, xs, s.shape)
    counts = np.asarray(other_counts)
    if counts.shape != s.shape:
        raise ValueError(f"other_counts is {counts.shape}, the map {s.shape}")
    if counts.dtype.kind not in "iu" or (counts.size and counts.min() < 0):
        raise ValueError("other_counts must be counts: whole numbers, none below 0")
    cells = np.flatnonzero(counts)
    if ys.size == 0 or cells.size == 0:
        return float("nan")
    return _auc_all_thresholds(s[ys, xs], s.ravel()[cells], counts.ravel()[cells].astype(np.float64))


# --------------------------------------------------------------------------------------------
# NSS, CC, KL, SIM


def _constant(a: np.ndarray) -> bool:
    """Constant up to rounding: a uniform density computed as exp(log) differs by an ulp here and there,
    which must not turn into a standardised map of +-1."""
    return float(np.ptp(a)) <= 16 * np.finfo(np.float64).eps * float(np.abs(a).max())


def nss(saliency_map, ys, xs) -> float:
    """Normalised scanpath saliency: mean of the standardised map (ddof=0) at the fixations."""
    s = _as_map(saliency_map)
    ys, xs = _as_fixations(ys, xs, s.shape)
    if ys.size == 0:
        return float("nan")
    if _constant(s):
        return 0.0
    return float(((s[ys, xs] - s.mean()) / s.std()).mean())


def expected_nss(saliency_map, density) -> float:
    """NSS expected under fixations drawn from ``density`` (a map summing to 1): Σ density · standardised map;
    0.0 for a constant map, as :func:`nss` (its standard deviation is rounding, not spread)."""
    s = _as_map(saliency_map)
    if _constant(s):
        return 0.0
    return float((np.asarray(density, np.float64) * (s - s.mean()) / s.std()).sum())


def cc(map_a, map_b) -> float:
    """Pearson correlation of two maps; 0.0 if exactly one is constant, NaN if both are."""
    a = _as_map(map_a, "map_a")
    b = _as_map(map_b, "map_b")
    _same_shape(a, b)
    if _constant(a) or _constant(b):
        return float("nan") if _constant(a) and _constant(b) else 0.0
    a = a - a.mean()
    b = b - b.mean()
    na = np.sqrt((a * a).sum())
    nb = np.sqrt((b * b).sum())
    r = float((a * b).sum() / (na * nb))
    return min(1.0, max(-1.0, r))


def kl_div(pred_map, gt_map) -> float:
    """Image-based KL(gt || pred) as in the MIT benchmark (both maps normalised to sum 1)."""
    p = _as_map(pred_map, "pred_map")
    g = _as_map(gt_map, "gt_map")
    _same_shape(p, g)
    p = _to_density(p)
    g = _to_density(g)
    return float((g * np.log(KL_EPS + g / (p + KL_EPS))).sum())


def sim(map_a, map_b) -> float:
    """Similarity (histogram intersection) of the two maps normalised to sum 1."""
    a = _as_map(map_a, "map_a")
    b = _as_map(map_b, "map_b")
    _same_shape(a, b)
    return float(np.minimum(_to_density(a), _to_density(b)).sum())


# --------------------------------------------------------------------------------------------
# information gain, empirical maps, centre bias


def information_gain(log_density, baseline_log_density, ys, xs) -> float:
    """Bits per fixation of the model over the baseline (both renormalised over the image)."""
    ld = _normalised_log(log_density, "log_density")
    base = _normalised_log(baseline_log_density, "baseline_log_density")
    _same_shape(ld, base)
    ys, xs = _as_fixations(ys, xs, ld.shape)
    if ys.size == 0:
        return float("nan")
    return float(((ld[ys, xs] - base[ys, xs]) / np.log(2.0)).mean())


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with ``sigma`` in pixels (kernel truncated at 4 sigma, borders reflected); 0: none."""
    if sigma <= 0:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)


def empirical_saliency_map(ys, xs, shape, sigma) -> np.ndarray:
    """Fixations -> density: counts per pixel, Gaussian blur (sigma in pixels), sum 1."""
    h, w = (int(v) for v in shape)
    ys, xs = _as_fixations(ys, xs, (h, w))
    if ys.size == 0:
        raise ValueError("empirical_saliency_map needs at least one fixation")
    # the blur in float32 (4x faster than float64 in OpenCV; it dominates the cost of all 8 metrics)
    counts = np.bincount(ys * w + xs, minlength=h * w).astype(np.float32).reshape(h, w)
    smap = np.maximum(gaussian_blur(counts, sigma), 0.0).astype(np.float64)
    return smap / smap.sum()


def rescale_fixations(ys, xs, from_shape, to_shape) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel indices of an image of ``from_shape`` to one of ``to_shape`` (pixel centres)."""
    (h0, w0), (h1, w1) = from_shape, to_shape
    ys, xs = _as_fixations(ys, xs, (h0, w0))
    new_ys = np.minimum(np.floor((ys + 0.5) * (h1 / h0)).astype(np.intp), h1 - 1)
    new_xs = np.minimum(np.floor((xs + 0.5) * (w1 / w0)).astype(np.intp), w1 - 1)
    return new_ys, new_xs


class CenterBias:
    """Pooled centre bias on a ``shape`` grid: ``fixations`` holds ``(ys, xs, (h, w))`` per image; each image's
    fixations are rescaled to the grid, counted, blurred with ``sigma`` grid pixels, normalised and mixed with
    a uniform density of weight ``regularization`` so that the log is finite everywhere.

    :meth:`log_density` pools every image's; ``without=i`` leaves image ``i``'s own out, which is the baseline
    to score image ``i`` against: a baseline that holds the fixations it is scored on favours itself (on 20
    images of 5 fixations drawn from a known density, that density scored -1.07 bits over the pooled baseline,
    +1.01 over the one without the image's own).
    """

    def __init__(self, fixations: Iterable[tuple[Sequence[int], Sequence[int], tuple[int, int]]],
                 shape: tuple[int, int] = (64, 64), sigma: float = 2.0, regularization: float = 1e-5):
        if not 0 <= regularization < 1:
            raise ValueError("regularization must be in [0, 1)")
        self.shape = tuple(int(v) for v in shape)
        self.sigma, self.regularization = sigma, regularization
        gh, gw = self.shape
        self.cells = []  # each image's fixations as grid cells
        for ys, xs, size in fixations:
            gys, gxs = rescale_fixations(ys, xs, size, (gh, gw))
            self.cells.append(gys * gw + gxs)
        self.counts = np.bincount(np.concatenate(self.cells) if self.cells else np.zeros(0, np.intp),
                                  minlength=gh * gw).astype(np.float64)

    def log_density(self, without: int | None = None) -> np.ndarray:
        """The log density on the grid (sums to 1 in probability), of every image's fixations but ``without``'s;
        ValueError when none are left."""
        counts = self.counts
        if without is not None:
            counts = counts - np.bincount(self.cells[without], minlength=counts.size)
        if not counts.any():
            raise ValueError("centerbias_log_density needs at least one fixation"
                             + ("" if without is None else " of another image"))
        density = np.maximum(gaussian_blur(counts.reshape(self.shape), self.sigma), 0.0)
        density = (1.0 - self.regularization) * density / density.sum() + self.regularization / density.size
        with np.errstate(divide="ignore"):
            return np.log(density)


def centerbias_log_density(
    fixations: Iterable[tuple[Sequence[int], Sequence[int], tuple[int, int]]],
    shape: tuple[int, int] = (64, 64),
    sigma: float = 2.0,
    regularization: float = 1e-5,
) -> np.ndarray:
    """:class:`CenterBias` of every image's fixations, as a log density on the grid."""
    return CenterBias(fixations, shape, sigma, regularization).log_density()


def resize_log_density(log_density, shape) -> np.ndarray:
    """Bilinearly resize a log density to ``shape`` (h, w) and renormalise it to sum 1 (the log is interpolated,
    as pysaliency resizes a baseline; a model's maps are resized by their density instead:
    :func:`pipeline.common.maps.resize_label`)."""
    ld = _as_map(log_density, "log_density", infinite=True)
    h, w = (int(v) for v in shape)
    if np.isposinf(ld).any():
        raise ValueError("log_density contains +inf")
    finite = np.isfinite(ld)
    if not finite.any():
        raise ValueError("log_density has no mass (all -inf)")
    if not finite.all():  # -inf would make NaNs in the interpolation: use a negligible value
        ld = np.where(finite, ld, ld[finite].min() - 700.0)
    if ld.shape != (h, w):
        ld = cv2.resize(ld, (w, h), interpolation=cv2.INTER_LINEAR)
    return ld - _logsumexp(ld)


# --------------------------------------------------------------------------------------------
# all metrics of one image


def image_metrics(log_density, ys, xs, *, other_counts, baseline_log_density, sigma) -> dict[str, float]:
    """The eight metrics of :data:`METRICS` for one image (see the module docstring); shuffled AUC's negatives
    are the other images' fixations counted per pixel of this map (``other_counts``: :func:`shuffled_auc_counts`)."""
    ld = _as_map(log_density, "log_density", infinite=True)
    ys, xs = _as_fixations(ys, xs, ld.shape)
    if ys.size == 0:
        return {k: float("nan") for k in METRICS}
    base = np.asarray(baseline_log_density, dtype=np.float64)
    if base.shape != ld.shape:
        base = resize_log_density(base, ld.shape)
    smap = np.exp(_normalised_log(ld, "log_density"))  # exp(log_density), renormalised
    empirical = empirical_saliency_map(ys, xs, ld.shape, sigma)
    return {
        "auc_judd": auc_judd(ld, ys, xs),
        "auc_borji": auc_borji(smap, ys, xs),
        "sauc": shuffled_auc_counts(ld, ys, xs, other_counts),
        "nss": nss(smap, ys, xs),
        "cc": cc(smap, empirical),
        "kl_div": kl_div(smap, empirical),
        "sim": sim(smap, empirical),
        "ig": information_gain(ld, base, ys, xs),
    }
