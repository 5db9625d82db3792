"""The report page and the tables `pipeline run` ends with, from outputs written by hand (no step runs): what a
reader of ``report.html`` and of the terminal sees."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

from pipeline.cli.main import cli
from pipeline.manifest.format import load_manifest
from pipeline.manifest.plan import record
from pipeline.manifest import report
from pipeline.manifest.report import _chosen_keys, referenced_images, scores_table, speed_table, write_report
from pipeline.manifest.runner import step_states

MANIFEST = """\
workdir: wd
steps:
  train_a:
    run: train
    with: {labels: labels, student: fastsal_a, epochs: 2, lr: 0.05}
  eval_a:
    run: eval
    with: {checkpoint: "${steps.train_a.out}", labels: labels}
  predict_a:
    run: predict
    with: {checkpoint: "${steps.train_a.out}", images: imgs, compare_teacher: classic}
  profile_a:
    run: profile
    with: {checkpoint: "${steps.train_a.out}"}
"""
UP_TO_DATE = {"train_a": "up to date", "eval_a": "up to date", "predict_a": "up to date", "profile_a": "up to date"}


@pytest.fixture
def manifest(tmp_path, monkeypatch):
    """A manifest whose train and predict steps' outputs are written by hand (no eval or profile output yet): a
    run folder with its logs and curves, and 12 compare sheets (photo00 the worst by CC, photo11 the best)."""
    monkeypatch.chdir(tmp_path)
    Path("m.yaml").write_text(MANIFEST)
    run = Path("wd/train_a")
    run.mkdir(parents=True)
    (run / "losses.csv").write_text("epoch,step,global_step,loss\n0,0,1,0.9\n1,0,2,0.8\n")
    (run / "metrics.csv").write_text("epoch,train_loss,val_loss,val_cc,val_kl,val_nss,lr,seconds,images\n"
                                     "0,0.9,0.85,0.1,0.3,0.1,0.05,0.8,8\n1,0.8,0.7,0.2,0.3,0.2,0.05,0.6,8\n")
    (run / "curves.png").write_bytes(b"\x89PNG curves")
    compare = Path("wd/predict_a/compare")
    compare.mkdir(parents=True)
    ccs = {f"photo{i:02d}.jpg": round(0.5 + i / 100, 2) for i in range(12)}
    for key in ccs:
        (compare / f"{key}.png").write_bytes(b"\x89PNG " + key.encode())
    Path("wd/predict_a/predictions.json").write_text(json.dumps(
        {"maps": 12, "compare_teacher": "classic", "compare_sheets": str(compare.resolve()), "cc_with_teacher": ccs}))
    return load_manifest("m.yaml", group=cli)


def page(manifest, states=UP_TO_DATE, state=None) -> str:
    path, written, warnings = write_report(manifest, state or {"steps": {}}, states, force=True)
    assert written and not warnings, warnings
    return html.unescape(path.read_text())


def test_sheet_ranks_count_from_the_best():
    """1st is the best: the sheets between the worst and the best say how far from the best they are."""
    doc = {"per_image": [{"key": f"img{i:02d}", "cc": i / 100} for i in range(12)]}  # img11 the best
    assert _chosen_keys(doc, 4) == {"img00": "worst of 12", "img04": "8th best of 12", "img07": "5th best of 12",
                                    "img11": "best of 12"}
    assert _chosen_keys({"per_image": [{"key": "a", "cc": 0.5}, {"key": "b", "cc": 0.7}, {"key": "c", "cc": 0.6}]},
                        4) == {"a": "worst of 3", "c": "2nd best of 3", "b": "best of 3"}


def test_the_curves_of_a_train_step_not_up_to_date_say_why(manifest):
    """As a predict step's sheets do: its curves are of its last run, not of the step as declared now (its lr
    changed, and another step run with --only)."""
    stale = {**UP_TO_DATE, "train_a": "stale: settings changed: lr 0.05→0.01"}
    assert ('<h3>train_a</h3><p class="note">(stale: settings changed: lr 0.05→0.01): the curves of its last run</p>'
            '<figure><img src="report/train_a/curves.png"') in page(manifest, stale)
    assert '<h3>train_a</h3><figure><img src="report/train_a/curves.png"' in page(manifest)


def test_a_step_stale_because_its_upstream_is_says_so_not_that_it_runs(manifest):
    """`pipeline status` and the report's steps say what is, not what a run would do: nothing runs."""
    state = {"steps": {}}
    state["steps"]["train_a"] = record(manifest, "train_a", state, status="done", output_digest="sha256:aa")
    state["steps"]["eval_a"] = record(manifest, "eval_a", state, status="done", output_digest="sha256:bb")
    Path("wd/eval_a").mkdir()
    Path("wd/eval_a/metrics.json").write_text('{"metrics": {"cc": 0.7}}')
    Path("m.yaml").write_text(MANIFEST.replace("lr: 0.05", "lr: 0.01"))
    states = step_states(load_manifest("m.yaml", group=cli), state)
    assert states == {"train_a": "stale: settings changed: lr 0.05→0.01",
                      "eval_a": "stale: upstream train_a is stale", "predict_a": "never run", "profile_a": "never run"}
    assert "<td>eval_a</td><td>eval</td><td>stale: upstream train_a is stale</td>" in \
        page(load_manifest("m.yaml", group=cli), states, state)


def test_predict_sheets_are_a_spread_from_the_worst_to_the_best(manifest):
    """The heading gives the mean over all 12: the 6 shown span them, not the first 6 by name."""
    text = page(manifest)
    assert "<h3>predict_a: 6 of 12 maps at full size; mean CC with teacher classic: 0.555</h3>" in text
    shown = [f"photo{i:02d}.jpg" for i in (0, 2, 4, 7, 9, 11)]
    assert [s for s in re.findall(r'<img src="([^"]+)"', text) if "predict_a" in s] == \
        [f"report/predict_a/{k}.png" for k in shown]
    assert re.findall(r"<figcaption>(photo[^<]*)</figcaption>", text) == [
        "photo00.jpg: CC 0.500 (worst of 12 by CC)", "photo02.jpg: CC 0.520 (10th best of 12 by CC)",
        "photo04.jpg: CC 0.540 (8th best of 12 by CC)", "photo07.jpg: CC 0.570 (5th best of 12 by CC)",
        "photo09.jpg: CC 0.590 (3rd best of 12 by CC)", "photo11.jpg: CC 0.610 (best of 12 by CC)"]


def test_the_terminal_scores_say_what_each_row_scored_as_the_page_does(manifest):
    Path("wd/eval_a").mkdir()
    data = "classic labels in wd/label_val (all 3 shards)"
    Path("wd/eval_a/metrics.json").write_text(json.dumps(
        {"model": "fastsal_a@wd/train_a/checkpoints/epoch-0001.pt", "data": data, "images": 12,
         "metrics": {"cc": 0.7239, "kl_div": 0.1173}}))
    head, row = scores_table(manifest, states=UP_TO_DATE).splitlines()
    assert re.split(r"\s{2,}", head) == ["step", "model", "images", "cc", "kl_div", "data"]
    assert re.split(r"\s{2,}", row) == ["eval_a", "fastsal_a (train_a)", "12", "0.7239", "0.1173", data]
    stale = {**UP_TO_DATE, "eval_a": "stale: upstream train_a is stale"}  # (no sheets drawn: no checkpoint here)
    assert ("<th>data</th></tr></thead><tbody><tr><td>eval_a (stale)</td><td>fastsal_a (train_a)</td><td>12</td>"
            f"<td>0.7239</td><td>0.1173</td><td>{data}</td></tr>") in page(manifest, stale)


def test_the_assets_folder_keeps_what_the_page_shows_and_no_sheet_it_no_longer_shows(manifest, monkeypatch):
    """A rerun that draws fewer sheets leaves none of the old ones; a page that failed to be written leaves the
    one before it whole (nothing it shows deleted)."""
    def shown():
        return set(referenced_images(Path("wd/report.html").read_text()))

    def held():
        return {p.relative_to("wd").as_posix() for p in Path("wd/report").rglob("*") if p.is_file()}

    page(manifest)
    assert held() == shown() and len(shown()) == 7  # the curves, 6 sheets
    doc = json.loads(Path("wd/predict_a/predictions.json").read_text())
    doc["cc_with_teacher"] = {k: v for k, v in list(doc["cc_with_teacher"].items())[:3]}  # a rerun on 3 images
    Path("wd/predict_a/predictions.json").write_text(json.dumps(doc))
    for f in sorted(Path("wd/predict_a/compare").glob("*.png"))[3:]:
        f.unlink()
    (Path("wd/report/train_a") / "old.png").write_bytes(b"\x89PNG")

    real_open = report.atomic_open

    def full_disk(path, *args):
        if Path(path).name == "report.html":
            raise OSError("No space left on device")
        return real_open(path, *args)

    monkeypatch.setattr(report, "atomic_open", full_disk)
    with pytest.raises(OSError):
        write_report(manifest, {"steps": {}}, UP_TO_DATE, force=True)
    assert shown() <= held()  # the page as it was, every image it shows there
    monkeypatch.setattr(report, "atomic_open", real_open)
    page(manifest)
    assert held() == shown() == {"report/train_a/curves.png",
                                 *(f"report/predict_a/photo{i:02d}.jpg.png" for i in range(3))}
    assert not Path("wd/report/train_a/old.png").exists()


def test_the_speed_tables_say_what_the_model_ran_on(manifest):
    """One image of random noise, or real images: for SACT, whose work depends on the image, not the same figure."""
    Path("wd/profile_a").mkdir()
    doc = {"model": "fastsal_a@wd/train_a/checkpoints/epoch-0001.pt", "inputs": "random", "device": "cpu",
           "precision": "fp32", "input_size": [64, 96], "params": 3646715, "batch_size": 1,
           "modes": [{"mode": "dense", "gflops": 0.1596, "latency_ms": 15.63, "images_per_s": 63.97}]}
    for inputs, said in (("random", "noise"), ("12 images of wd/label_val", "12 images"), ("1 images of x", "1 image")):
        Path("wd/profile_a/profile.json").write_text(json.dumps({**doc, "inputs": inputs}))
        head, row = speed_table(manifest, states=UP_TO_DATE).splitlines()
        assert re.split(r"\s{2,}", head)[3:6] == ["input size", "inputs", "device"]
        assert re.split(r"\s{2,}", row)[3:6] == ["64x96", said, "cpu fp32"]
    text = page(manifest)
    assert "<th>inputs</th>" in text and "<td>64x96</td><td>1 image</td><td>cpu fp32</td>" in text
