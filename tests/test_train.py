"""`pipeline train`: exact resume after SIGKILL, distillation that works, hint stage, clear refusals."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.train.checkpoints import init_from
from pipeline.train.config import TrainConfig, TrainError
from pipeline.train.loop import Trainer
from tests.conftest import label_classic, second_epoch_started, sigkill_when

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "coco"
FAST = ["--backbone-weights", "none", "--batch-size", "2", "--workers", "0", "--shuffle-buffer", "8", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def final_model(run: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return torch.load(run / "checkpoints" / latest, weights_only=True)["model"]


def rows(path: Path, columns: int) -> list[list[str]]:
    return [line.split(",")[:columns] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """The bundled sample (12 photos) labelled by the classic teacher: 3 shards of 4, the last held out."""
    return label_classic(SAMPLES, tmp_path_factory.mktemp("labels"), "--shard-size", 4)


@pytest.fixture(scope="module")
def small_labels(tmp_path_factory) -> Path:
    """The sample labelled at 64x96 (SalGAN and FastSal both accept it): cheap for teacher-in-the-loop tests."""
    return label_classic(SAMPLES, tmp_path_factory.mktemp("small"), "--shard-size", 4, "--image-size", "64x96")


def write_mit1003(root: Path, photos: list[Path]) -> Path:
    """A tiny MIT1003 tree: the photos as stimuli, fixations clustered where the photo is brightest."""
    (root / "ALLSTIMULI").mkdir(parents=True)
    (root / "ALLFIXATIONMAPS").mkdir()
    rng = np.random.default_rng(0)
    for i, src in enumerate(photos):
        img = cv2.imread(str(src))
        name = f"i{i:03d}"
        cv2.imwrite(str(root / "ALLSTIMULI" / f"{name}.jpeg"), img)
        gray = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), (0, 0), 9)
        cy, cx = np.unravel_index(np.argmax(gray), gray.shape)
        h, w = gray.shape
        pts = np.zeros((h, w), np.uint8)
        for _ in range(12):
            y = int(np.clip(cy + rng.normal(0, h / 10), 0, h - 1))
            x = int(np.clip(cx + rng.normal(0, w / 10), 0, w - 1))
            pts[y, x] = 255
        cv2.imwrite(str(root / "ALLFIXATIONMAPS" / f"{name}_fixPts.jpg"), pts, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root


def summary_rows(output: str) -> list[list[str]]:
    """The rows of the summary table ``pipeline train`` prints at its end, but their seconds and img/s."""
    lines = output.splitlines()
    head = max(i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "train_loss"])
    rows = [line.split() for line in lines[head + 1:]]
    return [row[:-2] for row in rows[:next((i for i, row in enumerate(rows) if not row or not row[0].isdigit()),
                                            len(rows))]]


# -- exact resume --------------------------------------------------------------------------------

def test_killed_mid_epoch_then_resumed_gives_the_uninterrupted_losses_and_eval_scores_it(labels, tmp_path):
    args = ["train", "--labels", labels, "--student", "fastsal_a", "--epochs", 2, "--lr", 0.05,
            "--backbone-weights", "none", "--batch-size", 2, "--workers", 2, "--shuffle-buffer", 8, "--no-progress"]
    r = invoke(*args, "--run", tmp_path / "straight")
    assert r.exit_code == 0, r.output
    straight = tmp_path / "straight"

    run = tmp_path / "killed"
    losses = run / "losses.csv"
    sigkill_when([*args, "--run", run], second_epoch_started(run), "the second epoch")  # half-way through it
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] == 0
    assert not list((run / "checkpoints").glob(".*tmp*"))  # no half-written checkpoint under any name

    r = invoke(*args, "--run", run)
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output and "after epoch 1 (step 4)" in r.output
    assert summary_rows(r.output) == summary_rows(invoke(*args, "--run", straight).output)  # the whole run's
    assert "(epoch 1 trained before this call, as metrics.csv has them)" in r.output  # table, not its last epoch
    assert losses.read_text() == (straight / "losses.csv").read_text()  # every step's loss, to 8 digits
    assert rows(run / "metrics.csv", 6) == rows(straight / "metrics.csv", 6)
    resumed, uninterrupted = final_model(run), final_model(straight)
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = invoke(*args, "--run", run)  # finished: nothing to do
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert [row[0] for row in summary_rows(r.output)] == ["1", "2"] and "epochs 1-2 trained before" in r.output
    fewer = [1 if a == 2 and args[i - 1] == "--epochs" else a for i, a in enumerate(args)]
    r = invoke(*fewer, "--run", run, "--init", straight)  # nothing to do either; config.json still says what the run
    assert r.exit_code == 0 and "nothing to do" in r.output  # holds, and what it started from (not this --init)
    assert f"note: --init {straight} not used: the run resumes from its own checkpoint" in r.output
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert json.loads((run / "config.json").read_text())["init"] is None
    assert json.loads((run / "config.json").read_text())["labels_teacher"] == "classic"  # (curves.png names it)

    photos = sorted((SAMPLES / "val2017").glob("*.jpg"))[:5]
    h5 = tmp_path / "mit.h5"
    assert invoke("fixations", "mit1003", "--root", write_mit1003(tmp_path / "MIT1003", photos),
                  "--out", h5).exit_code == 0
    r = invoke("eval", "--checkpoint", run, "--fixations", h5, "--no-progress", "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    for metric in ("auc_judd", "auc_borji", "sauc", "nss", "cc", "kl_div", "sim", "ig"):
        assert f"  {metric} " in r.output
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["images"] == 5 and len(scores["metrics"]) == 8
    assert all(np.isfinite(v) for v in scores["metrics"].values())


def test_resume_refuses_a_checkpoint_of_other_settings_and_restart_starts_over(labels, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--labels", labels, "--run", run, "--epochs", 1, "--steps-per-epoch", 1, *FAST]
    assert invoke(*base).exit_code == 0
    r = invoke(*base[:-1], "--lr", "0.5", "--epochs", 2, "--no-progress")
    assert r.exit_code == 1 and "was trained with other settings (lr 0.01 there, 0.5 now)" in r.output
    assert "--restart" in r.output
    r = invoke(*base[:-1], "--lr", "0.5", "--epochs", 2, "--restart", "--no-progress")
    assert r.exit_code == 0, r.output
    assert [row[0] for row in rows(run / "metrics.csv", 1)] == ["epoch", "0", "1"]


# -- distillation works ------------------------------------------------------------------------------

TRAIN_PHOTOS = ["astronaut", "rocket", "camera", "coins", "immunohistochemistry", "colorwheel", "hubble_deep_field",
                "clock", "retina", "stereo_motorcycle", "cat", "grass", "gravel", "brick", "moon", "page", "text"]
HELD_OUT_PHOTOS = ["chelsea", "coffee"]


def skimage_photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    img = np.asarray(img[0] if isinstance(img, tuple) else img)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def distillation_images(folder: Path) -> None:
    """256 training images (crops of 17 photos, and collages of them) sorting before 32 crops of 2 other photos."""
    rng = np.random.default_rng(0)
    photos = {n: skimage_photo(n) for n in TRAIN_PHOTOS + HELD_OUT_PHOTOS}

    def crop(img, lo, hi):
        h, w = img.shape[:2]
        s = rng.uniform(lo, hi)
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        c = img[y:y + ch, x:x + cw]
        return c[:, ::-1] if rng.random() < 0.5 else c

    def write(name, img):
        small = cv2.resize(np.ascontiguousarray(img), (144, 96), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / name), cv2.cvtColor(small, cv2.COLOR_RGB2BGR))

    folder.mkdir()
    k = 0
    for name in TRAIN_PHOTOS:
        for _ in range(6):
            write(f"a{k:04d}.jpg", crop(photos[name], 0.5, 1.0))
            k += 1
    for j in range(256 - k):  # a background with up to three patches of other photos pasted on it
        bg = cv2.resize(np.ascontiguousarray(crop(photos[TRAIN_PHOTOS[rng.integers(17)]], 0.4, 1.0)), (144, 96))
        for _ in range(rng.integers(1, 4)):
            ph, pw = int(rng.integers(20, 60)), int(rng.integers(20, 80))
            patch = cv2.resize(np.ascontiguousarray(crop(photos[TRAIN_PHOTOS[rng.integers(17)]], 0.2, 0.6)), (pw, ph))
            y, x = rng.integers(0, 96 - ph), rng.integers(0, 144 - pw)
            bg[y:y + ph, x:x + pw] = patch
        write(f"b{j:04d}.jpg", bg)
    for name in HELD_OUT_PHOTOS:
        for j in range(16):
            write(f"z_{name}_{j:02d}.jpg", crop(photos[name], 0.5, 1.0))


def test_a_student_distilled_from_a_teacher_agrees_with_it_on_held_out_photos(tmp_path):
    distillation_images(tmp_path / "images")
    r = invoke("label", "folder", "--images", tmp_path / "images", "--teacher", "classic", "--out", tmp_path / "labels",
               "--shard-size", 32, "--image-size", "64x96", "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output
    labels = tmp_path / "labels" / "classic" / "images"
    held_out = json.loads((labels / "shard-000008.json").read_text())["keys"]
    assert len(held_out) == 32 and all(k.startswith(("z_chelsea", "z_coffee")) for k in held_out)

    r = invoke("train", "--labels", labels, "--run", tmp_path / "run", "--student", "fastsal_a", "--epochs", 12,
               "--lr", 0.05, "--milestones", "9", "--batch-size", 8, "--backbone-weights", "none", "--workers", 0,
               "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("eval", "--checkpoint", tmp_path / "run", "--labels", labels, "--no-progress",
               "--out", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["images"] == 32
    assert scores["metrics"]["cc"] >= 0.8, r.output
    first_epoch = float(rows(tmp_path / "run" / "metrics.csv", 4)[1][3])
    assert first_epoch < 0.5  # it learnt: an untrained student does not agree with the teacher


# -- hint stage, init, refusals -------------------------------------------------------------------

def test_hint_stage_regresses_the_teachers_features_and_starts_fastsal_a(small_labels, tmp_path):
    # SalGAN with random weights: a plumbing check of Eq. 1 (targets are its decoder features, whatever they are)
    run = tmp_path / "hint"
    r = invoke("train", "--labels", small_labels, "--run", run, "--student", "fastsal_c", "--stage", "hint",
               "--teacher", "salgan", "--teacher-weights", "random", "--epochs", 3, "--steps-per-epoch", 2,
               "--lr", 0.05, "--shuffle-buffer", 0, *FAST[:-3], "--no-progress")
    assert r.exit_code == 0, r.output
    assert "val_loss" in r.output and "nan" not in r.output  # the hint stage's summary: no metric it lacks
    losses = [float(x[3]) for x in rows(run / "losses.csv", 4)[1:]]
    assert len(losses) == 6 and losses[-2] < losses[0] and losses[-1] < losses[1]  # the same batches, later
    hint = final_model(run)

    config = TrainConfig(labels=(str(small_labels),), run=str(tmp_path / "a"), student="fastsal_a", init=str(run),
                         backbone_weights="none")
    model = Trainer(config).model.state_dict()
    encoder = [k for k in model if k.startswith("encoder.")]
    assert encoder and all(torch.equal(model[k], hint[k]) for k in encoder)
    assert model["adapt.0.0.weight"].shape != hint["adapt.0.0.weight"].shape  # A's own decoder starts fresh

    # the hint run's head never learnt a map: scoring or exporting it is refused (profiling its size and speed is not)
    scored = invoke("eval", "--checkpoint", run, "--labels", small_labels)
    assert scored.exit_code == 1 and "is of the hint stage" in scored.output and "fine-tune it first" in scored.output
    exported = invoke("export", "--checkpoint", run, "--out", tmp_path / "hint.onnx")
    assert exported.exit_code == 1 and "is of the hint stage" in exported.output
    assert not (tmp_path / "hint.onnx").exists()
    assert invoke("profile", "--checkpoint", run, "--iters", 1).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--student", "fastsal_a", "--stage", "hint", "--teacher", "salgan"],
     "fastsal_a has no hint stage: its features do not match a teacher's; hint-pretrain fastsal_c and start"),
    (["--student", "sact", "--stage", "hint", "--teacher", "salgan"],  # (no FastSal encoder fits its ResNet)
     "sact has no hint stage (its features do not match a teacher's) and no student with one has its encoder: "
     "train it with --stage finetune"),
    (["--student", "fastsal_c", "--stage", "hint"], "the hint stage needs --teacher"),
    (["--val-shards", "3"], "--val-shards 3 leaves no training shard (there are 3): label the images into more "
                            "shards (`pipeline label … --shard-size N --overwrite`), or hold out a label folder of its "
                            "own with --val-labels"),
    (["--student", "fastsal_c", "--stage", "hint", "--teacher", "classic"],
     "teacher 'classic' has no intermediate features for the hint stage; use salgan"),
    (["--teacher", "salgan"], "--teacher is for the hint stage (--stage hint)"),
    (["--student", "fastsal_c", "--stage", "hint", "--teacher", "deepgaze2", "--teacher-weights", "random"],
     "teacher 'deepgaze2''s hint features (128@/4, 256@/8, 512@/16, 512@/32) are not fastsal_c's (128@/2, 256@/4, "
     "512@/8, 512@/16: channels@/stride); use salgan"),  # refused before the teacher is built (or downloaded)
])
def test_bad_settings_are_one_clear_error(labels, tmp_path, args, message):
    """A usage mistake (exit 2, found as the options are parsed, so `pipeline run` finds it in a manifest) where the
    registries tell (the student, its stage, the hint teacher); an error (1) where the label folder does."""
    r = invoke("train", "--labels", labels, "--run", tmp_path / "run", *args, *FAST)
    assert r.exit_code == (1 if args[0] == "--val-shards" else 2) and message in r.output, r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


#: FAST for one step of one epoch
ONE = [*FAST, "--epochs", "1", "--steps-per-epoch", "1"]


def test_a_refused_hint_setting_with_restart_deletes_nothing(small_labels, tmp_path):
    """The settings are checked before --restart clears the run folder."""
    assert invoke("train", "--labels", small_labels, "--run", tmp_path / "run", *ONE).exit_code == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "run", "--restart", "--student", "fastsal_c",
               "--stage", "hint", "--teacher", "classic", *ONE)
    assert r.exit_code == 2 and "has no intermediate features" in r.output, r.output
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "-0.1"), ("--gamma", "inf"), ("--momentum", "2"),
                                           ("--seed", "-1"), ("--milestones", "3,1"), ("--loss-weights", "1,nan,1")])
def test_a_meaningless_number_is_a_usage_error_naming_its_option(small_labels, tmp_path, option, value):
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "run", *ONE, option, value)
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output, r.output
    assert not (tmp_path / "run").exists()


def test_labels_whose_every_sample_is_bad_train_nothing_and_say_so(small_labels, tmp_path):
    """A label folder whose samples all fail to decode at its recorded size (here: labels.json says 32x32)
    is an error after the first epoch, with no checkpoint, not a run of zero losses that exits 0."""
    odd = tmp_path / "odd"
    shutil.copytree(small_labels, odd)
    index = json.loads((odd / "labels.json").read_text())
    (odd / "labels.json").write_text(json.dumps({**index, "image_size": [32, 32]}))
    r = invoke("train", "--labels", odd, "--run", tmp_path / "run", *ONE, "--max-bad-samples", "1000", "--no-verify")
    assert r.exit_code == 1 and "epoch 1 read no usable sample from" in r.output, r.output
    assert not list(tmp_path.glob("run/checkpoints/*.pt"))


def save_as_written(path: Path, ckpt: dict) -> None:
    """``ckpt`` saved as the run's checkpoint ``path``, as a run that wrote it would have left it: its sha256 in
    ``latest.json`` (a checkpoint changed behind the run's back is passed over on resume)."""
    torch.save(ckpt, path)
    pointer = path.parent / "latest.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()),
                                   "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))


def test_a_checkpoint_altered_out_of_fit_is_one_sentence(small_labels, tmp_path):
    assert invoke("train", "--labels", small_labels, "--run", tmp_path / "run", *ONE).exit_code == 0
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    path = tmp_path / "run" / "checkpoints" / latest
    ckpt = torch.load(path, weights_only=False)
    del ckpt["model"][next(iter(ckpt["model"]))]
    save_as_written(path, ckpt)
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "run", *FAST, "--epochs", "2", "--steps-per-epoch", "1")
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1].startswith(f"Error: {path} does not fit this run ("), \
        r.output
    assert "Traceback" not in r.output


def test_the_same_label_folder_by_another_path_resumes_and_a_file_is_named_as_such(small_labels, tmp_path):
    """`--labels` compares as a place, not as a string: `…/x/../val2017` resumes a run made with `…/val2017`."""
    assert invoke("train", "--labels", small_labels, "--run", tmp_path / "run", *ONE).exit_code == 0
    detour = small_labels.parent / ".." / small_labels.parent.name / small_labels.name
    r = invoke("train", "--labels", detour, "--run", tmp_path / "run", *FAST, "--epochs", "2", "--steps-per-epoch", "1")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    r = invoke("train", "--labels", small_labels, "--val-labels", small_labels / "labels.json", "--run",
               tmp_path / "other", *ONE)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"Error: {small_labels / 'labels.json'} is a file, not a label folder (the folder holding labels.json)"), r.output


def test_a_run_that_names_a_file_is_one_clear_error_and_the_file_is_left_alone(labels, tmp_path):
    weights = tmp_path / "fastsal_a.pt"  # e.g. a checkpoint given to --run instead of --init
    weights.write_bytes(b"not mine to touch")
    r = invoke("train", "--labels", labels, "--run", weights, *FAST)
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"Error: --run {weights} is a file, not a run folder: give a folder (a new one, or a run's to resume it)"]
    assert weights.read_bytes() == b"not mine to touch"


def test_labels_that_are_not_finished_or_of_the_wrong_size_are_refused(labels, tmp_path):
    r = invoke("train", "--labels", tmp_path, "--run", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and "not a finished label folder" in r.output and "labels.json" in r.output
    r = invoke("label", "coco", "--teacher", "classic", "--coco-root", SAMPLES, "--out", tmp_path / "odd",
               "--shard-size", 6, "--image-size", "100x100", "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output
    odd = tmp_path / "odd" / "classic" / "val2017"
    r = invoke("train", "--labels", odd, "--run", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and "100x100 images; fastsal_a needs height and width in multiples of 32" in r.output
    r = invoke("train", "--labels", labels, "--val-labels", odd, "--run", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and "one teacher and one size per run" in r.output


def test_ray_workers_take_gpus_only_when_there_is_one_each_and_cuda_is_refused_without_them():
    from pipeline.train.ray_train import use_gpus

    assert use_gpus("auto", 2, 2) and not use_gpus("auto", 2, 1)  # auto: NCCL with a GPU each, else Gloo
    assert not use_gpus("cpu", 2, 8)  # --device cpu: Gloo even on a GPU cluster
    assert use_gpus("cuda", 4, 8) and use_gpus("cuda:0", 1, 1)
    for device, gpus in (("cuda", 0), ("cuda:1", 3)):
        with pytest.raises(TrainError) as e:
            use_gpus(device, 4, gpus)
        assert str(e.value).startswith(f"--device {device} with --ray-workers 4 needs 4 GPUs (one per worker, NCCL) "
                                       f"but the Ray cluster has {gpus} GPUs")
        assert "\n" not in str(e.value)


def test_torchrun_processes_find_their_rank_and_one_gpu_each(monkeypatch):
    from pipeline.train.torchrun import PeerFailed, device_for, launched

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched() is None  # a plain `pipeline train`
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert launched() is None  # torchrun with one process: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of the second machine
    assert launched() == (3, 1, 4)
    assert device_for("cpu", 1) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for("auto", 1) == "cpu"
    with pytest.raises(TrainError) as said:
        device_for("cuda", 0)
    assert str(said.value) == "--device cuda under torchrun: this machine has no GPU; use --device cpu (Gloo)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_for("auto", 1) == device_for("cuda:0", 1) == "cuda:1"  # its own GPU, whatever N says
    with pytest.raises(TrainError, match=r"needs GPU cuda:2 .* the machine has 2; start at most 2 per machine "
                                         r"\(--nproc-per-node 2\), or use --device cpu \(Gloo\)$") as said:
        device_for("cuda", 2)
    assert not isinstance(said.value, PeerFailed)  # the first process without a GPU says why...
    with pytest.raises(PeerFailed):
        device_for("cuda", 3)  # ...the others stop without a word


def test_under_torchrun_a_usage_error_is_printed_by_process_0_alone(labels, tmp_path, monkeypatch, capsys):
    """Every process parses the same command line; the others exit 2 without a word (`pipeline.cli.main`)."""
    import warnings

    import click

    from pipeline.cli.main import main

    monkeypatch.setattr(click.UsageError, "show", click.UsageError.show)  # main() changes them: restored after
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("WORLD_SIZE", "2")
    cases = [(["--labels", labels, "--ray-workers", "2"], "Error: --ray-workers under torchrun: launch with one of "
                                                          "them (torchrun already started 2 processes)"),
             (["--labels", tmp_path / "nowhere"], f"Error: Invalid value for '--labels': {tmp_path / 'nowhere'} does "
                                                  "not exist (label folders are made by `pipeline label`)")]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for args, said in cases:
            monkeypatch.setattr(sys, "argv", ["pipeline", "train", *map(str, args), "--run-dir", str(tmp_path / "run"),
                                              *FAST])
            with pytest.raises(SystemExit) as e:
                main()
            out, err = capsys.readouterr()
            assert e.value.code == 2 and out == ""
            assert err.strip().splitlines()[-1:] == ([said] if rank == "0" else []), err
    assert not (tmp_path / "run").exists()


def test_under_torchrun_process_0_checks_the_shards_once_and_a_corrupt_one_stops_every_process(labels, tmp_path):
    """2 processes (Gloo): process 0 verifies the shards and tells the other, which stops without a word; one
    `Error:` line in all, and no run folder contents. (torchrun's --redirects keeps each process's output apart.)"""
    corrupt = tmp_path / "labels"
    shutil.copytree(labels, corrupt)
    overwrite(corrupt / "shard-000001.tar", 600, b"garbage!")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--log-dir", tmp_path / "logs", "--redirects", "3", "-m", "pipeline", "train", "--labels",
                        corrupt, "--run-dir", tmp_path / "run", "--epochs", "1", *FAST],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "pipeline FAILED" in r.stderr, r.stderr  # torchrun's report
    said = {p.relative_to(tmp_path / "logs").parts[-2:]: p.read_text() for p in (tmp_path / "logs").rglob("*.log")}
    assert said == {
        ("0", "stdout.log"): "", ("1", "stdout.log"): "", ("1", "stderr.log"): "",
        ("0", "stderr.log"): f"Error: shard {corrupt / 'shard-000001.tar'} is corrupt: its sha256 is not the one its "
                             "marker and labels.json record (the file changed after labelling); re-run `pipeline "
                             "label` with the same options, which redoes it\n"}
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- what training reads is checked ---------------------------------------------------------------

def member(tar: Path, suffix: str, index: int) -> tarfile.TarInfo:
    with tarfile.open(tar) as t:
        return [m for m in t.getmembers() if m.name.endswith(suffix)][index]


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_shards_are_refused_and_without_verification_bad_samples_are_skipped(small_labels, tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(small_labels, labels)
    val = labels / "shard-000002.tar"  # held out: validation reads all of it
    keys = json.loads((labels / "shard-000002.json").read_text())["keys"]
    overwrite(val, member(val, ".jpg", 0).offset_data, b"\0\0\0\0")  # no JPEG start marker
    overwrite(val, member(val, ".png", 1).offset_data, b"\0\0\0\0")  # no PNG signature
    overwrite(val, member(val, ".json", 2).offset + 100, b"garbage!")  # a header that fails its checksum: the tar
    # ends there for tarfile, losing sample 2's json (its image and label were read) and all of sample 3
    base = ["train", "--labels", labels, "--epochs", 1, "--steps-per-epoch", 1, "--shuffle-buffer", 0, *FAST[:-3]]

    r = invoke(*base, "--run", tmp_path / "checked", "--no-progress")
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: shard {val} is corrupt: its sha256 is not the one its marker and labels.json "
                                "record (the file changed after labelling); re-run `pipeline label` with the same "
                                "options, which redoes it")
    assert not (tmp_path / "checked" / "checkpoints").exists()

    r = invoke(*base, "--run", tmp_path / "strict", "--no-verify", "--max-bad-samples", 2, "--no-progress")
    assert r.exit_code == 1
    assert f"warning: skipped sample {keys[0]} of {val}: its JPEG image does not decode" in r.output
    assert f"warning: skipped sample {keys[1]} of {val}: its classic.png label does not decode" in r.output
    assert r.output.splitlines()[-1].startswith("Error: 3 samples could not be read, more than --max-bad-samples 2")
    assert "re-run `pipeline label` with the same options" in r.output
    assert not (tmp_path / "strict" / "checkpoints").exists()

    r = invoke(*base, "--run", tmp_path / "lenient", "--no-verify", "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"warning: skipped 1 sample (after {keys[2]}) of {val}: the tar ends early" in r.output
    assert [row[8] for row in rows(tmp_path / "lenient" / "metrics.csv", 9)] == ["images", "2"]


def test_missing_shards_and_foreign_labels_are_one_sentence(small_labels, tmp_path):
    from pipeline.train.data import DataError, open_label_set, shard_loader

    missing = tmp_path / "missing"
    shutil.copytree(small_labels, missing)
    (missing / "shard-000001.tar").unlink()
    r = invoke("train", "--labels", missing, "--run", tmp_path / "run", *FAST)
    assert r.exit_code == 1 and r.output.strip() == (
        f"Error: shard {missing / 'shard-000001.tar'} is missing (labels.json lists it); re-run `pipeline label` "
        "with the same options, which redoes it")

    foreign = tmp_path / "foreign"  # shards of another teacher's labels under this index
    shutil.copytree(small_labels, foreign)
    index = json.loads((foreign / "labels.json").read_text())
    (foreign / "labels.json").write_text(json.dumps({**index, "label_extension": "salgan.png"}))
    r = invoke("train", "--labels", foreign, "--run", tmp_path / "run", "--steps-per-epoch", 1, *FAST)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 2, r.output  # the init note, the error
    assert "does not belong to its label folder: its samples hold classic.png labels, not the salgan.png its " \
           "labels.json names" in r.output

    labels = open_label_set(small_labels)  # a shard gone while training runs
    gone = str(tmp_path / "shard-000009.tar")
    with pytest.raises(DataError, match=f"shard {gone} cannot be read .*FileNotFoundError.*re-run `pipeline label`"):
        list(shard_loader(labels, [labels.tars[0], gone], batch_size=2, counts={labels.tars[0]: 4, gone: 4}))


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(small_labels, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--labels", small_labels, "--run", run, "--epochs", 2, "--steps-per-epoch", 1, *FAST]
    assert invoke(*args).exit_code == 0
    straight = final_model(run)
    losses = (run / "losses.csv").read_text()
    ckpts = run / "checkpoints"
    last = ckpts / "epoch-0001.pt"
    last.write_bytes(last.read_bytes()[:5000])  # truncated

    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert f"warning: cannot read weights file {last} (truncated" in r.output
    assert "resuming from epoch-0000.pt (epoch 1) instead" in r.output and "after epoch 1 (step 1)" in r.output
    assert (run / "losses.csv").read_text() == losses  # epoch 2 again, as it went the first time
    again = final_model(run)
    assert all(torch.equal(again[k], v) for k, v in straight.items())

    (ckpts / "latest.json").write_text('{"checkpoint": ')
    r = invoke(*args)
    assert r.exit_code == 0 and f"warning: {ckpts / 'latest.json'} is unreadable (JSONDecodeError" in r.output
    assert "resuming from epoch-0001.pt (epoch 2) instead" in r.output and "nothing to do" in r.output
    # the pointer names the checkpoint found again: the run folder is a finished run for what reads it
    pointer = json.loads((ckpts / "latest.json").read_text())
    assert (pointer["checkpoint"], pointer["epoch"]) == ("epoch-0001.pt", 1)
    assert pointer["sha256"] == hashlib.sha256((ckpts / "epoch-0001.pt").read_bytes()).hexdigest()
    r = invoke("eval", "--checkpoint", run, "--labels", small_labels, "--no-progress")
    assert r.exit_code == 0, r.output
    (ckpts / "latest.json").write_text('{"checkpoint": ')
    r = invoke("eval", "--checkpoint", run, "--labels", small_labels, "--no-progress")
    assert r.exit_code == 1 and f"Error: {ckpts / 'latest.json'} is unreadable" in r.output

    for p in ckpts.glob("epoch-*.pt"):
        p.write_bytes(b"")
    r = invoke(*args)
    assert r.exit_code == 1 and r.output.startswith(f"Error: no checkpoint in {ckpts} can be read (")
    assert r.output.strip().endswith("start over with --restart")


def test_a_checkpoint_changed_since_it_was_written_is_passed_over_and_checksums_find_it(small_labels, tmp_path):
    """`latest.json` records its checkpoint's sha256: a checkpoint whose bytes changed since (a flipped bit
    that torch would load as other weights) is passed over on resume like a truncated one, and `pipeline run
    --checksums` finds the train step's output corrupt, and `eval` of the run refuses it; untouched, all take
    it. (And a run whose config.json
    is unreadable is an unfinished step, not a traceback of `pipeline status`.)"""
    from pipeline.manifest.steps import _verify_train

    run = tmp_path / "run"
    args = ["train", "--labels", small_labels, "--run", run, "--epochs", 2, "--steps-per-epoch", 1, *FAST]
    assert invoke(*args).exit_code == 0
    straight = final_model(run)
    assert _verify_train(run, checksums=True) == ""
    last = run / "checkpoints" / "epoch-0001.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4] = bytes(255 - b for b in data[len(data) // 2:len(data) // 2 + 4])
    last.write_bytes(bytes(data))
    assert _verify_train(run, checksums=False) == ""  # sizes and names alone cannot tell
    assert "is not the checkpoint latest.json recorded (its sha256 differs)" in _verify_train(run, checksums=True)
    r = invoke("eval", "--checkpoint", run, "--labels", small_labels, "--no-progress")  # nor scores other weights
    assert r.exit_code == 1 and r.output.startswith(f"Error: {last} is not the checkpoint latest.json recorded"), \
        r.output
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert f"warning: {last} is not the checkpoint latest.json recorded" in r.output
    assert "resuming from epoch-0000.pt (epoch 1) instead" in r.output
    again = final_model(run)
    assert all(torch.equal(again[k], v) for k, v in straight.items())
    assert _verify_train(run, checksums=True) == ""
    for text in ("{}", '{"epochs": ', '["epochs"]'):  # a run's config.json emptied or cut short: made again
        (run / "config.json").write_text(text)
        assert "config.json is not the settings `pipeline train` writes" in _verify_train(run, checksums=False)


def test_a_run_folder_inside_a_label_folder_is_refused(small_labels, tmp_path):
    """`--run` that is a label folder (or lies in one) would write checkpoints and logs among its shards: refused
    in one line, nothing written; beside it is fine."""
    before = sorted(p.name for p in small_labels.iterdir())
    for run in (small_labels, small_labels / "run", f"file://{small_labels}/run"):
        r = CliRunner().invoke(cli, [str(a) for a in ["train", "--labels", small_labels, "--run", run, "--epochs", 1,
                                                      "--steps-per-epoch", 1, *FAST]])
        said = small_labels / "run" if "://" in str(run) else run  # (file:///abs/path: the path it names)
        assert r.exit_code == 1 and f"Error: --run {said} lies in the label folder {small_labels} (--labels)" in \
            r.output, r.output
    assert sorted(p.name for p in small_labels.iterdir()) == before
    other = tmp_path / "other"  # a label folder that is none of the run's inputs (another split's, one unfinished)
    for mark in ("labels.json", "shard-000000.json"):
        other.mkdir(exist_ok=True)
        (other / mark).write_bytes((small_labels / mark).read_bytes())
        r = CliRunner().invoke(cli, [str(a) for a in ["train", "--labels", small_labels, "--run", other / "run",
                                                      "--epochs", 1, "--steps-per-epoch", 1, *FAST]])
        assert r.exit_code == 1 and r.output == (f"Error: --run {other / 'run'} lies in the label folder {other}: give "
                                                 "a run folder outside it\n"), r.output
        shutil.rmtree(other)
    other.mkdir()
    (other / "labels.json").write_text('["cat", "dog"]')  # a project's own labels.json: no label folder
    r = CliRunner().invoke(cli, [str(a) for a in ["train", "--labels", small_labels, "--run", other / "run",
                                                  "--epochs", 1, "--steps-per-epoch", 1, *FAST]])
    assert r.exit_code == 0, r.output


def test_one_train_per_run_folder(small_labels, tmp_path):
    from pipeline.train.loop import run_lock

    run = tmp_path / "run"
    args = ["train", "--labels", small_labels, "--run", run, "--epochs", 1, "--steps-per-epoch", 1, *FAST]
    with run_lock(run):
        r = invoke(*args)
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: run folder {run} is in use by another process (`pipeline train`, "
                               f"pid {os.getpid()} on this host ({socket.gethostname()}), since ")
    assert len(r.output.strip().splitlines()) == 1 and not (run / "checkpoints").exists()

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid}))  # left by a SIGKILL
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert f"note: took over the stale lock {run / '.lock'} of pid {gone.pid}" in r.output
    assert not (run / ".lock").exists()  # let go at the end
    # a container restarted in place: the same host and pid (1), its predecessor's lock of another start time
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}))
    r = invoke(*args)
    assert r.exit_code == 0 and f"note: took over the stale lock {run / '.lock'} of pid {os.getpid()}" in r.output

    (run / ".lock").write_text(json.dumps({"host": "node-7", "pid": 4242}))
    r = invoke(*args[:-1], "--epochs", 2, "--no-progress")
    assert r.exit_code == 1 and "(pid 4242 on host node-7); this host cannot tell whether it still runs: if it " \
                                f"does not, delete {run / '.lock'}" in r.output


def test_sigterm_stops_a_training_run_as_ctrl_c_does(small_labels, tmp_path):
    """`kill PID` (`timeout`, Slurm's and Kubernetes' stop) ended `pipeline train` at once, exit status 143,
    without a word and with its lock left behind; it is Ctrl-C's line and exit status 130, the lock let go."""
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--labels", small_labels, "--run", run,
                             "--epochs", "1000", *FAST], stderr=subprocess.PIPE, text=True)
    said = [proc.stderr.readline()]  # the first line (the initial weights) is written once the lock is held
    proc.send_signal(signal.SIGTERM)
    said += proc.stderr.readlines()
    assert proc.wait(timeout=60) == 130, said
    assert said[-1] == "interrupted: the run resumes after its last finished epoch when the same command runs again\n"
    assert not (run / ".lock").exists()


def test_the_next_epochs_loader_starts_before_this_epoch_ends_and_changes_nothing(small_labels, tmp_path,
                                                                                   monkeypatch):
    """With loader workers, each epoch's shard loader (its processes, its first batches) is started a few steps
    before the previous epoch's last step, so that its start-up overlaps the end of that epoch and validation
    instead of being paid anew at every epoch; each epoch's loader is started once; and the run is the same
    as one whose loaders start at their epoch's first step (same losses and weights)."""
    from pipeline.train import loop

    events = []
    real_loader, real_epoch = loop.Trainer.loader, loop.Trainer.train_epoch

    def loader(self, tars, epoch, train):
        if train:
            events.append(("loader", epoch))
        return real_loader(self, tars, epoch, train)

    def train_epoch(self, epoch, bar, log_file):
        class Bar:
            def update(self, n):
                events.append(("step", epoch))

            def set_postfix_str(self, text):
                bar.set_postfix_str(text)
        return real_epoch(self, epoch, Bar(), log_file)

    monkeypatch.setattr(loop.Trainer, "loader", loader)
    monkeypatch.setattr(loop.Trainer, "train_epoch", train_epoch)
    args = ["train", "--labels", small_labels, "--epochs", 3, "--val-shards", 1, *FAST, "--workers", 1]
    assert invoke(*args, "--run", tmp_path / "ahead").exit_code == 0
    assert [e for e in events if e[0] == "loader"] == [("loader", 0), ("loader", 1), ("loader", 2)]
    for epoch in (1, 2):
        started = events.index(("loader", epoch))
        last_step = max(i for i, e in enumerate(events) if e == ("step", epoch - 1))
        assert started < last_step, events  # started while the previous epoch still had a step to run

    monkeypatch.setattr(loop.Trainer, "start_epoch", lambda self, epoch: None)  # every loader at its first step
    assert invoke(*args, "--run", tmp_path / "plain").exit_code == 0
    a, b = final_model(tmp_path / "ahead"), final_model(tmp_path / "plain")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert rows(tmp_path / "ahead" / "losses.csv", 4) == rows(tmp_path / "plain" / "losses.csv", 4)


def test_validating_on_a_training_folder_is_warned_of(labels, tmp_path, monkeypatch):
    """The same folder spelled another way (./x/) too: its scores would be on images the student trained on."""
    monkeypatch.chdir(labels.parent)
    r = invoke("train", "--labels", labels.name, "--val-labels", f"./{labels.name}/", "--run", tmp_path / "run",
               "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 2, "--backbone-weights", "none", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (f"warning: --val-labels {labels.name} is also a --labels folder: the validation scores are on training "
            "images") in r.stderr


def test_held_out_shards_with_no_samples_are_no_validation_not_scores_of_0(tmp_path):
    """A folder whose last shard holds failed images alone (a zero-byte file): said (once, by `pipeline train`, as
    a `warning:` line), and validation is nan, not 0.0000 as if measured (nan is left out of the epoch line, the
    curves and TensorBoard, written as such in metrics.csv)."""
    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(SAMPLES / "val2017" / "000000000139.jpg", tmp_path / "images" / name)
    (tmp_path / "images" / "zzz.jpg").touch()
    invoke("label", "folder", "--images", tmp_path / "images", "--teacher", "classic", "--out", tmp_path / "labels",
           "--image-size", "64x96", "--shard-size", 1, "--executor", "local", "--no-progress")
    folder = tmp_path / "labels" / "classic" / "images"
    trainer = Trainer(TrainConfig(labels=(str(folder),), run=str(tmp_path / "run"), backbone_weights="none",
                                  workers=0, batch_size=2))
    assert trainer.no_validation() == (
        f"the held-out shard shard-000002.tar of {folder} holds no samples (every image in it failed to label): no "
        "validation, its columns are nan; hold out more with --val-shards 2, or give --val-labels")
    assert all(math.isnan(v) for v in trainer.validate().values())
    trainer = Trainer(TrainConfig(labels=(str(folder),), run=str(tmp_path / "run"), backbone_weights="none",
                                  workers=0, batch_size=2, val_shards=2))
    assert trainer.no_validation() == ""

    (tmp_path / "broken").mkdir()  # a training set of failed images alone: refused before the run folder is made
    (tmp_path / "broken" / "a.jpg").touch()
    invoke("label", "folder", "--images", tmp_path / "broken", "--teacher", "classic", "--out", tmp_path / "labels",
           "--image-size", "64x96", "--executor", "local", "--no-progress", "--max-failure-rate", 1)
    broken = tmp_path / "labels" / "classic" / "broken"
    with pytest.raises(TrainError) as e:
        Trainer(TrainConfig(labels=(str(broken),), val_labels=str(folder), run=str(tmp_path / "run2"),
                            backbone_weights="none", workers=0, batch_size=2))
    assert str(e.value) == (f"the training shards of {broken} hold no samples (every image in them failed to label; "
                            "each shard's shard-*.json marker lists why): nothing to train on")
    assert not (tmp_path / "run2").exists()


def test_val_shards_is_no_setting_of_a_run_that_validates_on_val_labels(tmp_path):
    """Resuming a run with --val-labels and another --val-shards was refused, though --val-shards holds nothing out
    there; without --val-labels it holds out the shards validated on, and stays a setting of the run."""
    from pipeline.train.loop import check_resumable

    def resume(before: TrainConfig, now: TrainConfig) -> None:
        check_resumable(tmp_path / "ckpt.pt", {"config": before.resume_key(), "student_options": {}}, now, {}, {})

    run = dict(labels=("a",), run="r")
    resume(TrainConfig(**run, val_labels="v"), TrainConfig(**run, val_labels="v", val_shards=2))
    with pytest.raises(TrainError, match="val_shards 1 there, 2 now"):
        resume(TrainConfig(**run), TrainConfig(**run, val_shards=2))


def test_a_checkpoint_the_filesystem_refuses_is_one_sentence_and_the_last_one_stays(tmp_path):
    """A full disk (here: a file-size limit, EFBIG) made torch's zip writer raise "[enforce fail at
    inline_container.cc] unexpected pos" with a traceback; latest.json must still name the last good one."""
    import resource
    import signal

    from pipeline.train.checkpoints import CheckpointError, save_checkpoint

    save_checkpoint(tmp_path, 0, {"w": torch.zeros(10)})
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limit[1]))
    try:
        with pytest.raises(CheckpointError, match=r"^cannot write .*epoch-0001\.pt \(File too large\); the run "
                                                  r"resumes after its last saved"):
            save_checkpoint(tmp_path, 1, {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0000.pt", "latest.json"]  # no temp file left
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "epoch-0000.pt"


@pytest.mark.parametrize("where", ["write", "hash"])
def test_ctrl_c_while_a_checkpoint_is_written_is_the_interrupt_not_a_failed_write(tmp_path, monkeypatch, where):
    """torch's zip writer turned an interrupt in a save into "unexpected pos", which train reported as a disk that
    refused the checkpoint (exit 1, the step failed, not interrupted): the interrupt is raised as it came, wherever
    it lands (in the file's write, or in the digest between writes), and no temp file is left."""
    from pipeline.train import checkpoints

    real = checkpoints._Hashing.__init__
    calls = []

    class Interrupted:  # the checkpoint's file (or its digest), whose third write (update) is where Ctrl-C lands
        def __init__(self, inner, method):
            self.inner, self.method = inner, method

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def call(self, data):
            calls.append(len(data))
            if len(calls) == 3:
                raise KeyboardInterrupt
            return getattr(self.inner, self.method)(data)

    def init(self, f):
        real(self, Interrupted(f, "write") if where == "write" else f)
        if where == "hash":
            self.sha256 = Interrupted(self.sha256, "update")
        target = self.f if where == "write" else self.sha256
        setattr(target, target.method, target.call)

    checkpoints.save_checkpoint(tmp_path, 0, {"w": torch.zeros(10)})
    monkeypatch.setattr(checkpoints._Hashing, "__init__", init)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(tmp_path, 1, {"w": torch.zeros(100_000)})
    assert len(calls) >= 3 and sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0000.pt", "latest.json"]


def test_logs_cut_short_by_a_crash_or_of_other_columns_are_kept_on_resume(tmp_path, capsys):
    """A resume trims the logs to the epochs it keeps. A NUL tail (a crash mid-write) was `Error: invalid literal
    for int()`, naming no file, and a file of other columns was emptied without a word."""
    from pipeline.train.logs import LOSS_HEADER, keep_rows

    losses = tmp_path / "losses.csv"
    losses.write_bytes(b"epoch,step,global_step,loss\n0,0,1,0.5\n1,0,2,0.4\n2,0,3,0.3\n3,0,\0\0\0\0")
    keep_rows(losses, LOSS_HEADER, 2)
    assert losses.read_text() == "epoch,step,global_step,loss\n0,0,1,0.5\n1,0,2,0.4\n"
    assert capsys.readouterr().err == f"warning: {losses}: left out 1 unreadable row (cut short by a crash)\n"

    old = "epoch,step,loss\n0,0,0.5\n"
    losses.write_text(old)
    keep_rows(losses, LOSS_HEADER, 2)
    assert losses.read_text() == "epoch,step,global_step,loss\n" and (tmp_path / "losses.csv.old").read_text() == old
    assert f"its rows are kept in {tmp_path / 'losses.csv.old'}" in capsys.readouterr().err


def test_curves_say_when_the_training_loss_holds_the_human_maps_term(tmp_path, monkeypatch):
    """With --gt-maps the training loss (Eq. 2 with the human maps' term) is about twice the validation loss (the
    teacher's term alone), plotted on one axis: the legend says so."""
    from matplotlib.figure import Figure

    from pipeline.train.logs import metrics_header, plot_curves

    (tmp_path / "metrics.csv").write_text(",".join(metrics_header(())) + "\n0,1.2,0.6,0.4,0.3,0.5,0.01,1.0,8\n")
    (tmp_path / "losses.csv").write_text("epoch,step,global_step,loss\n0,0,1,1.2\n")
    legends, titles, save = [], [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (legends.append(
        [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]),
        titles.append([ax.get_title() for ax in fig.axes]), save(fig, *a, **k)))
    for config in ({}, {"gt_maps": "salicon/maps/train", "labels_teacher": "deepgaze"}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        plot_curves(tmp_path)
    assert legends == [["validation", "training (mean)"], ["validation", "training (mean, with the human maps' term)"]]
    # the metrics are against the teacher whose labels the run learnt (a run from before it was recorded: "teacher")
    assert titles[0][2] == "validation CC vs teacher" and titles[1][2:] == [
        "validation CC vs deepgaze", "validation KL vs deepgaze", "validation NSS vs deepgaze"]


def test_a_long_runs_loss_per_step_is_read_through_its_running_mean_and_short_tick_labels(tmp_path, monkeypatch):
    """100 epochs of COCO are ~370,000 steps: their losses drew a solid band, and tick labels of six digits ran
    into each other ("50000100000150000"). Now thousands read "50k", and a running mean is drawn over them."""
    from matplotlib.figure import Figure

    from pipeline.train.logs import metrics_header, plot_curves

    (tmp_path / "metrics.csv").write_text(",".join(metrics_header(())) + "\n0,1.2,0.6,0.4,0.3,0.5,0.01,1.0,8\n")
    steps = 40_000
    (tmp_path / "losses.csv").write_text("epoch,step,global_step,loss\n" + "".join(
        f"0,{i},{i + 1},{1 + (i % 7) / 10 - i / steps:.4f}\n" for i in range(steps)))
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (save(fig, *a, **k), drawn.append(fig)))
    plot_curves(tmp_path)
    ax = drawn[0].axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(len(t) <= 4 for t in labels) and "20k" in labels, labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["each step", "mean of 400 steps"]
    mean = ax.get_lines()[1].get_ydata()
    assert len(mean) == steps - 399 and abs(mean[0] - 1.3) < 0.01 and abs(mean[-1] - 0.3) < 0.01  # (the trend)


def test_the_ponder_panel_has_a_tick_per_epoch_and_its_legend_covers_no_point(tmp_path, monkeypatch):
    """SACT's panel of ponder costs, as the others: epochs 1 and 2 ticked as such (it read 0.945 0.960 … for one
    epoch), and its legend of eight entries beside the axes, inside the figure, not over a point."""
    from matplotlib.figure import Figure

    from pipeline.train.logs import metrics_header, plot_curves

    (tmp_path / "metrics.csv").write_text(",".join(metrics_header([f"ponder_{k}" for k in range(1, 5)])) + "\n"
                                          "0,0.77,0.74,-0.36,0.26,-0.25,0.01,1.8,16,3.9,4.9,6.7,3.9,3.9,4.9,6.7,3.9\n"
                                          "1,0.75,0.72,-0.30,0.25,-0.20,0.01,1.7,16,3.8,4.8,6.6,3.8,3.8,4.8,6.5,3.8\n")
    (tmp_path / "losses.csv").write_text("epoch,step,global_step,loss\n0,0,1,0.8\n1,0,2,0.7\n")
    drawn, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (save(fig, *a, **k),
                                                                 drawn.append((fig, fig.canvas.get_renderer()))))
    plot_curves(tmp_path)
    fig, renderer = drawn[0]
    ax = fig.axes[-1]
    assert ax.get_title() == "ponder cost ρ per block" and list(ax.get_xticks()) == [1, 2]
    legend = ax.get_legend().get_window_extent(renderer)
    assert len(ax.get_legend().get_texts()) == 8
    assert fig.bbox.x0 <= legend.x0 and legend.x1 <= fig.bbox.x1  # drawn whole
    points = [xy for line in ax.lines for xy in ax.transData.transform(line.get_xydata())]
    assert len(points) == 16 and not [xy for xy in points if legend.contains(*xy)]


def test_a_sact_run_from_before_validation_ponder_costs_were_logged_resumes_with_its_rows(tmp_path, capsys):
    """Its metrics.csv lacks the val_ponder_N columns: its rows are kept (those cells empty, read as not measured),
    not put aside as a file of other columns; the summary and the curves take them."""
    from pipeline.train.logs import keep_rows, metrics_header, plot_curves, read_metrics, summary_table

    names = [f"ponder_{k}" for k in range(1, 5)]
    (tmp_path / "metrics.csv").write_text(",".join(metrics_header(())[:9] + names) + "\n"
                                          "0,0.9,0.85,0.1,0.3,0.1,0.02,0.8,8,4,4,4,4\n1,0.8,0.7,0.2,0.3,0.2,0.02,0.6,8,3,4,4,2\n")
    (tmp_path / "losses.csv").write_text("epoch,step,global_step,loss\n0,0,1,0.9\n1,0,2,0.8\n")
    keep_rows(tmp_path / "metrics.csv", metrics_header(names), 2)
    assert capsys.readouterr().err == "" and not (tmp_path / "metrics.csv.old").exists()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",ponder_4,val_ponder_1,val_ponder_2,val_ponder_3,val_ponder_4")
    assert rows[2] == "1,0.8,0.7,0.2,0.3,0.2,0.02,0.6,8,3,4,4,2,,,,"
    results = read_metrics(tmp_path)
    assert results[1].logs == {"ponder_1": 3, "ponder_2": 4, "ponder_3": 4, "ponder_4": 2}
    assert math.isnan(results[1].val["val_ponder_1"]) and results[1].val["val_cc"] == 0.2
    assert summary_table(results).splitlines()[2].split()[6:8] == ["13.000", "-"]  # Σ (train), Σ (val): not logged
    assert plot_curves(tmp_path).is_file()

    older = "epoch,train_loss,val_loss,val_cc,val_kl,val_nss,lr,seconds\n0,0.9,0.85,0.1,0.3,0.1,0.02,0.8\n"  # no images
    (tmp_path / "metrics.csv").write_text(older)
    keep_rows(tmp_path / "metrics.csv", metrics_header(names), 2)  # more than validation columns missing: aside
    assert (tmp_path / "metrics.csv.old").read_text() == older and "its rows are kept in" in capsys.readouterr().err


def test_a_long_setting_that_differs_is_shown_where_it_differs():
    """Values were cut at 57 characters: two label folders differing at their ends read the same there and now."""
    from pipeline.train.config import TrainConfig, TrainError
    from pipeline.train.loop import check_resumable

    base = "/data/" + "a-rather-long-folder-name-for-the-dataset/" * 2
    then = TrainConfig(labels=(base + "train-v1",), run="r")
    with pytest.raises(TrainError) as e:
        check_resumable(Path("r/epoch-0000.pt"), {"config": then.resume_key(), "student_options": {}},
                        TrainConfig(labels=(base + "train-v2",), run="r"), {}, {})
    said = str(e.value)
    assert said.startswith("r/epoch-0000.pt was trained with other settings (labels ...") and "train-v1\"] there" \
        in said and "train-v2\"] now" in said, said


def test_the_two_newest_checkpoints_are_kept_by_epoch_number_past_epoch_9999(tmp_path):
    """Names were compared as text: epoch-10000.pt sorts before epoch-9999.pt, and was deleted as it was written."""
    from pipeline.train.checkpoints import save_checkpoint

    for epoch in (9998, 9999, 10000, 10001):
        save_checkpoint(tmp_path, epoch, {"w": torch.zeros(1)})
    assert sorted(p.name for p in tmp_path.glob("epoch-*.pt")) == ["epoch-10000.pt", "epoch-10001.pt"]
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "epoch-10001.pt"


def test_ray_train_workers_get_weights_files_as_absolute_paths(tmp_path, monkeypatch):
    """They run in another working directory: a relative --teacher-weights or --backbone-weights file was 'not
    found' after Ray had started (names and URLs stay as they are)."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.ray_train import _absolute

    monkeypatch.chdir(tmp_path)
    Path("salgan.pt").write_bytes(b"weights")
    Path("mnv2.pth").write_bytes(b"weights")
    seen = _absolute(TrainConfig(labels=("l",), run="r", teacher_weights="salgan.pt", backbone_weights="mnv2.pth"))
    assert (seen.teacher_weights, seen.backbone_weights) == (str(tmp_path / "salgan.pt"), str(tmp_path / "mnv2.pth"))
    for names in (("random", "imagenet"), (None, "none"), ("https://example.org/w.pt", "imagenet")):
        seen = _absolute(TrainConfig(labels=("l",), run="r", teacher_weights=names[0], backbone_weights=names[1]))
        assert (seen.teacher_weights, seen.backbone_weights) == names


def test_ray_workers_on_a_finished_run_start_no_ray_and_still_refuse_other_settings(small_labels, tmp_path,
                                                                                      monkeypatch):
    """`train --ray-workers 2` on a run that holds every epoch started Ray Train (half a minute) to say "nothing to
    do", with a warning that the run was trained by another number of processes. It says so at once; other
    settings are refused as a resume refuses them, and a run with epochs left goes to Ray."""
    pytest.importorskip("ray.train")
    from pipeline.train import ray_train

    run = tmp_path / "run"
    assert invoke("train", "--labels", small_labels, "--run", run, "--epochs", 1, "--steps-per-epoch", 1,
                  *FAST).exit_code == 0
    started = []
    monkeypatch.setattr(ray_train, "_fit", lambda *args, **kwargs: started.append(kwargs) or [])
    r = CliRunner().invoke(cli, ["train", "--ray-workers", "2", "--labels", str(small_labels), "--run", str(run),
                                 "--epochs", "1", "--steps-per-epoch", "1", *FAST])
    assert r.exit_code == 0 and started == [], r.output
    assert "resuming" in r.stderr and "nothing to do: every epoch is already trained" in r.output
    assert "warning" not in r.output
    r = CliRunner().invoke(cli, ["train", "--ray-workers", "2", "--labels", str(small_labels), "--run", str(run),
                                 "--epochs", "1", "--steps-per-epoch", "1", "--lr", "0.5", *FAST])
    assert r.exit_code == 1 and started == [] and "was trained with other settings (lr 0.01 there, 0.5 now)" in r.output
    r = CliRunner().invoke(cli, ["train", "--ray-workers", "2", "--labels", str(small_labels), "--run", str(run),
                                 "--epochs", "2", "--steps-per-epoch", "1", *FAST])
    assert r.exit_code == 0 and len(started) == 1, r.output  # an epoch left: Ray Train's


def test_labels_are_checked_for_what_they_were_made_with_not_only_their_teachers_name(small_labels, tmp_path):
    """Labels of one teacher made with other weights mixed (and a run resumed on a folder relabelled with other
    weights, or at another size) without a word; the same folder given twice trained its held-out shard; labels of random weights,
    and Eq. 3's weights given for a map teacher, said nothing. (labels.json records what they were made with;
    other weights are written into a copy's here, as a relabel with them would write it.)"""
    def relabelled(name: str, **fields) -> Path:
        folder = tmp_path / name
        shutil.copytree(small_labels, folder)
        index = json.loads((folder / "labels.json").read_text())
        (folder / "labels.json").write_text(json.dumps({**index, **fields}))
        return folder

    other = relabelled("other", weights_digest="sha256:" + "ab" * 32)
    run = tmp_path / "run"
    base = ["train", "--run", run, "--epochs", 1, "--steps-per-epoch", 1, *FAST]
    r = invoke(*base, "--labels", small_labels, "--labels", other)
    assert r.exit_code == 1 and "holds classic labels made with other weights than" in r.output, r.output
    r = invoke(*base, "--labels", small_labels, "--labels", small_labels.parent / ".." / small_labels.parent.name /
               small_labels.name)
    assert r.exit_code == 1 and f"--labels names {small_labels} more than once" in r.output, r.output
    assert not run.exists()

    assert invoke(*base, "--labels", small_labels).exit_code == 0
    moved = tmp_path / "same-path"  # the run's folder, relabelled with other weights under its path
    shutil.copytree(small_labels, moved)
    first = invoke("train", "--run", tmp_path / "run2", "--epochs", 1, "--steps-per-epoch", 1, *FAST, "--labels", moved)
    assert first.exit_code == 0
    index = json.loads((moved / "labels.json").read_text())
    (moved / "labels.json").write_text(json.dumps({**index, "weights_digest": "sha256:" + "cd" * 32}))
    r = invoke("train", "--run", tmp_path / "run2", "--epochs", 2, "--steps-per-epoch", 1, *FAST, "--labels", moved)
    assert r.exit_code == 1 and "was trained with other settings (labels weights_digest" in r.output, r.output
    # relabelled at another size (the classic teacher has no weights: its digest says nothing)
    (moved / "labels.json").write_text(json.dumps({**index, "image_size": [index["image_size"][0] * 2,
                                                                          index["image_size"][1] * 2]}))
    r = invoke("train", "--run", tmp_path / "run2", "--epochs", 2, "--steps-per-epoch", 1, *FAST, "--labels", moved)
    assert r.exit_code == 1 and "was trained with other settings (labels image_size" in r.output, r.output

    noise = relabelled("noise", weights_random=True)
    r = CliRunner().invoke(cli, [str(a) for a in ["train", "--run", tmp_path / "run3", "--epochs", 1,
                                                  "--steps-per-epoch", 1, *FAST, "--labels", noise,
                                                  "--loss-weights", "0.5,0.2,0.3"]])
    assert r.exit_code == 0, r.output
    assert f"warning: {noise} holds labels of an untrained classic" in r.stderr
    assert "warning: --loss-weights 0.5,0.2,0.3 weigh Eq. 3's terms" in r.stderr
    again = invoke("train", "--run", tmp_path / "run3", "--epochs", 2, "--steps-per-epoch", 1, *FAST, "--labels", noise)
    assert again.exit_code == 0, again.output  # (map labels: their loss has no such weights to differ in)
    r = invoke(*base, "--labels", small_labels, "--loss-weights", "0,0,0")
    assert r.exit_code == 2 and "not all 0" in r.output


def test_a_full_disk_while_the_run_writes_its_logs_is_one_line_and_the_saved_epoch_resumes(small_labels, tmp_path,
                                                                                               monkeypatch):
    """A disk that fills while `train` writes its curves (or logs) after an epoch is one `Error:` line saying
    the run resumes, not a traceback; the epoch's checkpoint is kept and the next run goes on from it. A run with
    nothing left to train draws the plot it missed (it stayed missing, or an epoch behind), and a resume deletes
    the temporary file a killed checkpoint write left (it stayed until --restart)."""
    import errno

    import pipeline.train.loop as loop

    run = tmp_path / "run"

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "curves.png"))

    monkeypatch.setattr(loop, "plot_curves", full)
    r = CliRunner().invoke(cli, [str(a) for a in ["train", "--run", run, "--epochs", 1, "--steps-per-epoch", 1,
                                                  *FAST, "--labels", small_labels]])
    last = r.output.splitlines()[-1]
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("Error") == 1, r.output
    assert last.startswith("Error: cannot write the run's files (No space left on device: ") and \
        "resumes after its last saved epoch" in last, r.output
    assert (run / "checkpoints" / "latest.json").is_file() and not (run / "curves.png").exists()
    monkeypatch.undo()
    half = run / "checkpoints" / ".epoch-0001.pt.tmp-4242-0a1b2c"  # a checkpoint a SIGKILL cut short
    half.write_bytes(b"\0" * 1000)
    done = invoke("train", "--run", run, "--epochs", 1, "--steps-per-epoch", 1, *FAST, "--labels", small_labels)
    assert done.exit_code == 0 and "nothing to do" in done.output, done.output  # its last plot drawn now, and the
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG" and not half.exists()  # half-written file gone
    drawn = (run / "curves.png").stat().st_mtime_ns
    invoke("train", "--run", run, "--epochs", 1, "--steps-per-epoch", 1, *FAST, "--labels", small_labels)
    assert (run / "curves.png").stat().st_mtime_ns == drawn  # up to date: not drawn again on every re-run
    again = invoke("train", "--run", run, "--epochs", 2, "--steps-per-epoch", 1, *FAST, "--labels", small_labels)
    assert again.exit_code == 0 and "resuming" in again.output.lower(), again.output


def test_init_takes_what_fits_says_what_it_took_and_refuses_other_options(small_labels, tmp_path):
    """Another student's checkpoint gives its encoder alone (FastSal C's last hint adapter has the shape of
    FastSal A's, and was taken by chance); the same student with other options (a depth-101 SACT into a depth-50
    one loaded 364 of 364 tensors by name) is refused; the FastSal authors' file starts a run as --weights
    takes it (it was refused: 'its encoder does not fit')."""
    from students import build_student
    from students.fastsal import from_authors_keys

    c = build_student("fastsal_c", backbone_weights="none")
    ckpt = tmp_path / "c.pt"
    torch.save({"model": c.state_dict(), "student": "fastsal_c", "student_options": {}}, ckpt)
    a = build_student("fastsal_a", backbone_weights="none")
    fresh = {k: v.clone() for k, v in a.state_dict().items()}
    note = init_from(a, str(ckpt))
    assert note.endswith("its encoder alone (the rest keep their initialisation)") and "(a fastsal_c checkpoint)" in note
    assert torch.equal(a.state_dict()["adapt.3.0.weight"], fresh["adapt.3.0.weight"])  # not C's
    assert all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict() if k.startswith("encoder."))

    sact = build_student("sact", backbone_weights="none", depth=50)
    deep = tmp_path / "deep.pt"
    torch.save({"model": sact.state_dict(), "student": "sact", "student_options": {"depth": 50, "tile": 1,
                                                                                   "tau": 0.01}}, deep)
    torch.save({"model": sact.state_dict(), "student": "sact", "student_options": {"depth": 50, "tile": 1,
                                                                                   "tau": 0.005}},
               tmp_path / "fifty.pt")
    for other_tau in (tmp_path / "fifty.pt", deep):  # only what shapes a tensor is named (tau 0.01 is not)
        with pytest.raises(TrainError, match=r"is a sact checkpoint whose tensors are not this run's \(depth 50 "
                                             r"there, 101 here\): give"):
            init_from(build_student("sact", backbone_weights="none", depth=101), str(other_tau))
    # tau and tile shape no tensor: a tau-0.01 SACT starts a tau-0.005 run with every tensor
    assert init_from(sact, str(deep)).endswith(f"all {len(sact.state_dict())} tensors")

    from tests.test_students import authors_state_dict

    theirs = authors_state_dict("A")
    authors = tmp_path / "coco_A.pth"
    torch.save({"student_model": theirs, "optimizer": {}}, authors)
    started = build_student("fastsal_a", backbone_weights="none")
    assert init_from(started, str(authors)).endswith(f"(the FastSal authors' A file): all {len(fresh)} tensors")
    ours = from_authors_keys(theirs, "A")
    assert all(torch.equal(v, ours[k]) for k, v in started.state_dict().items())
    torch.save({"student_model": authors_state_dict("C")}, tmp_path / "coco_C.pth")  # into A: its encoder alone
    other = build_student("fastsal_a", backbone_weights="none")
    before = other.state_dict()["adapt.3.0.weight"].clone()
    assert init_from(other, str(tmp_path / "coco_C.pth")).endswith("its encoder alone (the rest keep their "
                                                                     "initialisation)")
    assert torch.equal(other.state_dict()["adapt.3.0.weight"], before)


def test_val_shards_are_held_out_of_the_last_labels_folder_only(small_labels, tmp_path):
    """With several --labels folders, more --val-shards than the last one has held out shards of the folders
    before it (CLI.md: "the last shards of the last --labels folder")."""
    other = tmp_path / "other"
    shutil.copytree(small_labels, other)
    last = len(json.loads((small_labels / "labels.json").read_text())["shards"])
    config = TrainConfig(labels=(str(other), str(small_labels)), run=str(tmp_path / "r"), val_shards=last)
    _, train, val, _ = Trainer.check(config)
    assert all(t.startswith(str(small_labels)) for t in val) and len(val) == last
    with pytest.raises(TrainError, match=f"--val-shards {last + 1}: the last --labels folder, {small_labels}, has "
                                         f"{last} shards"):
        Trainer.check(TrainConfig(labels=(str(other), str(small_labels)), run=str(tmp_path / "r"),
                                  val_shards=last + 1))


@pytest.mark.parametrize("name", ["salgan", "deepgaze2"])
def test_a_teachers_declared_hint_layout_is_what_its_hint_features_give(name):
    """What the hint stage's up-front check compares with a student's (DeepGaze IIE, four backbones, is too big
    to build here; its layout is of the same ResNet stages as its hint_features read)."""
    from teachers import build_teacher

    teacher = build_teacher(name, weights="random").eval()
    with torch.no_grad():
        feats = teacher.hint_features(torch.zeros(1, 3, 128, 192, dtype=torch.uint8))
    assert tuple((f.shape[1], 128 // f.shape[2]) for f in feats) == teacher.hint_layout
    assert all(128 // f.shape[2] == 192 // f.shape[3] for f in feats)


def test_a_run_that_resumes_reads_its_checkpoint_not_the_start_it_was_given(small_labels, tmp_path):
    """Its --init run may be gone, and --backbone-weights may be the default imagenet (a download, offline here):
    the checkpoint replaces both, so neither is read (resuming needed them: 'does not exist', or the download)."""
    start, run = tmp_path / "start", tmp_path / "run"
    one = ["--labels", small_labels, "--steps-per-epoch", 1, *FAST]
    assert invoke("train", *one, "--run", start, "--epochs", 1).exit_code == 0
    assert invoke("train", *one, "--run", run, "--init", start, "--epochs", 1).exit_code == 0
    shutil.rmtree(start)
    r = invoke("train", *one, "--run", run, "--init", start, "--epochs", 2)
    assert r.exit_code == 0 and "resuming" in r.stderr, r.output
    imagenet = [a for a in one if a not in ("--backbone-weights", "none")]
    r = invoke("train", *imagenet, "--run", run, "--epochs", 3)
    assert r.exit_code == 0 and "resuming" in r.stderr, r.output
    r = invoke("train", *one, "--run", run, "--init", start, "--epochs", 3, "--restart")  # a start over reads it
    assert r.exit_code == 2 and f"'--init': {start} does not exist" in r.output


def test_resuming_with_another_number_of_processes_or_loader_workers_is_said(small_labels, tmp_path):
    """The effective batch changes with the data-parallel world: allowed (a run moves to other machines), but a
    2-worker run resumed by one process halved it without a word. Another --workers (the loader processes, which
    split the shards) changes the data order from there on, another --steps-per-epoch the images an epoch takes: a
    note, once, and none where it is unchanged."""
    run = tmp_path / "run"
    one = ["train", "--labels", small_labels, "--run", run, "--steps-per-epoch", 1, *FAST]
    assert invoke(*one, "--epochs", 1).exit_code == 0
    assert json.loads((run / "config.json").read_text())["processes"] == 1
    path = run / "checkpoints" / "epoch-0000.pt"
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["world"] == 1
    save_as_written(path, {**ckpt, "world": 2})  # as a 2-process run leaves it
    r = invoke(*one, "--epochs", 2)
    assert r.exit_code == 0 and ("warning: epoch-0000.pt was trained by 2 process(es), this run has 1: each step now "
                                 "takes 1 × 2 images, not 2 × 2") in r.stderr, r.output
    assert "was trained with --workers" not in r.stderr  # (FAST's --workers 0 both times)
    assert torch.load(run / "checkpoints" / "epoch-0001.pt", weights_only=False)["loader_workers"] == 0
    r = invoke(*one, "--epochs", 3, "--workers", 1)  # (the last option of a kind wins, as click has it)
    assert r.exit_code == 0, r.output  # 0 and 1 read the shards in one order (one reader): nothing to say
    assert "was trained with --workers" not in r.stderr and "--steps-per-epoch" not in r.stderr  # (1 both times)
    path = run / "checkpoints" / "epoch-0002.pt"
    save_as_written(path, {**torch.load(path, weights_only=False), "loader_workers": 2})  # as --workers 2 leaves it
    r = invoke(*one, "--epochs", 4, "--workers", 1, "--steps-per-epoch", 2)  # (changed without a word, it was)
    assert r.exit_code == 0 and r.stderr.count("note: epoch-0002.pt was trained with --steps-per-epoch 1, this run "
                                               "has 2: its epochs take another number of images from here") == 1, \
        r.stderr
    assert r.stderr.count("note: epoch-0002.pt was trained with --workers 2, this run has 1: the loader workers split "
                          "the shards between them, so the images come in another order") == 1, r.stderr
    more = [*one, "--workers", 1, "--steps-per-epoch", 2]
    r = invoke(*more, "--epochs", 5, "--amp", "off")  # --amp auto trained in fp32 on this CPU: off is the same
    assert r.exit_code == 0 and "was trained in" not in r.stderr, r.output  # (it was refused: "amp auto there")
    r = invoke(*more, "--epochs", 6, "--amp", "bf16")  # another precision (as auto on a GPU): allowed, said
    assert r.exit_code == 0 and r.stderr.count(
        "warning: epoch-0004.pt was trained in fp32, this run trains in bf16 autocast (--amp bf16 on cpu): the losses "
        "no longer follow the run's own course; --amp off keeps the precision it had") == 1, r.output


# -- ground truth (Eq. 2's second term) ----------------------------------------------------------------------------

def human_maps(folder: Path, photos: Path, as_jpg: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """A SALICON-style ``maps`` folder: for each photo a grayscale map of its own (a blurred random pattern at the
    photo's size), named as the photo with .png (``as_jpg``: with .jpg); returns them by photo file name."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    made = {}
    for photo in sorted(photos.glob("*.jpg")):
        h, w = cv2.imread(str(photo)).shape[:2]
        gray = cv2.GaussianBlur((rng.random((h, w)) * 255).astype(np.uint8), (0, 0), 6)
        path = folder / (photo.stem + (".jpg" if photo.name in as_jpg else ".png"))
        if photo.name in as_jpg:  # with an EXIF orientation tag (6: rotate 90°), which the map's pixels ignore,
            from PIL import Image  # as the photos' own tags are ignored when they are labelled

            exif = Image.Exif()
            exif[0x0112] = 6
            Image.fromarray(gray).save(path, quality=95, exif=exif)
        else:
            cv2.imwrite(str(path), gray)
        made[photo.name] = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)  # as stored
    return made


def test_ground_truth_maps_are_each_samples_own_and_join_the_loss_as_eq2_says(small_labels, tmp_path):
    """With --gt-maps a training target carries the sample's human map (found by its source file's name, resized
    as its image was, its EXIF orientation ignored as the photo's is) and the loss is BCE with the teacher's map plus
    BCE with it; validation stays the teacher's alone."""
    import torch.nn.functional as F

    maps = human_maps(tmp_path / "maps", SAMPLES / "val2017", as_jpg=("000000000285.jpg",))
    config = TrainConfig(labels=(str(small_labels),), run=str(tmp_path / "run"), backbone_weights="none",
                         batch_size=4, workers=0, shuffle_buffer=0, gt_maps=str(tmp_path / "maps"))
    trainer = Trainer(config)
    seen = set()
    for images, targets, keys in trainer.loader(trainer.train_tars, 0, train=True):
        assert targets.shape == (len(keys), 2, 64, 96)
        for target, key in zip(targets, keys):
            expected = cv2.resize(maps[f"{key}.jpg"], (96, 64), interpolation=cv2.INTER_AREA) / 255.0
            assert np.array_equal(target[1].numpy(), expected.astype(np.float32)), key
            seen.add(key)
        loss, logits, _ = trainer.loss(images, targets)
        teacher, human = targets[:, :1], targets[:, 1:]
        assert not torch.equal(teacher, human)
        assert loss.item() == pytest.approx((F.binary_cross_entropy_with_logits(logits, teacher)
                                             + F.binary_cross_entropy_with_logits(logits, human)).item(), rel=1e-6)
    assert len(seen) == 8 and "000000000285" in seen  # every training sample, the .jpg map among them
    by_url = Trainer(TrainConfig(**{**config.__dict__, "gt_maps": f"file://{tmp_path / 'maps'}"}))
    first = next(iter(trainer.loader(trainer.train_tars, 0, train=True)))[1]
    assert torch.equal(next(iter(by_url.loader(by_url.train_tars, 0, train=True)))[1], first)  # read through fsspec
    _, val_targets, _ = next(iter(trainer.loader(trainer.val_tars, 0, train=False)))
    assert val_targets.shape[1] == 1


def test_the_first_ground_truth_map_is_checked_in_a_data_parallel_worker_too(small_labels, tmp_path, monkeypatch):
    """Each Ray Train / torchrun process checks the first sample's map; webdataset refused to read a tar there
    without a node splitter ("you need to add an explicit nodesplitter"), which ended every --ray-workers run."""
    from pipeline.train.data import SampleError, first_ground_truth, open_label_set

    human_maps(tmp_path / "maps", SAMPLES / "val2017")
    monkeypatch.setenv("RANK", "1")  # as torchrun and Ray Train set them: webdataset reads these
    monkeypatch.setenv("WORLD_SIZE", "2")
    labels = open_label_set(small_labels)
    first_ground_truth(labels, str(tmp_path / "maps"))
    (tmp_path / "maps" / "000000000139.png").unlink()
    with pytest.raises(SampleError, match="no ground-truth map for 000000000139.jpg"):
        first_ground_truth(labels, str(tmp_path / "maps"))


def test_a_folder_sources_ground_truth_map_is_found_by_its_path_below_the_images_folder(tmp_path):
    """`sub/a.jpg`'s map is `sub/a.png` (SALICON-style trees mirror their image folders), not a `a.png` beside
    `b.png`: the sample's json records the relative path as its id (its `file` is the base name)."""
    import webdataset as wds

    from pipeline.train.data import ground_truth

    (tmp_path / "images" / "sub").mkdir(parents=True)
    shutil.copy(SAMPLES / "val2017" / "000000000139.jpg", tmp_path / "images" / "sub" / "a.jpg")
    shutil.copy(SAMPLES / "val2017" / "000000000285.jpg", tmp_path / "images" / "a.jpg")
    r = invoke("label", "folder", "--images", tmp_path / "images", "--teacher", "classic", "--out", tmp_path / "labels",
               "--image-size", "64x96", "--executor", "local", "--no-progress")
    assert r.exit_code == 0, r.output
    (tmp_path / "maps" / "sub").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "maps" / "sub" / "a.png"), np.full((48, 48), 200, np.uint8))
    cv2.imwrite(str(tmp_path / "maps" / "a.png"), np.full((48, 48), 50, np.uint8))
    tar = tmp_path / "labels" / "classic" / "images" / "shard-000000.tar"
    found = {s["__key__"]: ground_truth(s, tmp_path / "maps", (64, 96))
             for s in wds.WebDataset(str(tar), shardshuffle=False)}
    assert sorted(found) == ["a", "sub__a"]
    assert found["sub__a"].shape == (1, 64, 96) and torch.all(found["sub__a"] == 200 / 255)
    assert torch.all(found["a"] == 50 / 255)


def test_a_missing_or_broken_ground_truth_map_skips_its_sample_and_settings_say_where_the_maps_were(
        small_labels, tmp_path):
    maps = tmp_path / "maps"
    human_maps(maps, SAMPLES / "val2017")
    (maps / "000000000285.png").unlink()
    (maps / "000000000632.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    r = invoke("train", "--labels", small_labels, "--run", run, "--epochs", 1, "--gt-maps", maps, *FAST)
    assert r.exit_code == 0, r.output
    assert f"no ground-truth map for 000000000285.jpg in {maps} (000000000285.png, .jpg or .jpeg)" in r.stderr
    assert f"the ground-truth map of 000000000632.jpg in {maps} does not decode" in r.stderr
    assert f"ground truth: {maps}" in r.stderr
    assert json.loads((run / "config.json").read_text())["gt_maps"] == str(maps)
    assert rows(run / "metrics.csv", 9)[1][8] == "6"  # the 8 training images but those 2
    r = invoke("train", "--labels", small_labels, "--run", run, "--epochs", 2, *FAST)  # the same run, without them
    assert r.exit_code == 1 and 'other settings (gt_maps "' in r.output and "there, null now" in r.output, r.output
    strict = invoke("train", "--labels", small_labels, "--run", tmp_path / "strict", "--epochs", 1, "--gt-maps", maps,
                    "--max-bad-samples", 0, *FAST)  # the maps, not the labels, are what is missing: said so
    assert strict.exit_code == 1 and "--gt-maps lacks usable maps of these images" in strict.output, strict.output
    assert "re-run `pipeline label`" not in strict.output


def test_ground_truth_is_refused_where_eq2_does_not_apply(small_labels, tmp_path, monkeypatch):
    """The hint stage has no map loss; a density teacher's loss (Eq. 3) has no ground-truth term; a file is not a
    folder of maps: one sentence each, before a checkpoint is written."""
    import dataclasses

    from pipeline.train import loop

    maps = tmp_path / "maps"
    maps.mkdir()
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "a", "--gt-maps", maps, "--student",
               "fastsal_c", "--stage", "hint", "--teacher", "salgan", "--teacher-weights", "random", *FAST)
    assert r.exit_code == 1 and "--gt-maps is for the finetune stage" in r.output, r.output
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "b", "--gt-maps", small_labels / "labels.json",
               *FAST)
    assert r.exit_code == 1 and "labels.json is not a folder (of human saliency maps" in r.output, r.output
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "c", "--gt-maps", tmp_path / "none", *FAST)
    assert r.exit_code == 2 and f"{tmp_path / 'none'} does not exist" in r.output, r.output
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "e", "--gt-maps", maps, *FAST)  # named otherwise
    assert r.exit_code == 1 and (f"--gt-maps {maps}: no ground-truth map for 000000000139.jpg in {maps} "
                                 "(000000000139.png, .jpg or .jpeg), for the first sample of") in r.output, r.output
    real = loop.open_label_sets
    monkeypatch.setattr(loop, "open_label_sets",
                        lambda folders: dataclasses.replace(real(folders), label_kind="log_density", teacher="deepgaze"))
    r = invoke("train", "--labels", small_labels, "--run", tmp_path / "d", "--gt-maps", maps, *FAST)
    assert r.exit_code == 1 and "holds deepgaze's densities, and their loss (Eq. 3) has no ground-truth term" in r.output
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_ctrl_c_under_ray_train_ends_as_an_interrupted_run_and_leaves_no_handler_behind():
    """Ray Train (v2) puts its own SIGINT handler in place during fit(): it aborts the run and fit() returns, so
    `train --ray-workers` exited 1 without a word (CLI.md promises 130 and what is kept). Ray's handler still
    runs (the graceful abort); the driver then raises KeyboardInterrupt, and the handler before fit() is back."""
    import signal
    import time

    from pipeline.train.ray_train import fit_interruptibly

    aborted = []

    class Trainer:  # TorchTrainer's part that matters here
        def _register_sigint_handler(self, controller):
            signal.signal(signal.SIGINT, lambda signum, frame: aborted.append(controller))

        def fit(self):
            self._register_sigint_handler("controller")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs between bytecodes

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fit_interruptibly(Trainer(), 2)
    assert aborted == ["controller"] and signal.getsignal(signal.SIGINT) is before

    class Failing(Trainer):
        def fit(self):
            raise RuntimeError("Traceback (most recent call last):\n  ...\nValueError: worker 1 ran out of memory")

    with pytest.raises(TrainError) as e:
        fit_interruptibly(Failing(), 2)
    assert str(e.value) == "training on 2 Ray workers failed: ValueError: worker 1 ran out of memory"


def test_the_staging_folders_of_killed_trainings_are_pruned(tmp_path, monkeypatch):
    """A SIGKILLed `train --run s3://…` left its staging folder (a checkpoint or two) in /tmp for good."""
    import tempfile

    from pipeline.train.loop import STAGING, prune_staging, staging_prefix

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = staging_prefix(os.getppid())
    pid, start, host = parent[len(STAGING):].split("-")[:3]
    names = {"dead": staging_prefix(gone.pid) + "abc", "mine": staging_prefix() + "abc", "live": parent + "abc",
             "reused pid": f"{STAGING}{pid}-{int(start) + 1}-{host}-abc",  # that pid now runs another process
             "other host": f"{STAGING}{gone.pid}-0-elsewhere-abc", "not ours": f"{STAGING}x"}
    for name in names.values():
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    prune_staging()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("mine", "live", "other host", "not ours"))


def test_data_parallel_workers_take_the_same_steps_however_many_samples_each_skipped():
    """A worker whose unreadable samples were skipped has fewer batches than the steps every worker takes (the
    fewest full batches of any): it reads its epoch again for the batches it lacks instead of ending first and
    leaving the others in their all-reduce for ever; one with enough reads no further than the steps."""
    from pipeline.train.config import TrainError
    from pipeline.train.loop import same_steps

    passes = []

    def again():
        passes.append(1)
        return iter(["a", "b", "c"])

    assert list(same_steps(iter(["a", "b"]), 5, again)) == ["a", "b", "a", "b", "c"] and len(passes) == 1
    read = []
    plenty = (read.append(x) or x for x in ["a", "b", "c", "d"])
    assert list(same_steps(plenty, 3, again)) == ["a", "b", "c"] and read == ["a", "b", "c"] and len(passes) == 1
    assert list(same_steps(iter(["a"]), 4, lambda: iter(["a"]))) == ["a"] * 4
    with pytest.raises(TrainError, match="gave no further batch after 2 of the epoch's 4 steps"):
        list(same_steps(iter(["a", "b"]), 4, lambda: iter([])))

    # the trainer's epochs go through it when data parallel, and not in one process
    from pipeline.train.loop import Trainer

    def trainer(world):
        return types.SimpleNamespace(_ahead=None, world=world, train_tars=["t"], steps=lambda epoch: 3,
                                     loader=lambda tars, epoch, train: iter(["x", "y"]))

    assert list(Trainer.epoch_batches(trainer(2), 0)) == ["x", "y", "x"]
    assert list(Trainer.epoch_batches(trainer(1), 0)) == ["x", "y"]


def test_a_shard_member_stating_a_huge_image_or_label_is_a_bad_sample_before_it_is_decoded():
    """A 4 MB tar whose members stated gigapixel images drove `train` and `eval` to 10 GB, 30 s a sample: the
    sizes their headers state are checked against the label folder's first."""
    import io

    import numpy as np

    from pipeline.train.data import SampleError, decode

    jpg = cv2.imencode(".jpg", np.zeros((64, 96, 3), np.uint8))[1].tobytes()
    png = cv2.imencode(".png", np.zeros((64, 96), np.uint8))[1].tobytes()
    huge = png[:16] + (30000).to_bytes(4, "big") + (30000).to_bytes(4, "big") + png[24:]  # IHDR: 30000×30000
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f2", "fortran_order": False, "shape": (30000, 30000)})
    sample = {"__key__": "k", "jpg": jpg, "classic.png": png}
    assert decode(sample, "classic.png", "probability_map", (64, 96))[0].shape == (3, 64, 96)
    with pytest.raises(SampleError, match="^its image is 30000x30000, not the 64x96 of its label folder$"):
        decode({**sample, "jpg": huge}, "classic.png", "probability_map", (64, 96))
    with pytest.raises(SampleError, match="^its label is 30000x30000, not the 64x96 of its label folder$"):
        decode({**sample, "classic.png": huge}, "classic.png", "probability_map", (64, 96))
    with pytest.raises(SampleError, match="^its label is 30000x30000, not the 64x96 of its label folder$"):
        decode({"__key__": "k", "jpg": jpg, "deepgaze.npy": npy.getvalue()}, "deepgaze.npy", "log_density", (64, 96))


@pytest.mark.parametrize("edit, problem", [
    ({"labels": {"kind": "probability_map", "image_size": [10**12, 10**12]}},
     "its labels' image_size is '[1000000000000, 1000000000000]', not [height, width]"),
    ({"labels": {"kind": "probability_map", "image_size": 7}}, "its labels' image_size is '7', not [height, width]"),
    ({"student": ["fastsal_a"]}, "its student is \"['fastsal_a']\", not a name"),
])
def test_a_checkpoint_whose_record_is_out_of_shape_is_one_line(tmp_path, edit, problem):
    """Such a file (another tool's, or edited by hand) was a traceback in eval/predict/profile, or a map of 10^12
    pixels; its readers now say what is wrong with it."""
    from pipeline.train.checkpoints import CheckpointError, load_checkpoint

    path = tmp_path / "odd.pt"
    torch.save({"model": {}, "student": "fastsal_a", "student_options": {}, **edit}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"{path} is not a checkpoint of `pipeline train` ({problem})"
    r = invoke("profile", "--checkpoint", path, "--iters", 1)
    assert r.exit_code == 1 and r.output.splitlines()[-1] == f"Error: {e.value}", r.output


def test_the_epoch_of_lowest_validation_loss_is_kept_and_named_by_best_json(tmp_path, monkeypatch):
    """The FastSal authors keep the epoch of best validation; here checkpoints/best.json names it and its file is
    kept beside the two newest (a pointer is written before an older file it named is deleted), and
    `--checkpoint RUN/checkpoints/best.json` reads it as latest.json is read."""
    from pipeline.common import storage
    from pipeline.train.checkpoints import checkpoint_path, save_checkpoint
    from pipeline.train.loop import run_mirror

    ckpt = tmp_path / "checkpoints"
    kept = []
    for epoch, loss in enumerate([0.5, 0.4, 0.45, float("nan"), 0.7, 0.3]):
        save_checkpoint(ckpt, epoch, {"epoch": epoch}, val_loss=loss)
        kept.append(sorted(int(p.stem[6:]) for p in ckpt.glob("epoch-*.pt")))
    assert kept == [[0], [0, 1], [1, 2], [1, 2, 3], [1, 3, 4], [4, 5]]
    best = json.loads((ckpt / "best.json").read_text())
    assert (best["checkpoint"], best["epoch"], best["val_loss"]) == ("epoch-0005.pt", 5, 0.3)
    assert checkpoint_path(ckpt / "best.json") == ckpt / "epoch-0005.pt"

    save_checkpoint(ckpt, 5, {"epoch": 5, "again": True}, val_loss=0.35)  # epoch 6 trained again (its file was
    best = json.loads((ckpt / "best.json").read_text())  # unreadable): the record names the new weights
    assert (best["epoch"], best["val_loss"]) == (5, 0.35)
    assert checkpoint_path(ckpt / "best.json") == ckpt / "epoch-0005.pt"
    save_checkpoint(ckpt, 6, {"epoch": 6}, val_loss=0.34)  # (better than the record the new epoch 5 made)
    assert json.loads((ckpt / "best.json").read_text())["epoch"] == 6
    save_checkpoint(ckpt, 5, {"epoch": 5}, val_loss=0.5)  # a fallback to epoch 4: a record of a later epoch goes too
    assert json.loads((ckpt / "best.json").read_text())["epoch"] == 5
    save_checkpoint(ckpt, 6, {"epoch": 6}, val_loss=0.9)  # a run URL's pointers go up after the files they name
    uploads, real = [], storage.RemotePath.upload
    monkeypatch.setattr(storage.RemotePath, "upload", lambda self, local: (uploads.append(self.name), real(self, local)))
    run_mirror(f"memory://runs/{tmp_path.name}", tmp_path).push()
    assert uploads == ["epoch-0005.pt", "epoch-0006.pt", "best.json", "latest.json"]
    assert "not the checkpoint best.json recorded" in _recorded_error(ckpt)


def _recorded_error(ckpt) -> str:
    """What --checkpoint RUN/checkpoints/best.json says of a file changed since best.json named it."""
    from pipeline.train.checkpoints import CheckpointError, checkpoint_path

    (ckpt / "epoch-0005.pt").write_bytes(b"changed")
    with pytest.raises(CheckpointError) as e:
        checkpoint_path(ckpt / "best.json")
    assert "resumes from" not in str(e.value)
    return str(e.value)


def test_the_shard_loader_runs_under_the_spawn_start_method(small_labels):
    """macOS starts DataLoader workers with `spawn` (and Python 3.14 on Linux with `forkserver`): all the loader
    hands its workers must pickle, and they read the batches an in-process loader reads."""
    import multiprocessing

    from pipeline.train.data import open_label_set, shard_loader

    labels = open_label_set(small_labels)

    def batches(workers: int) -> list:
        loader = shard_loader(labels, list(labels.tars), batch_size=2, workers=workers, split_nodes=False)
        return [[t.clone() if isinstance(t, torch.Tensor) else t for t in batch] for batch in loader]

    here = batches(0)
    before = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        spawned = batches(2)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert len(here) == 6 and len(spawned) == len(here)
    key = lambda batch: str(batch[2])  # noqa: E731 - (2 workers interleave their shards' batches)
    for a, b in zip(sorted(here, key=key), sorted(spawned, key=key)):
        assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


def test_a_checkpoint_saved_with_more_gpus_visible_resumes_with_those_there(monkeypatch):
    """Saved under torchrun on an 8-GPU node, resumed on one: the CUDA generators restored are those there are
    (set_rng_state_all indexed the missing ones: IndexError, a traceback)."""
    import torch

    from pipeline.train import checkpoints

    state = checkpoints.rng_state()
    state["cuda"] = [torch.full((8,), k, dtype=torch.uint8) for k in range(8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(list(states)))
    checkpoints.set_rng_state(state)
    assert len(restored) == 1 and len(restored[0]) == 1 and torch.equal(restored[0][0], state["cuda"][0])
