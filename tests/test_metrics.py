"""Saliency metrics: hand-computed values on tiny maps, plain reference implementations, sanity checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.score.metrics import (
    BORJI_SPLITS,
    KL_EPS,
    METRICS,
    auc_borji,
    auc_judd,
    cc,
    centerbias_log_density,
    empirical_saliency_map,
    image_metrics,
    information_gain,
    kl_div,
    nss,
    rescale_fixations,
    resize_log_density,
    shuffled_auc,
    shuffled_auc_counts,
    sim,
)

# A 2x3 map without ties:
#   [[1, 2, 3],
#    [4, 5, 6]]
RAMP = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
# its mean is 3.5, its population variance (6.25+2.25+0.25+0.25+2.25+6.25)/6 = 35/12
RAMP_STD = math.sqrt(35 / 12)

# A 3x3 map with ties between fixated and unfixated pixels:
#   [[0, 0, 0],
#    [0, 1, 1],
#    [0, 1, 2]]
STEPS = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 2.0]])


def _area(points):
    """Trapezoid area under (fpr, tpr) points, written out."""
    total = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        total += (x1 - x0) * (y0 + y1) / 2
    return total


def ref_roc(positives, negatives, judd):
    """pysaliency's general_roc, one threshold at a time."""
    positives = [float(v) for v in positives]
    negatives = [float(v) for v in negatives]
    if judd:
        top = max(max(positives), max(negatives)) + 1
        bottom = min(min(positives), min(negatives))
        thresholds = [top] + sorted(positives, reverse=True) + [bottom]
    else:
        thresholds = sorted(positives + negatives, reverse=True)
    points = [(0.0, 0.0)]
    for t in thresholds:
        tpr = sum(p >= t for p in positives) / len(positives)
        fpr = sum(n >= t for n in negatives) / len(negatives)
        points.append((fpr, tpr))
    return _area(points)


# --------------------------------------------------------------------------------------------
# AUC-Judd


def test_auc_judd_hand_computed_uses_unfixated_pixels_as_negatives():
    # fixations at (1,2) -> 6 and (0,0) -> 1; negatives = unfixated {2, 3, 4, 5}
    # thresholds 7, 6, 1, 1: points (0,0) (0,0) (0,1/2) (1,1) (1,1)
    # area = 1 * (1/2 + 1) / 2 = 0.75
    assert auc_judd(RAMP, [1, 0], [2, 0]) == pytest.approx(0.75, abs=1e-12)
    # with all six pixels as negatives it would be (0,1/2) at FPR 1/6: 1/24 + 15/24 = 2/3
    assert auc_judd(RAMP, [1, 0], [2, 0]) != pytest.approx(2 / 3, abs=1e-3)


def test_auc_judd_ties_between_fixated_and_unfixated_values():
    # fixations on the corners (0,0) -> 0 and (2,2) -> 2, and the centre (1,1) -> 1
    # negatives (unfixated): four 0s, two 1s  (n = 6)
    # threshold 3: (0,0); 2: TPR 1/3, FPR 0; 1: TPR 2/3, FPR 2/6 (tied 1s count as above);
    # 0: (1,1)
    # area = (1/3)(1/3 + 2/3)/2 + (2/3)(2/3 + 1)/2 = 1/6 + 5/9 = 13/18
    assert auc_judd(STEPS, [0, 1, 2], [0, 1, 2]) == pytest.approx(13 / 18, abs=1e-12)


def test_auc_judd_duplicate_fixations_count_twice():
    # as above with (1,1) fixated twice: positives {2, 1, 1, 0}, negatives unchanged
    # threshold 2: (0, 1/4); 1: (1/3, 3/4); 0: (1, 1)
    # area = (1/3)(1/4 + 3/4)/2 + (2/3)(3/4 + 1)/2 = 1/6 + 7/12 = 3/4
    assert auc_judd(STEPS, [0, 1, 1, 2], [0, 1, 1, 2]) == pytest.approx(0.75, abs=1e-12)


def test_auc_judd_constant_map_is_one_half():
    # one threshold at the constant: everything jumps from (0,0) to (1,1) -> 0.5
    # (pysaliency with jitter=False gives exactly this; with its default jitter, ~0.5 at random)
    assert auc_judd(np.full((3, 4), 7.0), [0, 2, 1], [0, 3, 1]) == 0.5


def test_auc_judd_perfect_and_inverted_maps():
    smap = np.zeros((4, 5))
    smap[0, 4] = smap[3, 0] = 1.0  # the two fixated border pixels are the only salient ones
    assert auc_judd(smap, [0, 3], [4, 0]) == 1.0
    # fixations at the two lowest pixels of RAMP, (0,0) -> 1 and (0,1) -> 2; negatives {3,4,5,6}
    # threshold 7: (0,0); 2: TPR 1/2, FPR 1; 1: (1,1)  ->  area 1 * (0 + 1/2) / 2 = 1/4
    # (not 0: AUC-Judd only has fixated values as thresholds and interpolates linearly)
    assert auc_judd(RAMP, [0, 0], [0, 1]) == pytest.approx(0.25, abs=1e-12)
    # hence the inverted perfect map, fixated pixels all at the minimum, scores 0.5: one
    # straight segment from (0,0) to (1,1)
    assert auc_judd(1.0 - smap, [0, 3], [4, 0]) == 0.5


def test_auc_judd_undefined_cases_are_nan():
    assert math.isnan(auc_judd(RAMP, [], []))
    every = np.indices(RAMP.shape).reshape(2, -1)
    assert math.isnan(auc_judd(RAMP, every[0], every[1]))  # no unfixated pixel left


@pytest.mark.parametrize("levels", [None, 4])
def test_auc_judd_matches_threshold_loop_on_random_maps(levels):
    rng = np.random.default_rng(0 if levels is None else 1)
    for _ in range(40):
        h, w = rng.integers(3, 12, size=2)
        smap = rng.random((h, w))
        if levels:
            smap = np.floor(smap * levels)  # many ties
        n = rng.integers(1, 12)
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)  # duplicates happen
        fixated = np.zeros((h, w), bool)
        fixated[ys, xs] = True
        if fixated.all():
            continue
        expected = ref_roc(smap[ys, xs], smap[~fixated], judd=True)
        assert auc_judd(smap, ys, xs) == pytest.approx(expected, abs=1e-12)


def test_auc_judd_invariant_to_monotone_transform():
    rng = np.random.default_rng(5)
    smap = rng.random((20, 30))
    ys, xs = rng.integers(0, 20, 15), rng.integers(0, 30, 15)
    assert auc_judd(np.log(smap), ys, xs) == pytest.approx(auc_judd(smap, ys, xs), abs=1e-12)


def test_fixations_outside_the_image_are_rejected():
    with pytest.raises(ValueError):
        auc_judd(RAMP, [-1], [0])  # would silently wrap around with numpy indexing
    with pytest.raises(ValueError):
        nss(RAMP, [0], [3])
    with pytest.raises(ValueError):
        nss(RAMP, [0, 1], [0])


# --------------------------------------------------------------------------------------------
# AUC-Borji


def ref_auc_borji(smap, ys, xs, draws, step=0.1):
    """The MIT benchmark's AUC_Borji.m, line by line, on given draws (pixel indices, one row per split)."""
    s = (smap - smap.min()) / (smap.max() - smap.min())  # mat2gray
    flat, fixation_map = s.ravel(), np.zeros(s.shape, bool)
    fixation_map[ys, xs] = True
    sth = [float(v) for v in flat[fixation_map.ravel()]]  # S(F>0): each fixated pixel once
    areas = []
    for row in draws:
        curfix = [float(flat[r]) for r in row]
        top, thresholds = max(sth + curfix), []
        k = 0
        while k * step <= top + 1e-12:  # 0:stepSize:max
            thresholds.append(k * step)
            k += 1
        points = [(0.0, 0.0)]
        for t in reversed(thresholds):  # fliplr
            points.append((sum(v >= t for v in curfix) / len(sth), sum(v >= t for v in sth) / len(sth)))
        points.append((1.0, 1.0))
        areas.append(_area(points))
    return sum(areas) / len(areas)


def test_auc_borji_is_the_mit_benchmarks_loop_on_its_own_draws():
    rng = np.random.default_rng(4)
    for levels in (None, 5):
        for _ in range(15):
            h, w = rng.integers(3, 12, size=2)
            smap = rng.random((h, w)) * 7 - 2
            if levels:
                smap = np.floor(smap * levels)
            n = int(rng.integers(1, 12))
            ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
            fixated = np.zeros((h, w), bool)
            fixated[ys, xs] = True
            draws = np.random.default_rng(0).integers(0, h * w, size=(BORJI_SPLITS, int(fixated.sum())))
            assert auc_borji(smap, ys, xs) == pytest.approx(ref_auc_borji(smap, ys, xs, draws), abs=1e-12)


def test_auc_borji_sanity():
    rng = np.random.default_rng(5)
    ys, xs = rng.integers(0, 40, 25), rng.integers(0, 60, 25)
    peaks = np.zeros((40, 60))
    peaks[ys, xs] = 1.0
    assert auc_borji(peaks, ys, xs) > 0.95  # only the draws that hit a fixated pixel count against it
    assert auc_borji(1 - peaks, ys, xs) < 0.1
    noise = rng.random((40, 60))
    assert 0.35 < auc_borji(noise, ys, xs) < 0.65
    assert auc_borji(noise, ys, xs) == auc_borji(noise, ys, xs)  # seeded
    assert auc_borji(noise, [*ys, ys[0]], [*xs, xs[0]]) == auc_borji(noise, ys, xs)  # a pixel counts once
    assert auc_borji(np.full((4, 4), 3.0), [1], [2]) == 0.5
    assert math.isnan(auc_borji(noise, [], []))


# --------------------------------------------------------------------------------------------
# shuffled AUC


def test_shuffled_auc_hand_computed_with_ties():
    # positives: (1,2) -> 6, (1,1) -> 5; negatives: (0,1) -> 2, (1,2) -> 6, (0,0) -> 1, (1,0) -> 4
    # 6 beats 2, 1, 4 and ties 6: 3.5;  5 beats 2, 1, 4: 3   ->  (3.5 + 3) / (2 * 4) = 0.8125
    # (general_roc: (0,0) (1/4,1/2) (1/4,1) ... (1,1): 1/4 * 1/4 + 3/4 * 1 = 0.8125)
    assert shuffled_auc(RAMP, [1, 1], [2, 1], [0, 1, 0, 1], [1, 2, 0, 0]) == pytest.approx(0.8125, abs=1e-12)


def test_shuffled_auc_centre_bias_map_is_chance_when_others_look_at_the_centre_too():
    # a map that only says "centre" gets no credit if the other images' fixations are central too
    yy, xx = np.mgrid[0:9, 0:9]
    centre = -((yy - 4.0) ** 2 + (xx - 4.0) ** 2)
    ys, xs = np.array([4, 3, 5]), np.array([4, 5, 3])
    assert shuffled_auc(centre, ys, xs, ys, xs) == 0.5
    assert auc_judd(centre, ys, xs) > 0.9  # while AUC-Judd rewards it


def test_shuffled_auc_counts_are_whole_numbers_none_negative():
    for counts in ([[2, -1], [0, 0]], [[0.5, 1.0], [0.0, 0.0]]):
        with pytest.raises(ValueError, match="must be counts"):
            shuffled_auc_counts(np.eye(2), [0], [0], np.array(counts))
    assert math.isnan(shuffled_auc_counts(np.eye(2), [0], [0], np.zeros((2, 2), int)))  # (no negatives)


def test_shuffled_auc_constant_map_and_empty_sets():
    assert shuffled_auc(np.ones((2, 3)), [0, 1], [0, 2], [1, 0, 0], [1, 1, 2]) == 0.5
    assert math.isnan(shuffled_auc(RAMP, [0], [0], [], []))
    assert math.isnan(shuffled_auc(RAMP, [], [], [0], [0]))


@pytest.mark.parametrize("levels", [None, 3])
def test_shuffled_auc_matches_threshold_loop_on_random_maps(levels):
    rng = np.random.default_rng(2 if levels is None else 3)
    for _ in range(40):
        h, w = rng.integers(2, 10, size=2)
        smap = rng.random((h, w))
        if levels:
            smap = np.floor(smap * levels)
        n, k = rng.integers(1, 10), rng.integers(1, 25)
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        oys, oxs = rng.integers(0, h, k), rng.integers(0, w, k)
        expected = ref_roc(smap[ys, xs], smap[oys, oxs], judd=False)
        assert shuffled_auc(smap, ys, xs, oys, oxs) == pytest.approx(expected, abs=1e-12)
        counts = np.bincount(oys * w + oxs, minlength=h * w).reshape(h, w)  # (as eval counts them, per pixel)
        assert shuffled_auc_counts(smap, ys, xs, counts) == shuffled_auc(smap, ys, xs, oys, oxs)


# --------------------------------------------------------------------------------------------
# NSS


def test_nss_hand_computed_uses_population_std():
    # fixations on the last column: (0,2) -> 3 and (1,2) -> 6; mean value 4.5
    # NSS = (4.5 - 3.5) / sqrt(35/12) = 0.58554...  (ddof=1 would give 1/sqrt(3.5) = 0.5345)
    assert nss(RAMP, [0, 1], [2, 2]) == pytest.approx(1 / RAMP_STD, abs=1e-12)


def test_nss_duplicate_fixations_and_corners():
    # (1,2) twice and (0,0): standardised values 2.5, 2.5, -2.5 (over std) -> mean (2.5/3)/std
    assert nss(RAMP, [1, 1, 0], [2, 2, 0]) == pytest.approx((2.5 / 3) / RAMP_STD, abs=1e-12)
    # all four corners: values 1, 3, 4, 6 average 3.5 = the map mean -> 0
    assert nss(RAMP, [0, 0, 1, 1], [0, 2, 0, 2]) == pytest.approx(0.0, abs=1e-12)


def test_nss_constant_map_is_zero_and_scale_invariant():
    assert nss(np.full((3, 3), 2.5), [0, 2], [2, 0]) == 0.0
    assert nss(10 * RAMP + 3, [0, 1], [2, 2]) == pytest.approx(nss(RAMP, [0, 1], [2, 2]), abs=1e-12)
    assert math.isnan(nss(RAMP, [], []))


def test_expected_nss_of_a_uniform_density_is_zero_as_nss_is():
    """`eval --labels` of a model that says nothing (its density exp(log(1/N))) scored NSS ±1.0 on every image:
    the mean's rounding (5e-20 off every pixel here) was taken as the map's spread and standardised."""
    from pipeline.score.metrics import expected_nss

    uniform = np.exp(np.full((48, 64), np.log(1 / (48 * 64))))
    target = np.random.default_rng(0).random((48, 64))
    target /= target.sum()
    assert expected_nss(uniform, target) == 0.0
    # otherwise Σ density · standardised map: where the density is, the map's z-scores, weighted
    point = np.zeros((48, 64))
    point[3, 5] = 1.0
    half = np.zeros_like(RAMP)
    half[:, 0] = 0.5  # fixations at (0, 0) and (1, 0), equally likely
    assert expected_nss(10 * RAMP + 3, half) == pytest.approx(nss(RAMP, [0, 1], [0, 0]), abs=1e-12)
    assert expected_nss(target, point) == pytest.approx((target[3, 5] - target.mean()) / target.std(), abs=1e-12)


# --------------------------------------------------------------------------------------------
# CC, KL, SIM


def test_cc_hand_computed():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[2.0, 1.0], [4.0, 3.0]])
    # centred: a -> [-1.5, -0.5, 0.5, 1.5], b -> [-0.5, -1.5, 1.5, 0.5]
    # sum of products 0.75 + 0.75 + 0.75 + 0.75 = 3; sums of squares 5 and 5 -> 3/5
    assert cc(a, b) == pytest.approx(0.6, abs=1e-12)
    assert cc(a, 10 * b + 3) == pytest.approx(0.6, abs=1e-12)
    assert cc(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cc(a, a) == pytest.approx(1.0, abs=1e-12)


def test_cc_matches_numpy_corrcoef_on_random_maps():
    rng = np.random.default_rng(4)
    for _ in range(10):
        a, b = rng.random((2, 7, 9))
        assert cc(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-12)


def test_cc_constant_maps():
    const = np.full((2, 2), 3.0)
    varied = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert cc(const, varied) == 0.0  # as pysaliency
    assert cc(varied, const) == 0.0  # pysaliency: NaN here; we keep CC symmetric
    assert math.isnan(cc(const, const))


def test_kl_div_hand_computed_and_direction():
    pred = np.array([[1.0, 3.0]])  # -> [1/4, 3/4]
    gt = np.array([[1.0, 1.0]])  # -> [1/2, 1/2]
    # KL(gt || pred) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert kl_div(pred, gt) == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    # the other direction would be 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308
    assert kl_div(gt, pred) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)


def test_kl_div_zero_prediction_is_a_large_finite_penalty():
    # gt [1/2, 1/2], pred [0, 1]: 1/2 ln(eps + (1/2)/eps) + 1/2 ln(eps + (1/2)/(1 + eps))
    expected = 0.5 * math.log(KL_EPS + 0.5 / KL_EPS) + 0.5 * math.log(KL_EPS + 0.5 / (1 + KL_EPS))
    assert kl_div(np.array([[0.0, 1.0]]), np.array([[1.0, 1.0]])) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(17.3287, abs=1e-4)


def test_kl_div_identical_maps_and_constant_maps():
    rng = np.random.default_rng(6)
    m = rng.random((6, 8))
    assert kl_div(m, m) == pytest.approx(0.0, abs=1e-12)
    assert kl_div(5 * m, m) == pytest.approx(0.0, abs=1e-12)  # normalised first
    assert kl_div(np.ones((3, 3)), np.full((3, 3), 9.0)) == pytest.approx(0.0, abs=1e-12)


def test_sim_hand_computed():
    # [1/4, 3/4] vs [1/2, 1/2]: min 1/4 + 1/2 = 3/4
    assert sim(np.array([[1.0, 3.0]]), np.array([[1.0, 1.0]])) == pytest.approx(0.75, abs=1e-12)
    # a negative map is shifted by its minimum first: [-1, 1] -> [0, 2] -> [0, 1]; vs [1/2, 1/2]
    assert sim(np.array([[-1.0, 1.0]]), np.array([[1.0, 1.0]])) == pytest.approx(0.5, abs=1e-12)
    # disjoint support -> 0
    assert sim(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])) == 0.0


def test_sim_identical_and_all_zero_maps():
    m = np.random.default_rng(7).random((5, 5))
    assert sim(m, 3 * m) == pytest.approx(1.0, abs=1e-12)
    # an all-zero map is treated as uniform (pysaliency's convert_saliency_map_to_density)
    assert sim(np.zeros((2, 2)), np.ones((2, 2))) == pytest.approx(1.0, abs=1e-12)


def test_an_infinite_saliency_value_is_refused_not_scored_as_a_plausible_number():
    """pysaliency's NSS and CC give NaN on a map with inf; standardising or thresholding it here gave 0.0 and 0.5.
    (AUC-Judd ranks: an infinite value is the highest or lowest, as a log density's -inf is a zero density.)"""
    s = np.random.default_rng(8).random((5, 6))
    s[0, 0] = np.inf
    for score in (lambda m: nss(m, [1], [1]), lambda m: auc_borji(m, [1], [1]), lambda m: cc(m, np.ones((5, 6))),
                  lambda m: sim(np.ones((5, 6)), -m), lambda m: kl_div(m, np.ones((5, 6)))):
        with pytest.raises(ValueError, match="contains inf"):
            score(s)
    assert auc_judd(s, [0], [0]) == 1.0  # the fixated +inf above every other value


def test_map_metrics_reject_mismatched_shapes():
    for f in (cc, kl_div, sim):
        with pytest.raises(ValueError):
            f(np.ones((2, 3)), np.ones((3, 2)))


# --------------------------------------------------------------------------------------------
# information gain


UNIFORM_2x2 = np.log(np.full((2, 2), 0.25))
MODEL_2x2 = np.log(np.array([[0.5, 0.25], [0.125, 0.125]]))


def test_information_gain_hand_computed():
    # (0,0): log2(0.5/0.25) = 1;  (0,1): log2(0.25/0.25) = 0  -> 0.5 bit per fixation
    assert information_gain(MODEL_2x2, UNIFORM_2x2, [0, 0], [0, 1]) == pytest.approx(0.5, abs=1e-12)
    # (0,0) twice and (1,1): (1 + 1 + log2(0.125/0.25)) / 3 = (1 + 1 - 1) / 3
    assert information_gain(MODEL_2x2, UNIFORM_2x2, [0, 0, 1], [0, 0, 1]) == pytest.approx(1 / 3, abs=1e-12)
    # a model that puts less mass where people look loses information
    assert information_gain(MODEL_2x2, UNIFORM_2x2, [1], [1]) == pytest.approx(-1.0, abs=1e-12)


def test_information_gain_of_the_baseline_itself_is_zero():
    rng = np.random.default_rng(8)
    ld = np.log(rng.random((6, 7)))
    ld -= np.log(np.exp(ld).sum())
    assert information_gain(ld, ld, [0, 5, 3], [6, 0, 3]) == pytest.approx(0.0, abs=1e-12)


def test_information_gain_renormalises_both_densities():
    # an unnormalised model (off by a constant) must not gain information from the constant
    assert information_gain(MODEL_2x2 + 5.0, UNIFORM_2x2 - 2.0, [0, 0], [0, 1]) == pytest.approx(0.5, abs=1e-12)


def test_information_gain_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        information_gain(np.zeros((2, 3)), np.zeros((3, 2)), [0], [0])


# --------------------------------------------------------------------------------------------
# empirical saliency map, centre bias, resizing


def test_empirical_map_without_blur_is_the_fixation_histogram():
    # (0,0) twice and (1,2) once, no blur -> 2/3 at (0,0), 1/3 at (1,2)
    m = empirical_saliency_map([0, 0, 1], [0, 0, 2], (2, 3), sigma=0)
    np.testing.assert_allclose(m, [[2 / 3, 0, 0], [0, 0, 1 / 3]], atol=1e-15)


def test_empirical_map_is_a_centred_gaussian_summing_to_one():
    m = empirical_saliency_map([20], [30], (41, 61), sigma=3.0)
    assert m.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(np.argmax(m), m.shape) == (20, 30)
    np.testing.assert_allclose(m, m[::-1, ::-1], atol=1e-15)  # symmetric about the fixation
    # the blur really is Gaussian with that sigma: ratio one pixel off-centre = exp(-1/(2 sigma^2))
    assert m[20, 31] / m[20, 30] == pytest.approx(math.exp(-1 / 18), rel=1e-3)


def test_empirical_map_duplicate_fixation_weighs_double():
    m = empirical_saliency_map([10, 10, 10], [10, 10, 50], (21, 61), sigma=2.0)
    assert m[10, 10] == pytest.approx(2 * m[10, 50], rel=1e-12)


def test_empirical_map_border_fixation_keeps_its_full_mass():
    # a corner fixation and a central one, far apart: each holds half the mass
    # (with a zero-padded blur the corner one would keep only about a quarter of its Gaussian)
    m = empirical_saliency_map([0, 60], [0, 60], (80, 80), sigma=3.0)
    assert m[:30, :30].sum() == pytest.approx(0.5, abs=1e-6)


def test_rescale_fixations_maps_pixel_centres():
    ys, xs = rescale_fixations([0, 99, 50], [0, 199, 100], (100, 200), (64, 64))
    assert ys.tolist() == [0, 63, 32] and xs.tolist() == [0, 63, 32]
    ys, xs = rescale_fixations([0, 1, 2, 3], [0, 1, 2, 3], (4, 4), (2, 8))
    assert ys.tolist() == [0, 0, 1, 1]  # halving: pixels 0,1 -> 0 and 2,3 -> 1
    assert xs.tolist() == [1, 3, 5, 7]  # doubling: the centre of each 2-pixel block
    ys, xs = rescale_fixations([3, 0], [1, 4], (5, 5), (5, 5))
    assert ys.tolist() == [3, 0] and xs.tolist() == [1, 4]


def test_centerbias_pools_images_of_different_sizes_on_the_grid():
    fixations = [
        ([50], [100], (101, 201)),  # the centre pixel of each image
        ([240, 240], [320, 320], (480, 640)),
        ([0], [0], (30, 40)),  # and one corner
    ]
    cb = centerbias_log_density(fixations, shape=(64, 64), sigma=2.0)
    assert cb.shape == (64, 64)
    assert np.isfinite(cb).all()
    assert np.exp(cb).sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(np.argmax(cb), cb.shape) == (32, 32)
    # without blur: 3 of 4 fixations in the centre cell; the corner pixel of the 30x40 image,
    # centre (0.5/30, 0.5/40) of the image -> grid (1.07, 0.8) -> cell (1, 0)
    raw = np.exp(centerbias_log_density(fixations, shape=(64, 64), sigma=0, regularization=0.0))
    assert raw[32, 32] == pytest.approx(0.75, abs=1e-12) and raw[1, 0] == pytest.approx(0.25, abs=1e-12)
    # the uniform regularisation: weight r spread over the 4096 cells
    reg = np.exp(centerbias_log_density(fixations, shape=(64, 64), sigma=0, regularization=0.01))
    assert reg[5, 50] == pytest.approx(0.01 / 4096, rel=1e-12)
    assert reg[32, 32] == pytest.approx(0.99 * 0.75 + 0.01 / 4096, rel=1e-12)


def test_each_image_is_scored_against_a_centre_bias_that_holds_none_of_its_own_fixations():
    """The pooled centre bias held the fixations it was scored on: on 20 images of 5 fixations drawn from a known
    density, that very density scored -1.07 bits over it (an IG below 0 for the true model). Leaving the scored
    image out gives the centre bias of the others exactly; IG of the true density over it is then positive."""
    from pipeline.score.metrics import CenterBias

    fixations = [([50], [100], (101, 201)), ([240, 240], [320, 320], (480, 640)), ([0], [0], (30, 40))]
    bias = CenterBias(fixations)
    for i in range(3):
        others = [f for j, f in enumerate(fixations) if j != i]
        np.testing.assert_allclose(bias.log_density(without=i), centerbias_log_density(others), rtol=0, atol=1e-12)
    np.testing.assert_allclose(bias.log_density(), centerbias_log_density(fixations), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least one fixation of another image"):
        CenterBias([([1], [1], (8, 8)), ([], [], (8, 8))]).log_density(without=0)

    rng = np.random.default_rng(0)  # the audit's experiment: 20 images of 5 fixations from a Gaussian density
    h = w = 64
    yy, xx = np.mgrid[:h, :w]
    true = np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / (2 * 6.0 ** 2))
    true /= true.sum()
    images = []
    for _ in range(20):
        cells = rng.choice(h * w, size=5, p=true.ravel())
        images.append((cells // w, cells % w, (h, w)))
    bias, log_true = CenterBias(images), np.log(true)
    pooled = np.mean([information_gain(log_true, bias.log_density(), ys, xs) for ys, xs, _ in images])
    left_out = np.mean([information_gain(log_true, bias.log_density(without=i), ys, xs)
                        for i, (ys, xs, _) in enumerate(images)])
    assert pooled < 0 < left_out


def test_centerbias_needs_fixations():
    with pytest.raises(ValueError):
        centerbias_log_density([([], [], (10, 10))])


def test_resize_log_density_stays_normalised():
    uniform = np.full((64, 64), -math.log(64 * 64))
    out = resize_log_density(uniform, (48, 80))
    assert out.shape == (48, 80)
    np.testing.assert_allclose(out, -math.log(48 * 80), atol=1e-12)

    cb = centerbias_log_density([([10], [5], (64, 64))], shape=(64, 64), sigma=4.0)
    big = resize_log_density(cb, (480, 640))
    assert np.exp(big).sum() == pytest.approx(1.0, abs=1e-12)
    peak = np.unravel_index(np.argmax(big), big.shape)
    assert abs(peak[0] - 10.5 * 7.5) <= 8 and abs(peak[1] - 5.5 * 10) <= 10  # stays where it was
    np.testing.assert_allclose(resize_log_density(cb, (64, 64)), cb, atol=1e-12)


def test_resize_log_density_with_zero_mass_pixels_has_no_nans():
    with np.errstate(divide="ignore"):
        ld = np.log(np.array([[1.0, 0.0], [0.0, 0.0]]))  # -inf in three cells
    out = resize_log_density(ld, (6, 6))
    assert not np.isnan(out).any()
    assert np.exp(out).sum() == pytest.approx(1.0, abs=1e-12)
    assert np.exp(out[:2, :2]).sum() > 0.99


# --------------------------------------------------------------------------------------------
# image_metrics


def _gaussian_log_density(shape, cy, cx, s):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    ld = -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)
    return ld - np.log(np.exp(ld).sum())


def test_image_metrics_agrees_with_the_single_metrics():
    rng = np.random.default_rng(9)
    shape = (30, 40)
    ld = _gaussian_log_density(shape, 12, 25, 6.0) + 0.1 * rng.standard_normal(shape)
    ld -= np.log(np.exp(ld).sum())
    ys, xs = rng.integers(5, 20, 12), rng.integers(15, 35, 12)
    oys, oxs = rng.integers(0, 30, 50), rng.integers(0, 40, 50)
    base = centerbias_log_density([(ys, xs, shape), (oys, oxs, shape)], shape=(16, 16), sigma=1.0)
    counts = np.bincount(oys * shape[1] + oxs, minlength=shape[0] * shape[1]).reshape(shape)
    got = image_metrics(ld, ys, xs, other_counts=counts, baseline_log_density=base, sigma=2.0)
    assert tuple(got) == METRICS
    smap = np.exp(ld)
    emp = empirical_saliency_map(ys, xs, shape, 2.0)
    assert got["auc_judd"] == pytest.approx(auc_judd(smap, ys, xs), abs=1e-12)
    assert got["auc_borji"] == pytest.approx(auc_borji(smap, ys, xs), abs=1e-12)
    assert got["sauc"] == pytest.approx(shuffled_auc(smap, ys, xs, oys, oxs), abs=1e-12)
    assert got["nss"] == pytest.approx(nss(smap, ys, xs), abs=1e-9)
    assert got["cc"] == pytest.approx(cc(smap, emp), abs=1e-12)
    assert got["kl_div"] == pytest.approx(kl_div(smap, emp), abs=1e-12)
    assert got["sim"] == pytest.approx(sim(smap, emp), abs=1e-12)
    assert got["ig"] == pytest.approx(information_gain(ld, resize_log_density(base, shape), ys, xs), abs=1e-12)
    assert got["auc_judd"] > 0.5 and got["nss"] > 0 and got["cc"] > 0


def test_image_metrics_perfect_prediction():
    shape = (24, 32)
    ys, xs = np.array([3, 3, 12, 20, 0, 23]), np.array([4, 4, 16, 30, 31, 0])
    emp = empirical_saliency_map(ys, xs, shape, 2.5)
    with np.errstate(divide="ignore"):
        ld = np.log(emp)
    one = np.zeros(shape, np.int64)
    one[1, 1] = 1
    got = image_metrics(ld, ys, xs, other_counts=one, baseline_log_density=ld, sigma=2.5)
    assert got["cc"] == pytest.approx(1.0, abs=1e-12)
    assert got["kl_div"] == pytest.approx(0.0, abs=1e-12)
    assert got["sim"] == pytest.approx(1.0, abs=1e-12)
    assert got["ig"] == pytest.approx(0.0, abs=1e-12)  # the baseline is the model itself


def test_image_metrics_without_fixations_is_all_nan():
    one = np.zeros((4, 4), np.int64)
    one[0, 0] = 1
    got = image_metrics(np.zeros((4, 4)), [], [], other_counts=one, baseline_log_density=np.zeros((4, 4)), sigma=1.0)
    assert set(got) == set(METRICS) and all(math.isnan(v) for v in got.values())
