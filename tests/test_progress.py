"""Progress of long work: lines with count, images/s and ETA off a terminal, a bar on one (CLI.md, "Progress")."""

from __future__ import annotations

import io
import re
from pathlib import Path

from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.common.progress import BarProgress, LineProgress, NoProgress, duration, progress

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "coco"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_give_count_rate_and_eta_at_milestones_and_once_a_minute_in_between():
    out, clock = io.StringIO(), Clock()
    bar = LineProgress(1000, "label classic", initial=200, every_s=60, file=out, clock=clock)
    clock.t += 10
    bar.update(100)  # 10 s in: no line yet
    assert out.getvalue() == ""
    bar.set_postfix_str("shards 3/10")
    bar.milestone()
    assert out.getvalue() == "label classic: 300/1000 img (30%), 10.0 img/s, ETA 1m10s; shards 3/10\n"
    clock.t += 61
    bar.update(100)  # a minute without a milestone: a line anyway
    assert out.getvalue().splitlines()[-1].startswith("label classic: 400/1000 img (40%), 2.8 img/s, ETA 3m")
    clock.t += 1
    bar.update(600)
    bar.milestone("epoch 2/2 loss 0.1000")
    assert out.getvalue().splitlines()[-1] == "label classic: 1000/1000 img (100%), 11.1 img/s, done in 1m12s; epoch 2/2 loss 0.1000"
    assert len(out.getvalue().splitlines()) == 3


def test_the_display_follows_the_output():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert isinstance(progress(10, "x", file=io.StringIO()), LineProgress)
    assert isinstance(progress(10, "x", file=Terminal()), BarProgress)
    assert isinstance(progress(10, "x", file=Terminal(), enabled=False), NoProgress)
    assert [duration(s) for s in (0, 59.4, 61, 3599, 7325)] == ["0s", "59s", "1m01s", "59m59s", "2h02m"]


def test_label_and_train_off_a_terminal_print_a_line_per_tenth_of_the_shards_and_per_epoch(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_PROGRESS", raising=False)
    runner = CliRunner()
    r = runner.invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES), "--split", "val2017",
                            "--out", str(tmp_path), "--shard-size", "3", "--image-size", "64x96", "--executor", "local"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("label classic: ")]
    assert len(lines) == 4, r.output  # 12 photos in 4 shards: a line each (a tenth of 4 shards rounds up to 1)
    assert re.fullmatch(r"label classic: 12/12 img \(100%\), [\d.]+ img/s, done in \d+s; shards 4/4", lines[-1])
    assert re.fullmatch(r"label classic: 3/12 img \(25%\), [\d.]+ img/s, ETA \d+s; shards 1/4", lines[0])

    r = runner.invoke(cli, ["train", "--labels", str(tmp_path / "classic" / "val2017"), "--run", str(tmp_path / "run"),
                            "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2", "--backbone-weights",
                            "none", "--workers", "0", "--shuffle-buffer", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    epochs = [line for line in r.output.splitlines() if line.startswith("train fastsal_a (finetune): ")]
    assert len(epochs) == 2, r.output
    assert re.match(r"train fastsal_a \(finetune\): 4/8 img \(50%\), [\d.]+ img/s, ETA \d+s; epoch 1/2 loss [\d.]+ "
                    r"val_loss [\d.]+ val_cc [-\d.]+ val_kl [\d.]+ val_nss [-\d.]+ \(epoch [\d.]+ s, [\d.]+ img/s\)$", epochs[0])
    assert "epoch 2/2" in epochs[1] and "8/8 img (100%)" in epochs[1] and "done in" in epochs[1]
