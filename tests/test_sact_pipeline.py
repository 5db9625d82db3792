"""SACT through the pipeline, by name only: trained from shards with the ponder cost logged, killed and resumed
exactly, reloaded from its checkpoint for profile, ONNX-free eval of its ponder map; its options checked."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli
from tests.conftest import label_classic, second_epoch_started, sigkill_when
from tests.test_train import write_mit1003

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "coco"
ARGS = ["--student", "sact", "--tau", "0.01", "--epochs", 2, "--lr", 0.02, "--backbone-weights", "none",
        "--batch-size", 2, "--workers", 0, "--shuffle-buffer", 8, "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return label_classic(SAMPLES, tmp_path_factory.mktemp("labels"), "--shard-size", 4, "--image-size", "64x96")


def final_model(run: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return torch.load(run / "checkpoints" / latest, weights_only=True)


def test_sact_trains_from_shards_is_killed_and_resumes_exactly_then_serves_its_ponder_map(labels, tmp_path):
    straight, run = tmp_path / "straight", tmp_path / "killed"
    r = invoke("train", "--labels", labels, "--run", straight, *ARGS)
    assert r.exit_code == 0, r.output
    header = (straight / "losses.csv").read_text().splitlines()[0]
    assert header == "epoch,step,global_step,loss,ponder_1,ponder_2,ponder_3,ponder_4"
    metrics = list(csv.DictReader(io.StringIO((straight / "metrics.csv").read_text())))
    assert list(metrics[0])[9:] == [*(f"ponder_{k}" for k in range(1, 5)), *(f"val_ponder_{k}" for k in range(1, 5))]
    # the validation ponder cost is the final model's mean ρ per block on the held-out shard (its test-time cost)
    from pipeline.train.checkpoints import student_from_checkpoint
    from pipeline.train.data import open_label_set, shard_loader

    model = student_from_checkpoint(straight)[0].eval()
    held_out = open_label_set(labels)
    images = torch.cat([b[0] for b in shard_loader(held_out, held_out.tars[-1:], batch_size=2)])
    with torch.no_grad():
        rho = model.forward_train(model.normalize(images)).logs
    for k in range(1, 5):
        assert float(metrics[-1][f"val_ponder_{k}"]) == pytest.approx(float(rho[f"ponder_{k}"]), rel=1e-5)
    total = sum(float(metrics[-1][f"val_ponder_{k}"]) for k in range(1, 5))
    head, *rows = [line.split() for line in r.output.splitlines()[:3]]  # the summary: Σ over blocks, and of val
    assert "  ponder Σ (train)  ponder Σ (val)  " in r.output.splitlines()[0]
    assert rows[-1][0] == "2" and rows[-1][7] == f"{total:.3f}", r.output
    config = json.loads((straight / "config.json").read_text())
    assert config["student_options"] == {"depth": 50, "tile": 1, "tau": 0.01}  # the defaults too (--tau given)
    from PIL import Image
    assert Image.open(straight / "curves.png").size[0] == 6 * 320  # loss per step, 4 per epoch, the ponder costs

    sigkill_when(["train", "--labels", labels, "--run", run, *ARGS], second_epoch_started(run), "the second epoch")
    r = invoke("train", "--labels", labels, "--run", run, *ARGS)
    assert r.exit_code == 0 and "resuming" in r.output, r.output
    assert (run / "losses.csv").read_text() == (straight / "losses.csv").read_text()
    resumed, uninterrupted = final_model(run), final_model(straight)
    assert resumed["student"] == "sact" and resumed["student_options"] == {"depth": 50, "tile": 1, "tau": 0.01}
    assert all(torch.equal(resumed["model"][k], v) for k, v in uninterrupted["model"].items())

    r = invoke("profile", "--checkpoint", run, "--device", "cpu", "--iters", 1)
    assert r.exit_code == 0, r.output
    assert "GFLOPs / image (dense)" in r.output and "GFLOPs / image (sparse)" in r.output
    ckpt = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    r = invoke("profile", "--student", "sact", "--weights", ckpt, "--tile", 2, "--tau", 0.5, "--device", "cpu")
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (  # it was taken, and changed nothing
        "Error: --tau weights sact's training loss alone and changes no map it computes: give it to `pipeline "
        "train`, not here"), r.output
    r = invoke("profile", "--student", "sact", "--weights", ckpt, "--tile", 2, "--device", "cpu",
               "--iters", 1)  # its halting shared in 2×2 tiles: other maps than it learnt
    assert r.exit_code == 0, r.output
    assert (f"warning: {ckpt} is a `pipeline train` checkpoint, trained at 64x96 with sigmoid maps, tile 1; "
            f"--student runs it at 192x256 with --student-output softmax, --tile 2: --checkpoint {ckpt} uses what it "
            "was trained with") in r.output  # (its --tau 0.01, not the default: not said)
    assert "ponder_3 (sparse)" in r.output and "executed_3 (sparse)" in r.output
    # from Python: the same checkpoint built with another tile is said (its tensors fit, its maps are others);
    # another --tau, which weights the loss alone, is not; student_from_checkpoint gives it ready for inference
    import warnings

    from pipeline.train.checkpoints import student_from_checkpoint
    from students import build_student
    from students.weights import OptionsDiffer

    with pytest.warns(OptionsDiffer, match=r"trained as sact with tile 1; this sact has tile 2, so its maps are not"):
        build_student("sact", weights=str(ckpt), tile=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_student("sact", weights=str(ckpt), tau=0.5)
    assert not student_from_checkpoint(run)[0].training  # (a forward in training mode moved BatchNorm's statistics)
    r = invoke("profile", "--student", "sact", "--weights", ckpt, "--depth", 101, "--device", "cpu", "--iters", 1)
    assert r.exit_code == 1 and r.output == (f"Error: {ckpt} is a `pipeline train` checkpoint of sact with depth 50 "
                                             f"there, --depth 101 here: give the same options (or --checkpoint {ckpt}, "
                                             "which reads them)\n"), r.output  # (was: 357 tensors missing)

    photos = sorted((SAMPLES / "val2017").glob("*.jpg"))[:4]
    h5 = tmp_path / "mit.h5"
    assert invoke("fixations", "mit1003", "--root", write_mit1003(tmp_path / "MIT1003", photos),
                  "--out", h5).exit_code == 0
    r = invoke("eval", "--checkpoint", run, "--fixations", h5, "--map", "ponder", "--device", "cpu",
               "--no-progress", "--out", tmp_path / "ponder.json")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "ponder.json").read_text())
    assert doc["images"] == 2 and len(doc["metrics"]) == 8  # scored on the half it was not calibrated on
    assert set(doc["calibration"]) == {"blur_frac", "center_weight", "auc_judd", "images", "center_auc_judd"}
    assert doc["calibration"]["images"] == 2 and "[ponder map]" in doc["model"]

    # its ponder maps written out, as the paper's figures show them: PNGs scaled per image, HDF5 the raw ρ sums
    import cv2
    import h5py

    from pipeline.score.predictors import build_predictor

    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos[:2]:
        shutil.copy(p, folder / p.name)
    r = invoke("predict", "--checkpoint", run, "--images", folder, "--out", tmp_path / "ponder", "--map", "ponder",
               "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ponder" / "predictions.json").read_text())["map"] == "ponder"
    r = invoke("predict", "--checkpoint", run, "--images", folder, "--out", tmp_path / "ponder.h5", "--map",
               "ponder", "--format", "hdf5", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    raw = build_predictor(checkpoint=str(run), device="cpu", map_name="ponder").raw_maps(
        [cv2.cvtColor(cv2.imread(str(folder / photos[0].name)), cv2.COLOR_BGR2RGB)])[0]
    with h5py.File(tmp_path / "ponder.h5") as f:
        assert f.attrs["content"] == "ponder"
        stored = f[photos[0].name][()]
    assert stored.shape == raw.shape and np.allclose(stored, raw, atol=1e-4) and stored.min() >= 4  # ρ ≥ 1 a block
    png = cv2.imread(str(tmp_path / "ponder" / f"{photos[0].name}.png"), cv2.IMREAD_UNCHANGED)
    assert png.shape == raw.shape and png.min() == 0 and png.max() == 255  # its own minimum to its maximum
    assert np.corrcoef(png.ravel(), raw.ravel())[0, 1] > 0.99
    r = invoke("predict", "--checkpoint", run, "--images", folder, "--out", tmp_path / "x", "--map", "ponder",
               "--compare-teacher", "classic")
    assert r.exit_code == 2 and "--map ponder goes with --runtime torch and without --compare-teacher" in r.output


def test_student_options_are_checked(labels, tmp_path):
    def error(*args):
        r = invoke("train", "--labels", labels, "--run", tmp_path / "run", "--backbone-weights", "none",
                   "--workers", 0, "--no-progress", *args)
        assert r.exit_code != 0
        return r.output

    assert "Invalid value for '--tile': must be at least 1, got 0" in error("--student", "sact", "--tile", "0")
    assert "Invalid value for '--tau': must be at least 0, got -1.0" in error("--student", "sact", "--tau", "-1")
    for given in ("inf", "nan"):  # --tau inf trained a model of NaN, saved it and exited 0
        assert f"Invalid value for '--tau': must be a finite number, got {given}" in error("--student", "sact",
                                                                                          "--tau", given)
    assert "'34' is not one of" in error("--student", "sact", "--depth", "34")
    assert "--tile is an option of act, sact, not of fastsal_a" in error("--student", "fastsal_a", "--tile", "2")
    out = error("--student", "sact", "--tile", "3", "--epochs", 1, "--batch-size", 2)  # 3 does not divide 16x24
    assert "tile 3 does not divide block 1's feature map of 16×24" in out
    assert not (tmp_path / "run" / "checkpoints").exists()
    r = invoke("profile", "--checkpoint", tmp_path, "--tau", "0.1")
    assert r.exit_code == 2 and "--tau goes with --student NAME" in r.output  # a usage mistake (it exited 1)
    r = invoke("predict", "--checkpoint", tmp_path, "--tile", "2", "--images", tmp_path, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--tile goes with --student NAME" in r.output, r.output


def test_profile_measures_sacts_computation_as_the_mean_over_real_images(labels, tmp_path):
    """The SACT paper's FLOPs are a mean over a validation set's images: with --images, profile's executed GFLOPs
    and ponder statistics are the mean of each image's; without, it says they are of one image of noise."""
    from pipeline.score.predictors import Predictor
    from pipeline.score.profile import profile
    from pipeline.score.quantize import calibration_images
    from students.sact import SACT
    from tests.test_sact import calibrated, variant

    model = variant({"sact": calibrated(SACT)}, "sact", bias=1.0)  # positions halt apart, image by image
    predictor = Predictor("sact", model, "logits", (64, 96), torch.device("cpu"))
    images = calibration_images(SAMPLES / "val2017", (64, 96), 3, option="--images")

    def sparse(result):
        return next(m for m in result.modes if m.mode == "sparse")

    alone = [profile(predictor, images=[image], iters=1, warmup=0) for image in images]
    each = [sparse(r) for r in alone]
    together = profile(predictor, images=images, images_from="three photos", iters=1, warmup=0)
    assert len({m.gflops for m in each}) == 3  # what it computes depends on the image
    assert sparse(together).gflops == pytest.approx(sum(m.gflops for m in each) / 3)
    assert sparse(together).stats["ponder_2"] == pytest.approx(sum(m.stats["ponder_2"] for m in each) / 3)
    assert together.inputs == "3 images of three photos"
    # as the paper reports it: mean ± sd over the images, and the encoder's FLOPs (the ResNet's units, where they
    # ran, and the halting) as a percentage of the dense path's on the same image, the decoder's left out
    import statistics

    assert sparse(together).gflops_sd == pytest.approx(statistics.pstdev(m.gflops for m in each))
    assert sparse(together).gflops_sd > 0
    dense = [r.modes[0] for r in alone]
    assert sparse(together).encoder_percent == pytest.approx(
        sum(100 * s.encoder_gflops / d.encoder_gflops for s, d in zip(each, dense)) / 3)
    assert 20 < sparse(together).encoder_percent < 100 and sparse(together).encoder_percent_sd > 0
    decoder = {round(m.gflops - m.encoder_gflops, 9) for m in (*each, *dense)}  # the same work on every image
    assert len(decoder) == 1 and 0 < decoder.pop() < 0.05 * dense[0].gflops
    assert each[0].gflops_sd is None and "±" not in alone[0].table()
    assert sparse(together).stats["ponder_total"] == pytest.approx(
        sum(sparse(together).stats[f"ponder_{k}"] for k in range(1, 5)))

    out = tmp_path / "p.json"
    r = invoke("profile", "--student", "sact", "--image-size", "64x96", "--images", labels, "--max-images", 2,
               "--iters", 1, "--out", out)
    assert r.exit_code == 0 and "note: sact's computation depends on the image" not in r.output, r.output
    assert "note: this sact is not trained for saliency: where its positions halt" in r.output  # its halting follows its weights
    assert json.loads(out.read_text())["inputs"] == f"2 images of {labels}"
    r = invoke("profile", "--student", "sact", "--image-size", "64x96", "--iters", 1)
    assert r.exit_code == 0 and "one image of random noise" in r.output
    assert "note: sact's computation depends on the image; --images DIR measures it on real ones" in r.stderr
    r = invoke("profile", "--student", "sact", "--images", tmp_path)  # no image there
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith(f"Error: --images {tmp_path}: no images")


def test_resume_compares_the_options_the_student_was_built_with_not_those_given(labels, tmp_path):
    """--depth 50 given on the second run is the default the first run built: it resumes (it was 'other settings
    (student_options)'); --tau 0.02 is refused, saying both values."""
    run = tmp_path / "run"
    base = ["train", "--labels", labels, "--run", run, *ARGS, "--steps-per-epoch", 1]
    first = invoke(*base, "--epochs", 1)
    assert first.exit_code == 0, first.output
    again = invoke(*base, "--epochs", 2, "--depth", 50)
    assert again.exit_code == 0 and "resuming" in again.stderr, again.output
    other = invoke(*base, "--epochs", 3, "--tau", 0.02)
    assert other.exit_code == 1 and ('other settings (student_options {"depth": 50, "tile": 1, "tau": 0.01} there, '
                                     '{"depth": 50, "tile": 1, "tau": 0.02} now)') in other.output, other.output
