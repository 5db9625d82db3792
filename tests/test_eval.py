"""`pipeline eval`, `predict`, `profile` and `teachers` on small real inputs, through the CLI.

Shared inputs (module-scoped, built once): a tiny MIT1003 tree from real skimage photos of
different sizes with fixations sampled deterministically around each photo's brightest region,
converted with `pipeline fixations mit1003`; a COCO tree labelled by the classic teacher in shards
of 2 at 64x96; and a one-step `pipeline train` run on those labels.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.score.fixations import read_hdf5
from tests.conftest import four_photo_coco, label_classic, photo, write_jpeg

METRIC_NAMES = ("auc_judd", "auc_borji", "sauc", "nss", "cc", "kl_div", "sim", "ig")
SHARD_METRIC_NAMES = ("cc", "kl_div", "sim", "nss")

#: MIT1003 stimuli: name → (skimage photo, long side); five different sizes, one grayscale
MIT_IMAGES = {
    "i_astronaut": ("astronaut", 96),
    "i_camera": ("camera", 104),
    "i_chelsea": ("chelsea", 112),
    "i_coffee": ("coffee", 120),
    "i_rocket": ("rocket", 128),
}


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def error_line(result) -> str:
    """The one `Error: …` line of a failed command (and no traceback)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def fixation_points(img: np.ndarray, seed: int) -> list[tuple[int, int]]:
    """Deterministic 'observers': most fixations near the photo's brightest (blurred) region, a few anywhere."""
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    h, w = gray.shape
    spread = 0.08 * max(h, w)
    py, px = np.unravel_index(np.argmax(cv2.GaussianBlur(gray.astype(np.float32), (0, 0), spread)), gray.shape)
    rng = np.random.default_rng(seed)
    ys = np.concatenate([rng.normal(py, spread, 24), rng.uniform(0, h, 4)])
    xs = np.concatenate([rng.normal(px, spread, 24), rng.uniform(0, w, 4)])
    ys = np.clip(np.rint(ys), 0, h - 1).astype(int)
    xs = np.clip(np.rint(xs), 0, w - 1).astype(int)
    return sorted(set(zip(ys.tolist(), xs.tolist())))


def make_mit1003(root: Path) -> dict[str, list[tuple[int, int]]]:
    (root / "ALLSTIMULI").mkdir(parents=True)
    (root / "ALLFIXATIONMAPS").mkdir()
    points = {}
    for k, (name, (which, long_side)) in enumerate(MIT_IMAGES.items()):
        img = photo(which, long_side)
        write_jpeg(root / "ALLSTIMULI" / f"{name}.jpeg", img)
        pts = fixation_points(img, seed=k)
        mask = np.zeros(img.shape[:2], np.uint8)
        for y, x in pts:
            mask[y, x] = 255
        assert cv2.imwrite(str(root / "ALLFIXATIONMAPS" / f"{name}_fixPts.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 100])
        points[name] = pts
    return points


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The inputs here are tiny: one intra-op thread is as fast, and on a busy 2-core machine OpenMP's
    spinning threads make a 30 ms forward pass take seconds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mit(tmp_path_factory):
    """(root, fixation HDF5, points written per image name)."""
    base = tmp_path_factory.mktemp("mit")
    root = base / "MIT1003"
    points = make_mit1003(root)
    h5 = base / "mit1003.h5"
    result = ok("fixations", "mit1003", "--root", root, "--out", h5)
    assert f"{len(MIT_IMAGES)} images" in result.output
    return root, h5, points


@pytest.fixture(scope="module")
def label_folder(tmp_path_factory) -> Path:
    """Four real photos labelled by the classic teacher at 64x96, two shards of two."""
    base = tmp_path_factory.mktemp("labels")
    folder = label_classic(four_photo_coco(base / "coco"), base / "out", "--shard-size", 2, "--image-size", "64x96",
                           "--device", "cpu")
    assert (folder / "labels.json").is_file()
    return folder


@pytest.fixture(scope="module")
def run_dir(label_folder, tmp_path_factory) -> Path:
    """A finished one-step `pipeline train` run on the label folder (held out: its last shard)."""
    run = tmp_path_factory.mktemp("train") / "run"
    ok("train", "--labels", label_folder, "--run", run, "--backbone-weights", "none", "--epochs", "1",
       "--steps-per-epoch", "1", "--batch-size", "2", "--workers", "0", "--shuffle-buffer", "0",
       "--device", "cpu", "--no-progress")
    assert (run / "checkpoints" / "latest.json").is_file()
    return run


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Three photos of different sizes, one in a subfolder, one a PNG."""
    folder = tmp_path_factory.mktemp("photos") / "imgs"
    (folder / "sub").mkdir(parents=True)
    write_jpeg(folder / "a.jpg", photo("astronaut", 80))
    write_jpeg(folder / "sub" / "b.jpg", photo("coffee", 100))
    assert cv2.imwrite(str(folder / "sub" / "c.png"), cv2.cvtColor(photo("chelsea", 90), cv2.COLOR_RGB2BGR))
    return folder


IMAGE_SIZES = {"a.jpg": photo("astronaut", 80).shape[:2], "sub/b.jpg": photo("coffee", 100).shape[:2],
               "sub/c.png": photo("chelsea", 90).shape[:2]}


# --------------------------------------------------------------------------------------------
# eval on fixations


def test_fixture_fixations_survive_the_conversion(mit):
    _, h5, points = mit
    fs = read_hdf5(h5)
    assert fs.names == sorted(MIT_IMAGES)
    assert len({tuple(s) for s in fs.sizes.tolist()}) == len(MIT_IMAGES)  # all sizes differ
    for i, name in enumerate(fs.names):
        ys, xs = fs.fixations(i)
        assert sorted(zip(ys.tolist(), xs.tolist())) == points[name]


def test_eval_classic_on_fixations_prints_and_writes_all_metrics(mit, tmp_path):
    _, h5, _ = mit
    fs = read_hdf5(h5)
    out = tmp_path / "eval" / "classic.json"
    with pytest.warns(UserWarning, match="baseline is the centre bias of mit1003's own fixations, here those of 5 "
                                         "images: so few give a coarse baseline"):
        result = ok("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--out", out,
                    "--no-progress")
    for m in METRIC_NAMES:
        assert any(line.split()[:1] == [m] for line in result.output.splitlines()), f"{m} not printed"
    assert "images scored  5" in result.output and "images failed  0" in result.output
    assert "baseline       centerbias (IG)" in result.output and "sigma          0.034 of the longer" in result.output

    doc = json.loads(out.read_text())  # what the scores depend on besides the model, to tell two files apart
    assert doc["settings"] == {"dataset": "mit1003", "split": None, "fixations": fs.n_fixations,
                               "baseline": "centerbias", "sigma_frac": 0.034, "ig_unit": "bits per fixation",
                               "file": str(h5)}
    assert set(doc["metrics"]) == set(METRIC_NAMES)
    assert doc["images"] == len(fs) and doc["failed"] == 0 and doc["failures"] == []
    rows = doc["per_image"]
    assert [r["path"] for r in rows] == fs.paths
    assert [r["fixations"] for r in rows] == [len(fs.fixations(i)[0]) for i in range(len(fs))]
    for r in rows:
        assert 0.0 <= r["auc_judd"] <= 1.0 and 0.0 <= r["sauc"] <= 1.0
        assert 0.0 <= r["sim"] <= 1.0 and -1.0 <= r["cc"] <= 1.0
        assert r["kl_div"] >= 0.0
        assert all(np.isfinite(r[m]) for m in METRIC_NAMES)
    for m in METRIC_NAMES:
        assert doc["metrics"][m] == pytest.approx(np.mean([r[m] for r in rows]))

    # --limit scores only the first N images
    limited = tmp_path / "limited.json"
    ok("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--limit", "2", "--out", limited,
       "--no-progress")
    assert [r["path"] for r in json.loads(limited.read_text())["per_image"]] == fs.paths[:2]


def test_baseline_changes_information_gain_only(mit, tmp_path):
    _, h5, _ = mit
    docs = {}
    for baseline in ("uniform", "centerbias"):
        out = tmp_path / f"{baseline}.json"
        ok("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--baseline", baseline,
           "--out", out, "--no-progress")
        docs[baseline] = json.loads(out.read_text())
    uni, cb = docs["uniform"]["per_image"], docs["centerbias"]["per_image"]
    for a, b in zip(uni, cb):
        for m in METRIC_NAMES[:-1]:
            assert a[m] == pytest.approx(b[m], abs=1e-12), m
    assert not np.allclose([r["ig"] for r in uni], [r["ig"] for r in cb], atol=1e-3)


class DensityStub:
    """A predictor returning a fixed log density per image, chosen by the image's size."""

    def __init__(self, name: str, maps: dict[tuple[int, int], np.ndarray]):
        self.name = name
        self.maps = maps
        self.calls = 0

    def log_densities(self, rgbs):
        self.calls += len(rgbs)
        return [self.maps[x.shape[:2]] for x in rgbs]


def test_fixations_own_density_beats_a_uniform_prediction(mit):
    from pipeline.score import metrics
    from pipeline.score.evaluate import evaluate_fixations

    _, h5, _ = mit
    fs = read_hdf5(h5)
    empirical, uniform = {}, {}
    for i in range(len(fs)):
        h, w = (int(v) for v in fs.sizes[i])
        ys, xs = fs.fixations(i)
        density = metrics.empirical_saliency_map(ys, xs, (h, w), sigma=0.05 * max(h, w))
        empirical[(h, w)] = np.log(np.maximum(density, 1e-300)).astype(np.float32)
        uniform[(h, w)] = np.full((h, w), -np.log(h * w), np.float32)

    kw = dict(batch_size=2, baseline="uniform", io_threads=2, progress=False)
    good = evaluate_fixations(DensityStub("empirical", empirical), fs, **kw)
    flat_stub = DensityStub("uniform", uniform)
    flat = evaluate_fixations(flat_stub, fs, **kw)
    assert flat_stub.calls == len(fs) and len(good.per_image) == len(flat.per_image) == len(fs)
    for g, u in zip(good.per_image, flat.per_image):
        assert g["nss"] > u["nss"] + 1.0
        assert g["auc_judd"] > u["auc_judd"] + 0.2
        assert g["cc"] > u["cc"] + 0.5
        assert g["ig"] > 1.0  # bits per fixation over the uniform baseline
        assert g["sauc"] > u["sauc"] + 0.2
        # a constant map ranks nothing above anything and correlates with nothing
        assert u["auc_judd"] == pytest.approx(0.5) and u["sauc"] == pytest.approx(0.5)
        assert abs(u["cc"]) < 1e-9
        assert u["ig"] == pytest.approx(0.0, abs=1e-6)  # uniform against the uniform baseline
    assert good.means["kl_div"] < flat.means["kl_div"]
    assert good.means["sim"] > flat.means["sim"]
    # shuffled AUC from the other fixations counted per pixel is the one over each of their positions
    from pipeline.score.evaluate import _other_fixations

    fy, fx = _other_fixations(fs)
    for g in good.per_image:
        i, (h, w) = g["index"], (int(v) for v in fs.sizes[g["index"]])
        other = fs.image_index != i
        oys, oxs = np.minimum((fy[other] * h).astype(np.intp), h - 1), np.minimum((fx[other] * w).astype(np.intp), w - 1)
        assert g["sauc"] == metrics.shuffled_auc(empirical[(h, w)], *fs.fixations(i), oys, oxs)
    # an image the stub never saw cannot be scored twice or skipped silently
    assert sorted(r["index"] for r in good.per_image) == list(range(len(fs)))


def test_unreadable_image_is_a_failure_the_others_are_scored(mit, tmp_path):
    src, _, _ = mit
    root = tmp_path / "MIT1003"
    shutil.copytree(src, root)
    h5 = tmp_path / "mit.h5"
    ok("fixations", "mit1003", "--root", root, "--out", h5)
    broken = root / "ALLSTIMULI" / "i_chelsea.jpeg"
    broken.write_bytes(b"this is no longer a jpeg" * 10)

    out = tmp_path / "eval.json"
    result = ok("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--out", out,
                "--no-progress")
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 1 and "ALLSTIMULI/i_chelsea.jpeg" in failed[0]
    doc = json.loads(out.read_text())
    assert doc["failed"] == 1 and doc["images"] == len(MIT_IMAGES) - 1
    assert doc["failures"][0]["path"] == "ALLSTIMULI/i_chelsea.jpeg" and doc["failures"][0]["reason"]
    assert "ALLSTIMULI/i_chelsea.jpeg" not in [r["path"] for r in doc["per_image"]]
    assert all(np.isfinite(v) for v in doc["metrics"].values())


def test_another_picture_under_an_images_name_is_a_failure_and_a_moved_dataset_one_line(mit, tmp_path):
    """A stimulus replaced by a picture of another aspect ratio is not scored against fixations that were never on
    it (it was, with the fixations stretched onto it); one resized at its aspect ratio is scored. A dataset moved
    since its fixation file was made is one sentence saying so, not a failure line per image."""
    src, _, _ = mit
    root = tmp_path / "MIT1003"
    shutil.copytree(src, root)
    h5 = tmp_path / "mit.h5"
    ok("fixations", "mit1003", "--root", root, "--out", h5)
    write_jpeg(root / "ALLSTIMULI" / "i_camera.jpeg", photo("coffee", 120))  # 120x80, where a 104x104 was
    rgb = photo(*MIT_IMAGES["i_chelsea"])  # 112x75, now 56x37: the stimulus at half size
    write_jpeg(root / "ALLSTIMULI" / "i_chelsea.jpeg",
               cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA))

    out = tmp_path / "eval.json"
    result = ok("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--out", out, "--no-progress")
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert failed == ["failed: ALLSTIMULI/i_camera.jpeg: the file is 120x80 but its fixations were recorded on a "
                      "104x104 image (another picture under this name?)"], result.stderr
    doc = json.loads(out.read_text())
    assert sorted(r["path"] for r in doc["per_image"]) == sorted(
        f"ALLSTIMULI/{name}.jpeg" for name in MIT_IMAGES if name != "i_camera")  # the half-size one among them

    shutil.move(root, tmp_path / "moved")
    moved = invoke("eval", "--teacher", "classic", "--fixations", h5, "--device", "cpu", "--no-progress")
    assert moved.exit_code == 1 and moved.output.count("\n") == 1, moved.output
    assert moved.output == (f"Error: the images of mit1003 are not where its fixation file says ({root} does not "
                            "exist): make the file again with `pipeline fixations` from where the dataset is now\n")


# --------------------------------------------------------------------------------------------
# eval on labels


def shard_keys(tar: Path) -> set[str]:
    with tarfile.open(tar) as t:
        return {m.name.split(".", 1)[0] for m in t.getmembers() if m.isfile()}


def test_a_label_that_does_not_decode_is_an_eval_failure_not_a_silent_gap(label_folder, tmp_path):
    """A sample whose label does not decode (in a shard whose checksums agree with it) is skipped (one warning),
    and counted and listed as failed in the table and the JSON."""
    from pipeline.label.shards import tar_samples
    from tests.conftest import rewrite_shard

    folder = tmp_path / "labels"
    shutil.copytree(label_folder, folder)
    name = sorted(p.stem for p in folder.glob("shard-*.tar"))[-1]
    samples = list(tar_samples(folder / f"{name}.tar"))
    samples[0]["classic.png"] = b"\x89PNG\r\n\x1a\n broken"
    rewrite_shard(folder, name, samples)
    out = tmp_path / "eval.json"
    result = ok("eval", "--teacher", "classic", "--labels", folder, "--out", out, "--no-progress")
    assert any(line.split() == ["images", "failed", "1"] for line in result.output.splitlines()), result.output
    doc = json.loads(out.read_text())
    assert doc["images"] == 1 and doc["failed"] == 1
    assert doc["failures"][0]["path"].endswith(f"{name}.tar {samples[0]['__key__']}")


def test_eval_refuses_a_shard_changed_after_labelling_as_train_does(label_folder, tmp_path):
    """eval --labels scored a tar altered after labelling (one byte changed: an image "failed", the rest scored,
    exit 0) that `verify` and `train` refuse: the scored shards' sha256s are checked first, as train checks its."""
    folder = tmp_path / "labels"
    shutil.copytree(label_folder, folder)
    tar = sorted(folder.glob("shard-*.tar"))[-1]
    data = bytearray(tar.read_bytes())
    data[2048] ^= 0xFF
    tar.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["eval", "--teacher", "classic", "--labels", str(folder), "--no-progress"])
    assert result.exit_code == 1 and f"shard {tar} is corrupt" in result.output, result.output
    assert "images scored" not in result.output


def test_eval_checkpoint_on_labels_scores_the_held_out_shard(run_dir, label_folder, tmp_path):
    out = tmp_path / "labels_eval.json"
    result = ok("eval", "--checkpoint", run_dir, "--labels", label_folder, "--device", "cpu", "--out", out,
                "--no-progress")
    for m in SHARD_METRIC_NAMES:
        assert any(line.split()[:1] == [m] for line in result.output.splitlines()), f"{m} not printed"
    doc = json.loads(out.read_text())
    assert set(doc["metrics"]) == set(SHARD_METRIC_NAMES)
    tars = sorted(label_folder.glob("shard-*.tar"))
    assert len(tars) == 2
    assert {r["key"] for r in doc["per_image"]} == shard_keys(tars[-1])
    for r in doc["per_image"]:
        assert -1.0 <= r["cc"] <= 1.0 and 0.0 <= r["sim"] <= 1.0 and r["kl_div"] >= 0.0
    pointer = tmp_path / "pointer.json"  # the run's checkpoints/latest.json named instead of the run: the same
    ok("eval", "--checkpoint", run_dir / "checkpoints" / "latest.json", "--labels", label_folder, "--device", "cpu",
       "--out", pointer, "--no-progress")
    assert json.loads(pointer.read_text())["metrics"] == doc["metrics"]

    # --val-shards covering every shard scores them all, and says so
    every = tmp_path / "all.json"
    with pytest.warns(UserWarning, match=rf"^--val-shards 2: {label_folder} has 2 shards, all scored \(the training "
                                         r"shards too, if the model was trained on this folder\)$"):
        ok("eval", "--checkpoint", run_dir, "--labels", label_folder, "--val-shards", "2", "--device", "cpu",
           "--out", every, "--no-progress")
    assert {r["key"] for r in json.loads(every.read_text())["per_image"]} == shard_keys(tars[0]) | shard_keys(tars[1])

    # --limit applies to labels too
    one = tmp_path / "one.json"
    ok("eval", "--checkpoint", run_dir, "--labels", label_folder, "--val-shards", "0", "--limit", "3",
       "--device", "cpu", "--out", one, "--no-progress")  # 0: every shard, as asked (no warning)
    assert json.loads(one.read_text())["images"] == 3


def test_teacher_against_its_own_labels(label_folder, tmp_path):
    out = tmp_path / "self.json"
    ok("eval", "--teacher", "classic", "--labels", label_folder, "--device", "cpu", "--out", out, "--no-progress")
    doc = json.loads(out.read_text())
    assert doc["images"] == 2
    assert doc["metrics"]["cc"] > 0.99
    assert doc["metrics"]["kl_div"] < 0.01 and doc["metrics"]["sim"] > 0.95


# --------------------------------------------------------------------------------------------
# naming the model, and what to score it on


def test_model_naming_and_data_errors(mit, label_folder, tmp_path):
    _, h5, _ = mit
    fix = ["--fixations", str(h5), "--device", "cpu", "--no-progress"]
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    not_hdf5 = tmp_path / "garbage.h5"
    not_hdf5.write_bytes(b"\0not hdf5" * 20)
    weights_only = tmp_path / "weights.pt"  # a weights file of ours, not a training checkpoint
    torch.save({"model": {}, "student": "fastsal_a"}, weights_only)
    misfit = tmp_path / "misfit.pt"  # a training checkpoint whose model is not the student it names
    torch.save({"model": {"head.weight": torch.zeros(1)}, "student": "fastsal_a",
                "labels": {"teacher": "classic", "kind": "probability_map", "image_size": [64, 96]}}, misfit)

    cases = [
        (["eval", *fix], "exactly one of --checkpoint, --teacher or --student"),
        (["eval", "--teacher", "classic", "--student", "fastsal_a", "--weights", "x.pt", *fix],
         "exactly one of --checkpoint, --teacher or --student (got --teacher, --student)"),
        (["eval", "--student", "fastsal_a", *fix], "--student fastsal_a needs --weights"),
        (["eval", "--checkpoint", not_a_run, *fix], "not a finished `pipeline train` run"),
        (["eval", "--checkpoint", tmp_path / "missing.pt", *fix], "'--checkpoint': " + str(tmp_path / "missing.pt") + " does not exist"),
        (["eval", "--checkpoint", weights_only, *fix], "not a checkpoint of `pipeline train`"),
        (["eval", "--checkpoint", not_hdf5, *fix], "cannot read weights file"),
        (["eval", "--checkpoint", misfit, *fix], "state dict does not fit"),
        (["eval", "--checkpoint", not_a_run, "--weights", weights_only, *fix], "--weights goes with --teacher"),
        (["eval", "--teacher", "salgan", *fix], "salgan needs --weights"),
        (["eval", "--teacher", "salgan", "--weights", "random", *fix], "--weights random"),
        (["eval", "--teacher", "classic", "--device", "cpu"], "exactly one of --fixations FILE.h5 or --labels"),
        (["eval", "--teacher", "classic", *fix, "--labels", label_folder],
         "exactly one of --fixations FILE.h5 or --labels"),
        (["eval", "--teacher", "classic", "--fixations", foreign], "is not a fixation set"),
        (["eval", "--teacher", "classic", "--fixations", not_hdf5], "not an HDF5 file"),
        (["eval", "--teacher", "classic", "--fixations", tmp_path / "nope.h5"], "'--fixations': " + str(tmp_path / "nope.h5") + " does not exist"),
        (["eval", "--teacher", "classic", "--labels", tmp_path], "not a finished label folder"),
        (["predict", "--images", tmp_path, "--out", tmp_path / "o"], "exactly one of --checkpoint"),
        (["predict", "--teacher", "salgan", "--weights", "random", "--images", tmp_path, "--out", tmp_path / "o"],
         "--weights random"),
        (["profile", "--teacher", "classic", "--checkpoint", not_a_run], "exactly one of"),
        (["profile", "--student", "fastsal_a", "--image-size", "100x100"], "multiples of 32"),
    ]
    usage = ("exactly one of", "needs --weights (", "--weights goes with", "--weights random")  # exit status 2
    for args, message in cases:
        r = invoke(*args)
        line = error_line(r)
        assert message in line, (args, line)
        if any(u in message for u in usage) or message.startswith("--student fastsal_a needs"):
            assert r.exit_code == 2, (args, r.exit_code)  # a usage mistake: said before anything is read
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# predict


def test_predict_pngs_mirror_the_folder_at_each_images_size(run_dir, image_folder, tmp_path):
    out = tmp_path / "maps"
    result = ok("predict", "--checkpoint", run_dir, "--images", image_folder, "--out", out, "--device", "cpu",
                "--batch-size", "2", "--no-progress")
    assert "maps written   3" in result.output
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert pngs == sorted(f"{rel}.png" for rel in IMAGE_SIZES)
    for rel, size in IMAGE_SIZES.items():
        m = cv2.imread(str(out / f"{rel}.png"), cv2.IMREAD_UNCHANGED)
        assert m.dtype == np.uint8 and m.shape == size, rel
        assert m.max() == 255  # scaled to its maximum
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["maps"] == 3 and doc["failures"] == []
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg.png", "predictions.json", "sub"]  # no temp files


def test_predict_hdf5_log_densities_for_pysaliency(run_dir, image_folder, tmp_path):
    out = tmp_path / "pred" / "maps.h5"
    ok("predict", "--checkpoint", run_dir, "--images", image_folder, "--out", out, "--format", "hdf5",
       "--device", "cpu", "--no-progress")
    assert sorted(p.name for p in out.parent.iterdir()) == ["maps.h5"]  # no temporary file left beside it
    with h5py.File(out, "r") as f:
        assert f.attrs["type"] == "pysaliency.precomputed_models.predictions"
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert sorted(names) == sorted(IMAGE_SIZES)
        for rel, size in IMAGE_SIZES.items():
            d = f[rel][()]
            assert d.dtype == np.float32 and d.shape == size, rel
            assert torch.logsumexp(torch.from_numpy(d).double().flatten(), 0).item() == pytest.approx(0.0, abs=1e-3)
        # the README's "From Python" lines give the same maps
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        code = next(b for b in readme.split("```python\n")[1:] if "student_predictor" in b).split("```")[0]
        for rel in IMAGE_SIZES:
            scope = {}
            exec(code.replace('"runs/fastsal_a"', repr(str(run_dir))).replace('"photo.jpg"',
                                                                               repr(str(image_folder / rel))), scope)
            assert np.allclose(scope["maps"][0], f[rel][()], atol=1e-5), rel


def test_predict_records_an_unreadable_image_and_removes_the_map_an_earlier_run_made_of_it(image_folder, tmp_path):
    """The map an earlier run made of the picture a file held before stayed beside a predictions.json that listed
    the file as failed (and, with --compare-teacher, its sheet): both go, said in a note."""
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    out = tmp_path / "maps"
    ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--compare-teacher", "classic",
       "--no-progress")
    assert (out / "sub" / "b.jpg.png").is_file() and (out / "compare" / "sub" / "b.jpg.png").is_file()
    (folder / "sub" / "b.jpg").write_bytes(b"garbage")
    result = ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--compare-teacher", "classic",
                "--device", "cpu", "--no-progress")
    assert any(line.startswith("failed: ") and "b.jpg" in line for line in result.stderr.splitlines())
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["maps"] == 2 and len(doc["failures"]) == 1
    assert not (out / "sub" / "b.jpg.png").exists() and (out / "sub" / "c.png.png").is_file()
    assert not (out / "compare" / "sub" / "b.jpg.png").exists() and (out / "compare" / "sub" / "c.png.png").is_file()
    assert (f"note: removed 1 map an earlier run left in {out} (its image failed in this run: it showed what the "
            "file held before): sub/b.jpg.png") in result.stderr
    assert f"note: removed 1 comparison sheet an earlier run left in {out / 'compare'} (" in result.stderr
    again = ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")
    assert "note: removed" not in again.stderr  # nothing left to remove


def test_predict_neither_reads_a_label_folder_as_images_nor_writes_into_one(image_folder, label_folder, tmp_path):
    """A label folder as --images mapped its preview.png alone and said nothing of its shards; --out inside one
    wrote maps (and took over its lock) among the shards. Both are usage errors, before any work."""
    before = sorted(p.name for p in label_folder.iterdir())
    read = invoke("predict", "--teacher", "classic", "--images", label_folder, "--out", tmp_path / "m")
    assert read.exit_code == 2 and error_line(read) == (
        f"Error: Invalid value for '--images': {label_folder} is a label folder of `pipeline label` (its images are "
        "inside its shards, which predict does not read): give the folder of the photos (`pipeline eval --labels` "
        "scores a model on a label folder)")
    written = invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", label_folder / "maps")
    assert written.exit_code == 2 and error_line(written) == (
        f"Error: Invalid value for '--out': {label_folder / 'maps'} lies in the label folder {label_folder}: the maps "
        "would be written among its shards; give another folder")
    as_url = invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", f"file://{label_folder}/m")
    assert as_url.exit_code == 2 and f"lies in the label folder {label_folder}" in error_line(as_url)
    assert sorted(p.name for p in label_folder.iterdir()) == before and not (tmp_path / "m").exists()


def test_predict_never_writes_over_its_images_nor_reads_its_own_maps(image_folder, tmp_path):
    """--out the image folder itself is refused before any work (a map `a.jpg.png` would replace an image of
    that name); --out inside it works, and a second run does not take the first run's maps for images."""
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    same = invoke("predict", "--teacher", "classic", "--images", folder, "--out", folder, "--no-progress")
    assert same.exit_code == 2 and error_line(same) == (
        f"Error: Invalid value for '--out': {folder} is the image folder itself: the maps would be written "
        "among (and over) the images; give another folder")
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    for _ in range(2):
        result = ok("predict", "--teacher", "classic", "--images", folder, "--out", folder / "maps", "--no-progress")
        assert "maps written   3" in result.output
    hdf5 = invoke("predict", "--teacher", "classic", "--images", folder, "--out", tmp_path, "--format", "hdf5")
    assert error_line(hdf5) == f"Error: --out {tmp_path} is a folder; --format hdf5 writes one file: give its path"


def test_predict_says_which_photos_under_its_out_folder_inside_the_images_it_leaves_out(image_folder, tmp_path):
    """`--images mix --out mix/out`: the photos already in mix/out were never mapped and nothing said so (every
    other file left out is named in a note). The maps predict wrote there are not counted as photos."""
    folder = tmp_path / "mix"
    shutil.copytree(image_folder, folder)
    for name in ("p1.jpg", "deep/p2.PNG"):
        (folder / "out" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "a.jpg", folder / "out" / name)
    for _ in range(2):  # the second run finds its maps there too: still the two photos alone
        r = ok("predict", "--teacher", "classic", "--images", folder, "--out", folder / "out", "--no-progress")
        assert "maps written   3" in r.output
        assert (f"note: left out 2 images under --out {folder / 'out'}, inside --images: the output folder is not "
                f"read as images (give --out outside {folder}, or move them out, to map them): out/deep/p2.PNG, "
                "out/p1.jpg") in r.stderr, r.stderr
    assert sorted(p.name for p in (folder / "out").glob("*.png")) == ["a.jpg.png"]  # (sub/ holds the other two)


def test_predict_holds_its_folder_and_marks_it_complete_only_at_the_end(image_folder, tmp_path):
    """A second predict into a folder in use is refused (two runs mixed their maps under one predictions.json);
    a re-run takes the old predictions.json away before its first map, so a run that dies half-way leaves no
    mark saying the folder is complete; an image whose map's name the filesystem cannot take is that image's
    failure (its temp name was too long: the whole run died)."""
    from pipeline.common.locks import FolderLock

    folder, out = tmp_path / "imgs", tmp_path / "maps"
    shutil.copytree(image_folder, folder)
    ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")
    with FolderLock(out / ".lock", what=f"map folder {out}", command="pipeline predict"):
        held = invoke("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")
    assert error_line(held).startswith(f"Error: map folder {out} is in use by another process (`pipeline predict`")

    (folder / "sub" / "b.jpg").write_bytes(b"garbage")  # ...so the re-run dies at its first map written
    import pipeline.score.predict as predict

    def full(path, logd, density=True):
        raise OSError(28, "No space left on device", str(path))

    real = predict._write_png
    predict._write_png = full
    try:
        died = invoke("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")
    finally:
        predict._write_png = real
    assert error_line(died).startswith(f"Error: cannot write the maps to {out} (No space left on device: ")
    assert not (out / "predictions.json").exists() and not (out / ".lock").exists()

    long = "y" * 250 + ".jpg"  # its map, long + ".png", is 258 bytes: more than a file name may be
    shutil.copy(folder / "a.jpg", folder / long)
    marked_while_held = []
    real_write_json = predict.write_json
    predict.write_json = lambda path, doc: (marked_while_held.append((out / ".lock").exists()),
                                            real_write_json(path, doc))
    try:
        result = ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")
    finally:
        predict.write_json = real_write_json
    assert marked_while_held == [True]  # predictions.json goes up before another run may take the folder
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["maps"] == 2 and sorted(Path(f["file"]).name for f in doc["failures"]) == ["b.jpg", long]
    assert f"its map's name is too long for the filesystem: {out / long}.png" in result.stderr


def test_ctrl_c_in_predict_profile_or_eval_says_what_is_kept_and_exits_130(image_folder, label_folder, tmp_path,
                                                                      monkeypatch):
    """They ended with click's bare `Aborted!`, exit 1, as `label` and `train` no longer do: one `interrupted:` line
    saying what is kept, exit status 130. Interrupted after its first map, predict keeps that map and no
    predictions.json (its old one went before the first map), and lets its folder go."""
    import pipeline.score.predict as P
    import pipeline.score.profile

    out = tmp_path / "maps"
    ok("predict", "--teacher", "classic", "--images", image_folder, "--out", out, "--no-progress")
    for p in out.rglob("*.png"):
        p.unlink()
    real = P.Predictor.iter_log_densities
    batches = []

    def interrupted_at_the_second_batch(self, inputs, sizes):
        batches.append(len(inputs))
        if len(batches) > 1:
            raise KeyboardInterrupt
        yield from real(self, inputs, sizes)

    monkeypatch.setattr(P.Predictor, "iter_log_densities", interrupted_at_the_second_batch)
    r = invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", out, "--batch-size", "1",
               "--no-progress")
    assert r.exit_code == 130 and r.output.strip().splitlines()[-1] == (
        f"interrupted: the maps already written are kept, but not {out}/predictions.json, written last to mark the "
        "folder complete: the same command maps every image again"), r.output
    assert sorted(p.name for p in out.rglob("*") if not p.is_dir()) == ["a.jpg.png"]  # no mark, no lock

    batches.clear()
    r = invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", tmp_path / "m.h5", "--format",
               "hdf5", "--batch-size", "1", "--no-progress")
    assert r.exit_code == 130 and r.output.strip().splitlines()[-1] == (
        f"interrupted: {tmp_path / 'm.h5'} is not written (it is renamed into place once complete; a file there "
        "before is left as it was): run the same command again"), r.output
    assert not list(tmp_path.glob("m.h5*"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.score.profile, "profile", interrupted)
    r = invoke("profile", "--teacher", "classic", "--iters", "1", "--out", tmp_path / "p.json")
    assert r.exit_code == 130 and r.output.strip().splitlines() == [
        "interrupted: nothing was measured to keep (the figures are printed, and --out written, once every pass has "
        "run): run the same command again"], r.output
    assert not (tmp_path / "p.json").exists()

    import pipeline.score.evaluate  # eval likewise
    monkeypatch.setattr(pipeline.score.evaluate, "evaluate_shards", interrupted)
    r = invoke("eval", "--teacher", "classic", "--labels", label_folder, "--out", tmp_path / "e.json")
    assert r.exit_code == 130 and r.output.strip().splitlines() == [
        "interrupted: nothing was scored to keep (the scores are printed, and --out written, once every image is "
        "scored): run the same command again"], r.output
    assert not (tmp_path / "e.json").exists()
    import pipeline.cli.score  # also while its model is built (a download, say), before any scoring
    monkeypatch.setattr(pipeline.cli.score, "build_model", interrupted)
    r = invoke("eval", "--teacher", "classic", "--labels", label_folder)
    assert r.exit_code == 130 and r.output.startswith("interrupted: nothing was scored to keep"), r.output


def test_predict_turns_a_photo_as_viewers_show_it(tmp_path):
    """A phone's portrait photo (stored landscape, EXIF orientation 6): its map is portrait too, so it lies over
    the photo as a viewer shows it."""
    from PIL import Image

    folder = tmp_path / "phone"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.fromarray(np.full((60, 100, 3), 128, np.uint8)).save(folder / "portrait.jpg", exif=exif)
    ok("predict", "--teacher", "classic", "--images", folder, "--out", tmp_path / "maps", "--no-progress")
    assert cv2.imread(str(tmp_path / "maps" / "portrait.jpg.png"), cv2.IMREAD_UNCHANGED).shape == (100, 60)
    ok("predict", "--teacher", "classic", "--images", folder, "--out", tmp_path / "m.h5", "--format", "hdf5")
    with h5py.File(tmp_path / "m.h5", "r") as f:  # for pysaliency: the stored pixels, as its fixations are
        assert f["portrait.jpg"].shape == (60, 100)


def test_a_sigma_that_is_not_a_finite_fraction_is_a_usage_error(mit):
    for sigma in ("nan", "inf", "2"):
        result = invoke("eval", "--teacher", "classic", "--fixations", mit[1], "--sigma", sigma)
        assert result.exit_code == 2 and "Invalid value for '--sigma'" in result.output, result.output


def test_predict_compare_teacher_writes_image_teacher_student_sheets(run_dir, image_folder, tmp_path):
    from pipeline.score.sheets import CAPTION, PANEL_HEIGHT, SCALE_WIDTH

    out = tmp_path / "same"  # the teacher against itself: the two map panels agree and CC is 1
    result = ok("predict", "--teacher", "classic", "--images", image_folder, "--out", out, "--compare-teacher",
                "classic", "--device", "cpu", "--no-progress")
    assert "CC with the teacher  1.000 (mean of 3)" in result.output
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["compare_teacher"] == "classic" and doc["compare_sheets"] == str(out / "compare")
    assert sorted(doc["cc_with_teacher"]) == sorted(IMAGE_SIZES)
    for rel, (h, w) in IMAGE_SIZES.items():
        sheet = cv2.imread(str(out / "compare" / f"{rel}.png"))
        assert doc["cc_with_teacher"][rel] == pytest.approx(1.0)
        panel = round(w * PANEL_HEIGHT / h)
        assert sheet.shape == (PANEL_HEIGHT + CAPTION, 3 * panel + 12 + SCALE_WIDTH, 3), rel
        photo_panel = sheet[CAPTION:, :panel]
        teacher_panel = sheet[CAPTION:, panel + 4:2 * panel + 4]
        student_panel = sheet[CAPTION:, 2 * panel + 8:3 * panel + 8]
        assert np.array_equal(teacher_panel, student_panel)
        assert teacher_panel.std() > 10 and not np.array_equal(photo_panel, teacher_panel)
        bar = sheet[CAPTION:, 3 * panel + 12 + 2:3 * panel + 12 + 12].astype(int).sum(axis=(1, 2))
        assert bar[0] > bar[PANEL_HEIGHT // 2] > bar[-1]  # the scale: bright at the top (the maximum), dark at 0
        # the colour of a map's maximum is the top of the scale
        top = sheet[CAPTION, 3 * panel + 12 + 6].astype(int)
        assert (np.abs(teacher_panel.astype(int) - top).sum(-1) <= 6).any()

    out = tmp_path / "student"
    result = ok("predict", "--checkpoint", run_dir, "--images", image_folder, "--out", out, "--compare-teacher",
                "classic", "--device", "cpu", "--no-progress")
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["maps"] == 3 and all(-1 <= v <= 1 for v in doc["cc_with_teacher"].values())
    assert sorted(p.relative_to(out / "compare").as_posix() for p in (out / "compare").rglob("*.png")) == \
        sorted(f"{rel}.png" for rel in IMAGE_SIZES)
    r = CliRunner().invoke(cli, ["predict", "--teacher", "classic", "--images", str(image_folder), "--out",
                                 str(tmp_path / "x"), "--compare-weights", "w.pt"])
    assert r.exit_code == 2 and "--compare-weights goes with --compare-teacher" in r.output


def test_predict_compare_teacher_refuses_a_compare_subfolder_whose_maps_would_be_the_sheets(image_folder, tmp_path):
    """The map of `compare/a.jpg` is `<out>/compare/a.jpg.png`, where the sheet of `a.jpg` goes: the sheet replaced
    the map and the run said `maps written 4`, exit 0. Now a usage mistake, before anything is written."""
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    shutil.copytree(image_folder, folder / "compare")
    out = tmp_path / "maps"
    r = invoke("predict", "--teacher", "classic", "--images", folder, "--out", out, "--compare-teacher", "classic",
               "--no-progress")
    assert r.exit_code == 2 and error_line(r) == (
        f"Error: Invalid value for '--compare-teacher': the map of compare/a.jpg would be {out}/compare/a.jpg.png, "
        f"where the comparison sheet of a.jpg goes (3 images of {folder / 'compare'} so): rename or move the folder "
        f"{folder / 'compare'}, or predict without --compare-teacher")
    assert not out.exists()
    ok("predict", "--teacher", "classic", "--images", folder, "--out", out, "--no-progress")  # no sheets: no clash


# --------------------------------------------------------------------------------------------
# profile, teachers


def test_profile_student_size_flops_and_image_size(tmp_path):
    out = tmp_path / "p" / "a.json"
    ok("profile", "--student", "fastsal_a", "--device", "cpu", "--iters", "1", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["params"] == 3_646_715
    assert doc["input_size"] == [192, 256]
    assert doc["gflops"] > 1 and doc["gflops"] == pytest.approx(1.277, abs=0.01)
    assert doc["images_per_s"] > 0 and doc["batch_size"] == 1 and doc["precision"] == "fp32"

    small = tmp_path / "small.json"
    ok("profile", "--student", "fastsal_a", "--device", "cpu", "--iters", "1", "--image-size", "64x96",
       "--out", small)
    sdoc = json.loads(small.read_text())
    assert sdoc["input_size"] == [64, 96]
    ratio = (64 * 96) / (192 * 256)
    assert sdoc["gflops"] / doc["gflops"] == pytest.approx(ratio, rel=0.15)


def test_profile_names_the_files_of_its_images_folder_it_leaves_out(image_folder, tmp_path):
    """Undecodable image files and files of other suffixes were dropped without a word (predict names them)."""
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    (folder / "notes.txt").write_text("not a photo")
    for name in ("broken.jpg", "sub/empty.png"):
        (folder / name).write_bytes(b"")
    r = ok("profile", "--teacher", "classic", "--iters", "1", "--images", folder, "--out", tmp_path / "p.json")
    assert r.stderr.splitlines() == [
        "note: left out 1 file whose suffix is not an image's (.jpg, .jpeg, .jpe, .jfif, .png, .bmp, .tif, .tiff, "
        ".webp): notes.txt",
        f"note: left out 2 image files of {folder} that could not be read (the first, broken.jpg: empty file)"], \
        r.stderr
    assert json.loads((tmp_path / "p.json").read_text())["inputs"] == f"3 images of {folder}"


def test_profile_checkpoint_uses_its_training_size(run_dir, tmp_path):
    out = tmp_path / "run.json"
    ok("profile", "--checkpoint", run_dir, "--device", "cpu", "--iters", "1", "--out", out)
    doc = json.loads(out.read_text())
    assert doc["input_size"] == [64, 96]
    assert doc["params"] == 3_646_715


def test_a_train_checkpoint_given_as_student_weights_is_warned_of(run_dir, image_folder, tmp_path):
    """`--student fastsal_a --weights <our checkpoint>` runs it at 192x256 with softmax maps although it was
    trained at 64x96 on a map teacher (sigmoid): its maps had CC 0.015 with --checkpoint's. Allowed, and said."""
    ckpt = next((run_dir / "checkpoints").glob("epoch-*.pt"))
    r = ok("predict", "--student", "fastsal_a", "--weights", ckpt, "--images", image_folder, "--out",
           tmp_path / "maps", "--no-progress")
    assert (f"warning: {ckpt} is a `pipeline train` checkpoint, trained at 64x96 with sigmoid maps; --student runs "
            f"it at 192x256 with --student-output softmax: --checkpoint {ckpt} uses what it was trained with") \
        in r.stderr
    r = ok("predict", "--checkpoint", ckpt, "--images", image_folder, "--out", tmp_path / "maps2", "--no-progress")
    assert "warning" not in r.stderr
    for model in (["--checkpoint", ckpt], ["--teacher", "classic"]):  # it was ignored there, without a word
        r = invoke("predict", *model, "--student-output", "softmax", "--images", image_folder, "--out",
                   tmp_path / "maps3")
        assert r.exit_code == 2 and error_line(r) == (f"Error: --student-output goes with --student, not {model[0]} "
                                                      "(a checkpoint records its student's output; a teacher's map "
                                                      "is its own)"), r.output
    assert not (tmp_path / "maps3").exists()


def test_teachers_lists_kinds_parameters_and_weights():
    result = ok("teachers")
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:] if line.strip()}
    assert set(rows) == {"classic", "deepgaze", "deepgaze2", "deepgaze2e", "salgan"}
    assert "probability_map" in rows["classic"] and "any" in rows["classic"] and "none needed" in rows["classic"]
    assert "probability_map" in rows["salgan"] and "31,787,009" in rows["salgan"]
    assert "needs --weights PATH" in rows["salgan"] and "needs --weights PATH" in rows["deepgaze2"]
    for name in ("deepgaze", "deepgaze2", "deepgaze2e"):
        assert "log_density" in rows[name] and "384x512" in rows[name]
    assert rows["deepgaze"].split()[3] == rows["deepgaze2e"].split()[3]  # deepgaze is DeepGaze IIE


# --------------------------------------------------------------------------------------------
# a FastSal student from a weights file


def to_authors_keys(sd: dict) -> dict:
    """Inverse of students.fastsal.from_authors_keys for FastSal (C)."""
    out = {}
    for key, value in sd.items():
        if key.startswith("encoder.features."):
            new = "ecer." + key[len("encoder.features."):]
        elif key.startswith("adapt."):
            i, _, param = key[len("adapt."):].split(".")
            new = f"adaptation_layer.layers.{i}.conv0.{param}"
        elif key.startswith("head.1."):
            new = "comb.layers.0.1." + key[len("head.1."):]
        else:
            raise AssertionError(f"unexpected key {key}")
        out[new] = value
    return out


def test_student_from_authors_weights_file_predicts_and_evaluates(mit, image_folder, tmp_path):
    from students import fastsal_c
    from students.fastsal import from_authors_keys

    torch.manual_seed(0)
    sd = fastsal_c(backbone_weights="none").state_dict()
    authors = to_authors_keys(sd)
    assert len(authors) == 322 and from_authors_keys(authors, "C").keys() == sd.keys()
    authors_file, ours_file = tmp_path / "coco_C.pth", tmp_path / "ours.pt"
    torch.save({"student_model": authors}, authors_file)
    torch.save({"model": sd, "student": "fastsal_c"}, ours_file)

    maps = {}
    for tag, file in (("authors", authors_file), ("ours", ours_file)):
        out = tmp_path / f"{tag}.h5"
        ok("predict", "--student", "fastsal_c", "--weights", file, "--student-output", "sigmoid", "--images",
           image_folder, "--out", out, "--format", "hdf5", "--device", "cpu", "--no-progress")
        with h5py.File(out, "r") as f:
            maps[tag] = {rel: f[rel][()] for rel in IMAGE_SIZES}
    for rel, size in IMAGE_SIZES.items():
        assert maps["authors"][rel].shape == size
        np.testing.assert_allclose(maps["authors"][rel], maps["ours"][rel], atol=1e-5)

    pngs = tmp_path / "pngs"
    ok("predict", "--student", "fastsal_c", "--weights", authors_file, "--images", image_folder, "--out", pngs,
       "--device", "cpu", "--no-progress")
    assert json.loads((pngs / "predictions.json").read_text())["maps"] == 3

    _, h5, _ = mit
    out = tmp_path / "eval.json"
    ok("eval", "--student", "fastsal_c", "--weights", authors_file, "--fixations", h5, "--device", "cpu",
       "--out", out, "--no-progress")
    doc = json.loads(out.read_text())
    assert doc["images"] == len(MIT_IMAGES) and set(doc["metrics"]) == set(METRIC_NAMES)
    assert "fastsal_c" in doc["model"]

    # the wrong student for the file is refused
    line = error_line(invoke("predict", "--student", "fastsal_a", "--weights", ours_file, "--images", image_folder,
                             "--out", tmp_path / "x", "--device", "cpu"))
    assert "fastsal_c checkpoint, not fastsal_a" in line


# --------------------------------------------------------------------------------------------
# predict and eval: odd names, broken models, other runs' outputs


def test_predict_maps_a_name_that_is_not_utf8_and_names_a_broken_link_as_it_is(run_dir, image_folder, tmp_path):
    """A file name with a byte that is not UTF-8 killed the run with a traceback (its temp name could not be
    encoded): it gets its map, in png; hdf5, whose dataset names must be UTF-8, fails that image alone and keeps
    its failures in the file. A broken symlink's failure names the link, not where it led."""
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    odd = os.fsdecode(b"bad\xff.jpg")
    shutil.copy(folder / "a.jpg", folder / odd)
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    out = tmp_path / "maps"
    result = ok("predict", "--checkpoint", run_dir, "--images", folder, "--out", out, "--no-progress")
    assert "maps written   4" in result.output and "images failed  1" in result.output
    assert (out / f"{odd}.png").is_file()
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["maps"] == 4 and [f["file"] for f in doc["failures"]] == [str(folder / "gone.jpg")]
    h5 = tmp_path / "maps.h5"
    result = ok("predict", "--checkpoint", run_dir, "--images", folder, "--out", h5, "--format", "hdf5",
                "--no-progress")
    assert "maps written   3" in result.output
    with h5py.File(h5, "r") as f:
        failures = json.loads(f.attrs["failures"])
        assert {x["file"]: x["reason"] for x in failures}[str(folder / odd)] == (
            "its name is not UTF-8, which an HDF5 dataset's name must be")
        assert "a.jpg" in f and len(failures) == 2


def test_predict_leaves_other_runs_outputs_out_and_fails_when_no_image_could_be_mapped(image_folder, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(image_folder, folder)
    ok("predict", "--teacher", "classic", "--images", folder, "--out", folder / "maps_a", "--no-progress")
    second = ok("predict", "--teacher", "classic", "--images", folder, "--out", folder / "maps_c", "--no-progress")
    assert "maps written   3" in second.output, second.output  # not maps_a's 3 maps as well
    assert f"note: left out 1 folder of other runs' maps or labels below {folder} (maps_a)" in second.stderr
    assert not (folder / "maps_c" / "maps_a").exists()
    (folder / "sub" / "labels.json").write_text('{"annotations": []}')  # another tool's file of that name
    ok("predict", "--teacher", "classic", "--images", folder, "--out", folder / "maps.h5", "--format", "hdf5",
       "--compare-teacher", "classic", "--no-progress")
    assert (folder / "maps_compare").is_dir()  # the sheets beside an HDF5 of maps
    third = ok("predict", "--teacher", "classic", "--images", folder, "--out", tmp_path / "maps_d", "--no-progress")
    assert "maps written   3" in third.output and "(maps_a, maps_c, maps_compare)" in third.stderr, third.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"\xff\xd8junk")
    (bad / "b.jpg").write_bytes(b"")
    r = invoke("predict", "--teacher", "classic", "--images", bad, "--out", tmp_path / "none", "--no-progress")
    assert r.exit_code == 1 and r.output.strip().endswith("Error: no image could be mapped (2 failed)"), r.output
    assert not (tmp_path / "none" / "predictions.json").exists()  # no mark that the folder is complete
    r = invoke("predict", "--teacher", "classic", "--images", bad, "--out", tmp_path / "none.h5", "--format",
               "hdf5", "--no-progress")
    assert r.exit_code == 1 and "no image could be mapped (2 failed)" in r.output, r.output
    assert not (tmp_path / "none.h5").exists() and not list(tmp_path.glob("none.h5*"))


def test_a_model_whose_maps_are_not_finite_maps_scores_and_exports_nothing(mit, image_folder, tmp_path):
    """Broken weights (NaN) gave all-zero PNGs and `maps written 12`, an `export` whose check passed (a NaN
    difference is no larger than any bound) and an eval that died without naming an image."""
    from students import build_student

    model = build_student("fastsal_a", backbone_weights="none")
    model.head.weight.data.fill_(float("nan"))
    weights = tmp_path / "nan.pt"
    torch.save({"model": model.state_dict(), "student": "fastsal_a"}, weights)
    named = ["--student", "fastsal_a", "--weights", weights]
    r = invoke("predict", *named, "--images", image_folder, "--out", tmp_path / "maps", "--no-progress")
    assert r.exit_code == 1 and "no image could be mapped (3 failed)" in r.output, r.output
    assert r.stderr.count("the model's map of it is not finite (NaN or ±inf): its weights are broken") == 3
    assert not list((tmp_path / "maps").glob("*.png"))
    _, h5, _ = mit
    r = invoke("eval", *named, "--fixations", h5, "--out", tmp_path / "eval.json", "--no-progress")
    assert r.exit_code == 1 and "Error: no image could be scored" in r.output, r.output
    assert r.stderr.count("not finite") == len(MIT_IMAGES)
    r = invoke("export", *named, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "gives logits that are not finite (NaN or ±inf) on a random batch" in r.output
    assert not (tmp_path / "m.onnx").exists()


def test_the_scored_count_says_how_many_images_had_no_fixations():
    from pipeline.score.evaluate import EvalResult

    rows = [{"fixations": 5, "cc": 0.5}, {"fixations": 0, "cc": float("nan")}, {"fixations": 3, "cc": 0.7}]
    table = EvalResult("m", "d", ("cc",), per_image=rows).table()
    assert "images scored  3 (1 without fixations: in no mean)" in table and "0.6000" in table


def test_predict_holds_a_few_full_size_maps_at_a_time_whatever_the_folder_and_batch(tmp_path, monkeypatch):
    """A full-size map of a large photo is ~100 MB: `predict` makes each as it is written and waits for the PNG
    encoder once as many writes as threads are queued, so the maps alive stay a handful (24 photos of 24 MP took
    3.8 GB with a FastSal checkpoint, then 1.9 GB), and the maps are those of one map at a time."""
    import threading
    import time

    from pipeline.score import predict as P
    from pipeline.score.predictors import build_predictor

    alive, most, lock = [0], [0], threading.Lock()
    real_iter, real_write = P.Predictor.iter_log_densities, P._write_png

    def made(self, inputs, sizes):
        for m in real_iter(self, inputs, sizes):
            with lock:
                alive[0] += 1
                most[0] = max(most[0], alive[0])
            yield m

    def written(path, logd, density=True):
        time.sleep(0.05)  # an encoder slower than the model
        real_write(path, logd, density)
        with lock:
            alive[0] -= 1

    monkeypatch.setattr(P.Predictor, "iter_log_densities", made)
    monkeypatch.setattr(P, "_write_png", written)
    folder = Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017"
    predictor = build_predictor(teacher="classic", device="cpu")
    result = P.predict_folder(predictor, folder, tmp_path / "maps", batch_size=12, io_threads=2, progress=False)
    assert result.written == 12 and not result.failures
    assert most[0] <= 2 + 1, most[0]  # two queued writes, and the one just made
    monkeypatch.undo()
    again = P.predict_folder(predictor, folder, tmp_path / "plain", batch_size=5, io_threads=3, progress=False)
    assert again.written == 12
    for png in sorted((tmp_path / "plain").glob("*.png")):  # the same maps, however batched and queued
        assert png.read_bytes() == (tmp_path / "maps" / png.name).read_bytes()


def test_a_comparison_sheet_of_a_file_whose_name_is_not_utf8_is_drawn():
    """OpenCV's text drawing crashed the process (a segfault) on a lone surrogate, which is how Python names a
    file whose name is not UTF-8: `predict --compare-teacher` on such a file took the whole run down. The caption
    is drawn in ASCII."""
    from pipeline.score import sheets

    rgb = np.full((40, 60, 3), 128, np.uint8)
    logd = np.log(np.full((40, 60), 1 / 2400, np.float32))
    png = sheets.sheet_png(rgb, logd, logd, teacher_name="teacher", student_name="student", title="caf\udce9.jpg")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_naming_the_model_twice_a_teacher_on_onnx_and_a_file_for_a_folder_are_usage_mistakes(tmp_path, label_folder):
    """Exit status 2 with the usage line, before any model is built (they were exit 1, like a failure of the work)."""
    photo_file = next((Path(__file__).resolve().parents[1] / "samples" / "coco" / "val2017").glob("*.jpg"))
    cases = [
        (["eval", "--checkpoint", str(tmp_path), "--teacher", "classic", "--labels", str(label_folder)],
         "exactly one of --checkpoint, --teacher or --student (got --checkpoint, --teacher)"),
        (["profile", "--teacher", "classic", "--runtime", "onnx"],
         "--runtime onnx serves a student (--checkpoint or --student); a teacher runs with --runtime torch"),
        (["label", "folder", "--teacher", "classic", "--images", str(photo_file), "--out", str(tmp_path / "l")],
         "is a file"),
        (["predict", "--teacher", "classic", "--images", str(tmp_path), "--out", str(tmp_path)],
         "is the image folder itself"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "Usage: " in result.output and message in result.output, \
            (args, result.output)
    assert not (tmp_path / "l").exists()


def test_a_student_runs_at_the_image_size_asked_and_a_teacher_refuses_it(run_dir, label_folder, image_folder,
                                                                         tmp_path):
    """`--image-size` for eval and predict (profile and export had it): a student trained at 64x96 run at 128x192,
    its maps still at each image's size, and its name saying so; a teacher runs at its own size (usage error)."""
    import h5py

    from pipeline.common import images
    from pipeline.score.predictors import build_predictor

    at_own = ok("eval", "--checkpoint", run_dir, "--labels", label_folder, "--out", tmp_path / "own.json")
    at_128 = ok("eval", "--checkpoint", run_dir, "--labels", label_folder, "--image-size", "128x192",
                "--out", tmp_path / "big.json")
    own, big = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("own", "big"))
    assert big["model"].endswith(" at 128x192") and not own["model"].endswith("x192")
    assert big["metrics"]["cc"] != own["metrics"]["cc"], (at_own.output, at_128.output)  # another input, other maps
    ok("predict", "--checkpoint", run_dir, "--images", image_folder, "--out", tmp_path / "m.h5", "--format", "hdf5",
       "--image-size", "128x192", "--no-progress")
    model = build_predictor(checkpoint=str(run_dir), device="cpu")
    model.input_size = (128, 192)
    rgb = images.read_image(image_folder / "a.jpg", upright=False)
    with h5py.File(tmp_path / "m.h5") as f:
        assert f.attrs["model"].endswith(" at 128x192")
        stored = f["a.jpg"][()]
    assert stored.shape == IMAGE_SIZES["a.jpg"] and np.allclose(stored, model.log_density(rgb), atol=1e-5)
    r = invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", tmp_path / "t", "--image-size",
               "128x192")
    assert r.exit_code == 2 and "--image-size goes with a student" in r.output, r.output
    r = invoke("eval", "--checkpoint", run_dir, "--labels", label_folder, "--image-size", "100x100")
    assert r.exit_code == 2 and "needs H and W multiples of 32" in r.output, r.output


def test_a_set_of_several_stimulus_folders_is_also_scored_per_folder():
    """CAT2000's results are read per category (its 20 stimulus folders): each one's means and images, printed
    under the overall means and written to the JSON; a set of one folder, or label shards, has none."""
    from pipeline.score.evaluate import EvalResult

    rows = [{"path": f"Stimuli/{c}/{i}.jpg", "auc_judd": v, "cc": v / 2} for c, vs in
            (("Action", (0.8, 0.6)), ("Art", (0.5, float("nan")))) for i, v in enumerate(vs)]
    result = EvalResult("m", "cat2000 (4 images)", ("auc_judd", "cc"), per_image=rows,
                        settings={"dataset": "cat2000"})
    assert result.by_category == {"Action": {"auc_judd": pytest.approx(0.7), "cc": pytest.approx(0.35), "images": 2},
                                  "Art": {"auc_judd": 0.5, "cc": 0.25, "images": 2}}
    lines = result.table().splitlines()
    assert lines[-4].split() == ["category", "images", "auc_judd", "cc"]
    assert lines[-2].split() == ["Action", "2", "0.7000", "0.3500"] and lines[-1].split() == ["Art", "2", "0.5000",
                                                                                                 "0.2500"]
    assert result.to_json()["by_category"]["Art"] == {"auc_judd": 0.5, "cc": 0.25, "images": 2}
    one_folder = EvalResult("m", "mit1003", ("cc",), per_image=[{"path": f"ALLSTIMULI/{i}.jpeg", "cc": 0.1}
                                                               for i in range(3)], settings={"dataset": "mit1003"})
    shards = EvalResult("m", "labels", ("cc",), per_image=rows)
    assert not one_folder.by_category and not shards.by_category and "by_category" not in shards.to_json()
    assert "category" not in one_folder.table()


def test_the_other_fixations_counted_per_size_are_right_whatever_sizes_were_kept(monkeypatch):
    """Counts kept for the few map sizes last used: asked for more sizes, interleaved, from several threads,
    each image's counts are those of every other image's fixations on its grid."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.score.evaluate import OtherFixations, fixation_cells

    rng = np.random.default_rng(0)
    fy, fx = rng.random(300), rng.random(300)
    offsets = np.searchsorted(np.sort(rng.integers(0, 12, 300)), np.arange(13))
    negatives = OtherFixations(fy, fx, offsets)
    monkeypatch.setattr(OtherFixations, "KEEP", 2)
    asks = [(i, 3 + i % 5, 4 + i % 5) for i in range(12)] * 3  # five sizes, interleaved

    def check(ask) -> bool:
        i, h, w = ask
        other = np.ones(300, bool)
        other[offsets[i]:offsets[i + 1]] = False
        want = np.bincount(fixation_cells(fy[other], fx[other], h, w), minlength=h * w).reshape(h, w)
        return np.array_equal(negatives.counts(i, h, w), want)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, asks))
    assert len(negatives.grids) == 2


def test_predict_to_hdf5_on_a_disk_filling_up_stops_in_one_line_before_hdf5_runs_out(image_folder, tmp_path,
                                                                                      monkeypatch):
    """HDF5 that cannot close its file on a full disk made h5py crash the process (exit 139, a page of 'Exception
    ignored' first): the maps stop while there is room for HDF5 to close the file, with one line, and no file
    (nor temp file) is left."""
    import collections

    import pipeline.common.files as files

    Usage = collections.namedtuple("Usage", "total used free")
    free = iter([files.HDF5_CLOSING + 2**20] + [5 * 2**20] * 100)  # room for one map, then 5 MiB
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(2**30, 0, next(free)))
    out = tmp_path / "out" / "maps.h5"
    line = error_line(invoke("predict", "--teacher", "classic", "--images", image_folder, "--out", out, "--format",
                             "hdf5", "--device", "cpu", "--no-progress"))
    assert line.startswith(f"Error: cannot write the maps to {out} (No space left on device: 5 MiB free, the map of ")
    assert line.endswith(f"with room for HDF5 to close the file needs 32 MiB: {out.parent})")
    assert list(out.parent.iterdir()) == []


def test_predict_to_hdf5_removes_the_temp_file_a_killed_run_left_and_no_live_writers(image_folder, tmp_path):
    """A predict run killed mid-way (SIGKILL, out of memory) left its hidden temp HDF5 beside --out, as large as the
    maps it had written, through every later run: the next run deletes a temp of the same file whose writer is
    gone, and leaves a running writer's (and another file's) alone."""
    import subprocess
    import sys

    from pipeline.common.files import temp_name

    out = tmp_path / "maps.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = temp_name(out).with_name(temp_name(out).name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    live = temp_name(out)  # this process's: running
    other = temp_name(tmp_path / "other.h5").with_name(orphan.name.replace(".maps.h5", ".other.h5"))
    for p in (orphan, live, other):
        p.write_bytes(b"x" * 100)
    ok("predict", "--teacher", "classic", "--images", image_folder, "--out", out, "--format", "hdf5", "--device",
       "cpu", "--no-progress")
    assert out.is_file() and not orphan.exists() and live.exists() and other.exists()
