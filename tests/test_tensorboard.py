"""`pipeline train` writes TensorBoard event files when tensorboard is installed, and nothing without it."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli
from tests.conftest import four_photo_coco, label_classic


def ok(*args):
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """Four real photos labelled by the classic teacher at 64x96, two shards of two (the last held out)."""
    base = tmp_path_factory.mktemp("labels")
    return label_classic(four_photo_coco(base / "coco"), base / "out", "--shard-size", 2, "--image-size", "64x96")


def train(labels: Path, run: Path, epochs: int, *extra):
    return ok("train", "--labels", labels, "--run", run, "--backbone-weights", "none", "--epochs", epochs,
              "--steps-per-epoch", "1", "--batch-size", "2", "--workers", "0", "--shuffle-buffer", "0",
              "--device", "cpu", "--no-progress", *extra)


def test_training_logs_scalars_and_maps_per_epoch_to_tensorboard(labels, tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (extra: tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(labels, run, 2)
    train(labels, run, 3)  # resumed: epoch 3 joins the same log
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/val", "val/cc", "val/kl", "val/nss", "lr"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/cc")] == [1, 2, 3]
    metrics = [float(line.split(",")[3]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert [e.value for e in events.Scalars("val/cc")] == pytest.approx(metrics, abs=1e-5)
    maps = events.Images("maps (image | teacher | student)")
    assert [m.step for m in maps] == [1, 2, 3]
    assert maps[-1].width == 3 * 96 and maps[-1].height == 2 * 64  # image | teacher | student, two held-out rows

    train(labels, run, 1, "--restart")  # starting over: the earlier run's events are gone
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/cc")] == [1]


def test_without_tensorboard_training_writes_no_event_files(labels, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = tmp_path / "run"
    train(labels, run, 1)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["epoch"] == 0
    assert not (run / "tensorboard").exists()
