"""Scoring an unsupervised map (SACT's ponder map) as the SACT paper does on CAT2000: blur and centre weight
fitted on the first half of each category, all metrics on the other half."""

from __future__ import annotations

import numpy as np

from pipeline.score import calibrate
from pipeline.score.fixations import FixationSet


def fixation_set(paths: list[str], size=(40, 60), per_image=None) -> FixationSet:
    ys, xs, index = [], [], []
    for i, _ in enumerate(paths):
        pts = per_image(i) if per_image else [(size[0] // 2, size[1] // 2)]
        for y, x in pts:
            ys.append(y)
            xs.append(x)
            index.append(i)
    return FixationSet("toy", "/nonexistent", paths, np.tile(size, (len(paths), 1)), ys, xs, index)


def test_halves_take_the_first_half_of_each_category():
    paths = [f"Stimuli/{c}/{i:03d}.jpg" for c in ("Action", "Art") for i in range(1, 6)]
    calib, test = calibrate.halves(fixation_set(paths))
    assert calib == [0, 1, 5, 6] and test == [2, 3, 4, 7, 8, 9]
    calib, test = calibrate.halves(fixation_set(["a.jpg", "b.jpg", "c.jpg"]))  # no categories: first half
    assert calib == [0] and test == [1, 2]


def test_combine_normalises_the_blurred_map_and_mixes_the_centre():
    raw = np.zeros((40, 60), np.float32)
    raw[5, 5] = 7.0
    alone = calibrate.combine(raw, 0.0, 0.0)
    assert alone.max() == 1.0 and alone.min() == 0.0 and alone[5, 5] == 1.0
    blurred = calibrate.combine(raw, 0.05, 0.0)
    assert blurred.max() == 1.0 and (blurred > 0.1).sum() > 1  # spread by the blur
    centre = calibrate.combine(raw, 0.0, 1.0)
    assert np.unravel_index(centre.argmax(), centre.shape) in {(19, 29), (19, 30), (20, 29), (20, 30)}
    assert np.allclose(calibrate.combine(np.ones((4, 4)), 0.0, 0.5), 0.5 * calibrate.center_baseline((4, 4)))


def test_fit_prefers_the_centre_when_the_map_says_nothing_and_the_map_when_it_finds_the_fixations():
    rng = np.random.default_rng(0)
    centred = [(rng.random((40, 60)), (np.array([19, 20, 21]), np.array([29, 30, 31]))) for _ in range(4)]
    fit = calibrate.fit([r for r, _ in centred], [f for _, f in centred])
    assert fit.center_weight >= 0.5 and fit.auc_judd > 0.9

    corner = np.zeros((40, 60))
    corner[2:6, 2:6] = 1.0  # the map marks exactly where people looked, far from the centre
    fixations = (np.array([3, 4]), np.array([3, 4]))
    fit = calibrate.fit([corner] * 3, [fixations] * 3)
    assert fit.center_weight < 0.5 and fit.auc_judd > 0.95 and fit.images == 3


def test_an_unreadable_image_of_the_calibration_half_is_listed_and_left_out_of_the_fit(tmp_path):
    """It was a traceback (`eval --map ponder`); now it is a failure line like the scored half's, and the fit is
    made on the images that could be read."""
    import cv2

    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 60, 3), 60 * i, np.uint8))

    class Brightness:  # a predictor of the raw maps an extra map gives (any map will do here)
        name = "brightness"

        def raw_maps(self, rgbs):
            return [rgb.mean(axis=2).astype(np.float32) + 1.0 for rgb in rgbs]

    fs = fixation_set([f"{i}.png" for i in range(4)])
    fs = FixationSet("toy", str(tmp_path), fs.paths, fs.sizes, fs.ys, fs.xs, fs.image_index)
    (tmp_path / "0.png").unlink()
    result, fitted = calibrate.evaluate_calibrated(Brightness(), fs, progress=False)
    assert result.failures == [{"index": 0, "path": "0.png",
                                "reason": "file not found (calibration half: not in the fit)"}]
    assert fitted.images == 1 and len(result.per_image) == 2


def test_the_fit_reports_the_centre_baseline_alone_and_says_when_the_map_adds_nothing():
    """A map that says nothing, mixed with the centre, scores what the centre Gaussian alone scores, and the fit
    says so (`eval --map ponder` printed those scores as the ponder map's); the centre's own AUC-Judd is
    reported."""
    rng = np.random.default_rng(1)
    fixations = (np.array([19, 20, 21]), np.array([29, 30, 31]))
    flat = calibrate.fit([np.ones((40, 60))] * 3, [fixations] * 3)
    assert flat.center_only and flat.center_weight > 0 and flat.auc_judd == flat.center_auc_judd > 0.9
    corner = np.zeros((40, 60))
    corner[2:6, 2:6] = 1.0
    useful = calibrate.fit([corner + 0.01 * rng.random((40, 60))] * 2, [(np.array([3, 4]), np.array([3, 4]))] * 2)
    assert not useful.center_only and useful.auc_judd > useful.center_auc_judd
    # the grid's blur is applied once per width: the same fit as scoring each combination from scratch
    raws = [rng.random((40, 60)) for _ in range(3)]
    best = max(((b, w) for b in calibrate.BLUR_FRACS for w in calibrate.CENTER_WEIGHTS),
               key=lambda bw: np.mean([calibrate.metrics.auc_judd(calibrate.combine(r, *bw), *fixations)
                                       for r in raws]))
    fitted = calibrate.fit(raws, [fixations] * 3)
    assert (fitted.blur_frac, fitted.center_weight) == best
