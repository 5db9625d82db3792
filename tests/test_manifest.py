"""`pipeline run` / `pipeline status`: manifests validated up front, a pure plan, resumable execution.

Most tests work on a copy of one finished run of manifests/demo.yaml at test scale (executor local;
shard size 2, so label_val writes 6 shards of the 12 held-out photos, label_train 4 shards of 64 images;
2 training epochs of 4 steps per student); the scheduling tests use a test-only fake command.
"""

from __future__ import annotations

import copy
import hashlib
import html
import json
import os
import re
import shutil
import sys
import textwrap
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.manifest.format import Manifest, ManifestError, code_version, load_manifest
from pipeline.manifest.plan import plan, record
from pipeline.manifest.runner import (fresh_start, load_state, make_plan, run_manifest, status_rows, step_states,
                                      workdir_lock)
from pipeline.label.shards import verify_dataset
from tests.conftest import chdir, make_coco, second_epoch_started, sigkill_when

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples" / "coco"
DEMO = ROOT / "manifests" / "demo.yaml"
FULL = ROOT / "manifests" / "full.yaml"
CODE_VERSION = code_version()
SETS = [f"coco={SAMPLES}", "executor=local", "shard_size=2", "steps_per_epoch=4", "c_steps=4", "sact_steps=1",
        "epochs=2"]
OPTS = [x for s in SETS for x in ("--set", s)]
VAL = Path("runs/demo/label_val/classic/val2017")
TRAIN = Path("runs/demo/label_train/classic/train2017")
TRAIN_A, TRAIN_C = Path("runs/demo/train_a"), Path("runs/demo/train_c")
DEMO_STEPS = ["label_train", "label_val", "train_a", "train_c", "train_sact", "eval_a", "eval_c", "eval_sact",
              "eval_teacher", "predict_a", "profile_a", "profile_c", "profile_sact"]
BELOW_TRAIN_A = ["eval_a", "predict_a", "profile_a"]


def invoke(*args) -> "click.testing.Result":
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def planned(path=DEMO, sets=SETS, **selection) -> dict[str, tuple[str, str]]:
    m = load_manifest(path, sets, group=cli)
    return {p.step: (p.action, p.reason) for p in make_plan(m, load_state(m.workdir), **selection)}


def dry_run_table(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines()[2:]:
        if not line.strip():
            break
        step, action, reason = re.match(r"(\S+)\s+(run|skip)\s+(.*)", line).groups()
        rows[step] = (action, reason)
    return rows


def mtimes(folder: Path, pattern: str = "*") -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob(pattern)) if p.is_file()}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


def final_model(run: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoint"]
    return torch.load(run / "checkpoints" / latest, weights_only=True)["model"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A folder holding runs/demo: manifests/demo.yaml run to the end (relative paths, so copies stay valid)."""
    base = tmp_path_factory.mktemp("finished")
    with chdir(base):
        result = invoke("run", DEMO, *OPTS)
    assert result.exit_code == 0, result.output
    assert "[label_val] $ pipeline label coco --teacher=classic" in result.output  # streamed with a prefix
    (base / "output.txt").write_text(result.output)
    return base


@pytest.fixture
def demo(finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished demo run, as the current directory."""
    shutil.copytree(finished / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def fresh(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def edited_demo(tmp_path: Path, after: str, insert: str, occurrence: int = 0) -> Path:
    """demo.yaml with ``insert`` added as a line after the ``occurrence``-th line ``after``."""
    lines = DEMO.read_text().split("\n")
    at = [i for i, line in enumerate(lines) if line == after][occurrence]
    lines.insert(at + 1, insert)
    path = tmp_path / "demo_edited.yaml"
    path.write_text("\n".join(lines))
    return path


# -- running -------------------------------------------------------------------------------------

def test_demo_finishes_and_a_second_run_does_no_work(demo):
    assert verify_dataset(VAL) == "" and len(list(VAL.glob("shard-*.tar"))) == 6
    assert verify_dataset(TRAIN) == "" and len(list(TRAIN.glob("shard-*.tar"))) == 4
    state = load_state(Path("runs/demo"))
    assert {n: r["status"] for n, r in state["steps"].items()} == dict.fromkeys(DEMO_STEPS, "done")
    assert state["steps"]["label_val"]["output"] == "${workdir}/label_val/classic/val2017"  # moves with it
    assert json.loads((TRAIN_A / "checkpoints" / "latest.json").read_text())["epoch"] == 1  # 2 epochs
    assert set(json.loads(Path("runs/demo/eval_a/metrics.json").read_text())["metrics"]) == {"cc", "kl_div", "sim",
                                                                                           "nss"}
    teacher = json.loads(Path("runs/demo/eval_teacher/metrics.json").read_text())
    assert teacher["metrics"]["cc"] > 0.99 and teacher["images"] == 12  # every held-out photo
    assert json.loads(Path("runs/demo/predict_a/predictions.json").read_text())["maps"] == 12
    assert json.loads(Path("runs/demo/profile_c/profile.json").read_text())["params"] == 2_574_049

    assert planned() == dict.fromkeys(DEMO_STEPS, ("skip", "up to date"))
    before = mtimes(Path("runs/demo"))
    result = invoke("run", DEMO, *OPTS)
    assert result.exit_code == 0, result.output
    assert "$ pipeline" not in result.output  # no step was started
    after = mtimes(Path("runs/demo"))
    assert {k: v for k, v in after.items() if ".pipeline" not in k} == \
        {k: v for k, v in before.items() if ".pipeline" not in k}


def test_the_workdir_named_otherwise_or_moved_is_the_same_workdir(demo):
    """`--workdir` spelled another way (absolute, `./…/`), or the workdir moved (a shared filesystem mounted
    elsewhere on another machine), finds every step up to date: paths under the workdir are recorded as
    `${workdir}/…`. It restarted every train step (settings changed: run_dir /a/…→./a/…)."""
    def plan(workdir):
        m = load_manifest(DEMO, SETS, workdir=workdir, group=cli)
        return m, {p.step: (p.action, p.reason) for p in make_plan(m, load_state(m.workdir))}

    up_to_date = dict.fromkeys(DEMO_STEPS, ("skip", "up to date"))
    for workdir in (demo / "runs" / "demo", "./runs/demo/", "runs/../runs/demo"):
        assert plan(workdir)[1] == up_to_date, workdir
    state = load_state(Path("runs/demo"))
    assert state["steps"]["train_a"]["settings"]["run_dir"] == "${workdir}/train_a"
    from pipeline.manifest.format import portable  # (declared inputs under the workdir: their paths are keys)
    assert portable({"runs/demo/w.pth": "sha256:aa", "w.pth": "sha256:bb"}, Path("runs/demo"), keys=True) == \
        portable({f"{demo}/moved/w.pth": "sha256:aa", "w.pth": "sha256:bb"}, demo / "moved", keys=True) == \
        {"${workdir}/w.pth": "sha256:aa", "w.pth": "sha256:bb"}

    shutil.move("runs/demo", demo / "moved")
    assert plan(demo / "moved")[1] == up_to_date
    result = invoke("run", DEMO, *OPTS, "--workdir", demo / "moved")
    assert result.exit_code == 0 and "$ pipeline" not in result.output, result.output


def test_changing_an_option_reruns_exactly_that_step_and_its_dependents(demo, tmp_path):
    upstream = edited_demo(tmp_path, "      split: val2017", "      jpeg_quality: 90")
    plan_up = planned(upstream)
    assert plan_up["label_val"] == ("run", "settings changed: jpeg_quality 95→90")
    # the steps below run because label_val runs; whether they must is known when it has: by its output's digest
    assert plan_up["train_a"] == ("run", "upstream label_val runs")
    assert plan_up["eval_a"] == ("run", "upstream train_a, label_val run")
    assert plan_up.pop("label_train") == ("skip", "up to date")  # the training images' labels do not change
    assert all(action == "run" for action, _ in plan_up.values())

    via_var = planned(sets=SETS + ["c_epochs=3"])  # the var feeds the training step of FastSal (C)
    assert via_var["train_c"] == ("run", "settings changed: epochs 2→3")
    assert via_var["train_a"] == ("skip", "up to date")
    assert via_var["label_val"] == ("skip", "up to date") and via_var["eval_teacher"] == ("skip", "up to date")

    downstream = edited_demo(tmp_path, "      student: fastsal_a", "      momentum: 0.8")
    want = {name: ("skip", "up to date") for name in DEMO_STEPS}
    want["train_a"] = ("run", "settings changed: momentum 0.9→0.8")
    want.update({name: ("run", "upstream train_a runs") for name in BELOW_TRAIN_A})
    assert planned(downstream) == want
    untouched = {k: v for k, v in mtimes(Path("runs/demo")).items()  # the report is rewritten after a run
                 if not k.startswith((".pipeline", "report", "train_a", *BELOW_TRAIN_A))}
    losses_before = (TRAIN_A / "losses.csv").read_text()
    result = invoke("run", downstream, *OPTS)
    assert result.exit_code == 0, result.output
    assert "[train_a] $ pipeline train" in result.output and "--restart" in result.output  # starts over
    assert re.findall(r"\[(\w+)\] \$ pipeline", result.output) == ["train_a", *BELOW_TRAIN_A]
    assert {k: v for k, v in mtimes(Path("runs/demo")).items() if k in untouched} == untouched
    assert (TRAIN_A / "losses.csv").read_text() != losses_before  # retrained with the new momentum
    assert planned(downstream) == dict.fromkeys(DEMO_STEPS, ("skip", "up to date"))


def test_force_reruns_the_step_and_everything_downstream(demo):
    forced = planned(force=["label_val"])
    assert forced["label_val"] == ("run", "forced")
    assert forced["label_train"] == ("skip", "up to date")
    assert all(forced[n] == ("run", "forced (downstream of label_val)") for n in DEMO_STEPS[2:])
    forced = planned(force=["train_c"])
    assert forced["train_c"] == ("run", "forced")
    assert forced["eval_c"] == forced["profile_c"] == ("run", "forced (downstream of train_c)")
    assert forced["train_a"] == forced["eval_a"] == ("skip", "up to date")

    a_before, losses, model = mtimes(TRAIN_A), (TRAIN_C / "losses.csv").read_text(), final_model(TRAIN_C)
    result = invoke("run", DEMO, *OPTS, "--force", "train_c", "--only", "train_c")  # (its downstream left stale)
    assert result.exit_code == 0, result.output
    assert "--restart" in result.output  # forced: starts over instead of resuming
    assert re.findall(r"\[(\w+)\] \$ pipeline", result.output) == ["train_c"]
    assert mtimes(TRAIN_A) == a_before
    assert (TRAIN_C / "losses.csv").read_text() == losses  # deterministic: the same losses again
    again = final_model(TRAIN_C)
    assert all(torch.equal(again[k], v) for k, v in model.items())

    result = invoke("run", DEMO, *OPTS, "--force", "no_such_step")
    assert result.exit_code == 2 and "no step 'no_such_step'" in result.output


def test_only_and_until_select_steps(fresh):
    until = planned(until=["train_a"])
    assert until["label_train"] == until["label_val"] == until["train_a"] == ("run", "never run")
    assert until["train_c"] == ("skip", "not selected (stale: never run)")
    only = planned(only=["eval_a"])
    assert only["train_a"] == ("skip", "not selected (stale: never run)")
    assert only["eval_a"] == ("run", "never run (warning: upstream train_a, label_val are stale and not selected)")
    both = planned(until=["eval_a", "eval_c"])
    assert [n for n, (action, _) in both.items() if action == "run"] == ["label_train", "label_val", "train_a",
                                                                          "train_c", "eval_a", "eval_c"]


def test_a_forced_step_that_only_or_until_leaves_out_is_a_usage_error(fresh):
    """It would be skipped as "not selected": the force silently did nothing."""
    refused = invoke("run", DEMO, "--dry-run", "--force", "label_val", "--force", "train_c", "--only", "eval_a")
    assert refused.exit_code == 2 and refused.output.splitlines()[-1] == (
        "Error: Invalid value for --force: label_val, train_c are not among the steps --only/--until select: "
        "name them there too"), refused.output
    assert invoke("run", DEMO, "--dry-run", "--force", "label_val", "--until", "eval_a").exit_code == 0


def test_dry_run_prints_the_plan_with_reasons(demo):
    (VAL / "shard-000003.tar").unlink()
    (TRAIN_C / "checkpoints" / "latest.json").unlink()
    result = invoke("run", DEMO, *OPTS, "--dry-run")
    assert result.exit_code == 0, result.output
    rows = dry_run_table(result.output)
    assert rows["label_val"][0] == "run"
    assert rows["label_val"][1].startswith("outputs incomplete: ") and "shard-000003" in rows["label_val"][1]
    assert rows["train_a"] == ("run", "upstream label_val runs")
    assert rows["train_c"] == ("run", "outputs incomplete: no finished epoch in runs/demo/train_c")
    assert rows["eval_c"] == ("run", "upstream train_c, label_val run")
    assert "label_val: pipeline label coco --teacher=classic" in result.output
    assert ("train_c: pipeline train --labels=runs/demo/label_train/classic/train2017 --run=runs/demo/train_c"
            in result.output)
    assert not (VAL / "shard-000003.tar").exists()  # a dry run changes nothing

    result = invoke("run", DEMO, "--set", "coco=missing/coco", "--set", "executor=local", "--dry-run",
                    "--workdir", "runs/other")
    assert result.exit_code == 0, result.output
    rows = dry_run_table(result.output)
    assert rows["label_val"] == ("run", "input missing: missing/coco/annotations/instances_val2017.json")
    assert rows["train_a"] == rows["predict_a"] == ("run", "never run")
    assert result.output.rstrip().endswith("weights: no step loads any")  # the classic teacher, no backbone weights


def test_run_status_table(demo):
    result = invoke("status", DEMO, *OPTS)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[2:]}
    assert "up to date" in lines["label_val"] and str(VAL) in lines["label_val"]
    assert "up to date" in lines["eval_a"] and "runs/demo/eval_a/metrics.json" in lines["eval_a"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+\.\d s\)", lines["train_c"])

    result = invoke("status", DEMO, "--set", SETS[0], "--set", SETS[1], "--set", "shard_size=3")
    assert "stale: settings changed: shard_size 2→3" in result.output

    result = invoke("status", DEMO, *OPTS, "--workdir", "runs/none")
    assert result.output.count("never run") == len(DEMO_STEPS)


# -- the plan, on its own ------------------------------------------------------------------------

def small_manifest(tmp_path: Path, shard_size: int = 4, digest=lambda p: "sha256:aa") -> Manifest:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(f"""\
        workdir: {tmp_path / 'w'}
        steps:
          a:
            run: label
            with: {{source: coco, teacher: classic, shard_size: {shard_size}}}
            inputs: [ann.json]
          b:
            run: label
            with: {{source: folder, teacher: classic, images: "${{steps.a.out}}"}}
        """))
    return load_manifest(path, group=cli, digest=digest)


def test_plan_is_a_pure_function_of_declaration_state_and_outputs(tmp_path):
    m = small_manifest(tmp_path)
    assert m.steps["b"].needs == ("a",)  # implied by ${steps.a.out}
    assert m.steps["b"].settings["images"] == str(tmp_path / "w" / "a" / "classic" / "val2017")
    done = {"steps": {n: record(m, n, status="done") for n in m.steps}}
    frozen = copy.deepcopy(done)

    assert plan(m, {}, {}) == [("a", "run", "never run"), ("b", "run", "never run")]
    assert plan(m, done, {}) == [("a", "skip", "up to date"), ("b", "skip", "up to date")]
    assert plan(m, done, {"a": "labels.json missing"}) == [
        ("a", "run", "outputs incomplete: labels.json missing"), ("b", "run", "upstream a runs")]
    assert plan(m, done, {}, force=["a"]) == [("a", "run", "forced"), ("b", "run", "forced (downstream of a)")]
    assert done == frozen  # nothing was modified

    running = copy.deepcopy(done)
    running["steps"]["a"].update(status="running", started="2024-01-01T10:00:00+00:00")
    assert plan(m, running, {})[0] == ("a", "run", "interrupted (started 2024-01-01T10:00:00+00:00)")
    failed = copy.deepcopy(done)
    failed["steps"]["b"].update(status="failed", error="exit code 1: boom")
    assert plan(m, failed, {})[1] == ("b", "run", "failed last time: exit code 1: boom")

    m8 = small_manifest(tmp_path, shard_size=8)
    assert plan(m8, done, {}) == [("a", "run", "settings changed: shard_size 4→8"),
                                  ("b", "run", "upstream a runs")]
    changed_input = small_manifest(tmp_path, digest=lambda p: "sha256:bb")
    assert plan(changed_input, done, {})[0] == ("a", "run", "input changed: ann.json")
    missing_input = small_manifest(tmp_path, digest=lambda p: None)
    assert plan(missing_input, done, {})[0] == ("a", "run", "input missing: ann.json")
    old_code = copy.deepcopy(done)
    old_code["steps"]["a"].update(code_version="pipeline 0.0.1", fingerprint="old")
    assert m.steps["a"].code_version == CODE_VERSION and re.fullmatch(r"pipeline \S+\+[0-9a-f]{12}", CODE_VERSION)
    assert plan(m, old_code, {})[0] == ("a", "run", f"code version changed: pipeline 0.0.1→{CODE_VERSION}")
    assert plan(m, done, {}, only=["b"])[0] == ("a", "skip", "not selected")


def test_options_added_to_a_command_later_re_run_nothing_at_their_old_behaviour(tmp_path):
    """`pipeline label` got --allow-outside-root / --max-image-bytes (results) and --retry-failed /
    --overwrite-changed (how to resume): steps recorded before them keep their fingerprints."""
    settings = small_manifest(tmp_path).steps["a"].settings
    assert not {"allow_outside_root", "max_image_bytes", "retry_failed", "overwrite_changed"} & set(settings)
    capped = small_manifest(tmp_path, shard_size="4, max_image_bytes: 1000, retry_failed: true")
    assert capped.steps["a"].settings["max_image_bytes"] == 1000 and "retry_failed" not in capped.steps["a"].settings


def test_a_fingerprint_holds_what_the_upstream_steps_produced(tmp_path):
    m = small_manifest(tmp_path)
    state: dict = {"steps": {}}
    state["steps"]["a"] = record(m, "a", state, status="done", output_digest="labels:1")
    state["steps"]["b"] = record(m, "b", state, status="done", output_digest="labels:2")
    assert state["steps"]["b"]["needs"] == {"a": "labels:1"}  # a's output, not a's fingerprint
    assert plan(m, state, {}) == [("a", "skip", "up to date"), ("b", "skip", "up to date")]

    rerun = copy.deepcopy(state)  # a ran again alone (--force a --only a) and wrote other shards
    rerun["steps"]["a"]["output_digest"] = "labels:3"
    assert plan(m, rerun, {}) == [("a", "skip", "up to date"), ("b", "run", "upstream a's output changed")]
    unfinished = copy.deepcopy(state)
    unfinished["steps"]["a"].update(status="running", started="2024-01-01T10:00:00+00:00")
    assert plan(m, unfinished, {})[1] == ("b", "run", "upstream a has no finished output")


def train_manifest(tmp_path: Path, **settings) -> Manifest:
    path = tmp_path / "t.yaml"
    with_ = {"labels": "l", "epochs": 2, "backbone_weights": "none", **settings}
    path.write_text(f"workdir: {tmp_path / 'w'}\nsteps:\n  t:\n    run: train\n    with: {json.dumps(with_)}\n")
    return load_manifest(path, group=cli)


def test_a_train_step_whose_epochs_grew_trains_on(tmp_path):
    done = {"steps": {}}
    done["steps"]["t"] = record(train_manifest(tmp_path), "t", done, status="done")

    def starts_over(**settings) -> bool:
        m = train_manifest(tmp_path, **settings)
        return fresh_start(m, done, next(p for p in plan(m, done, {}) if p.step == "t"))

    assert plan(train_manifest(tmp_path, epochs=3), done, {}) == [("t", "run", "settings changed: epochs 2→3")]
    assert not starts_over(epochs=3)  # resumes from its checkpoint: the milestones do not depend on the total
    assert starts_over(epochs=1)
    assert starts_over(epochs=3, lr=0.5)
    assert starts_over(lr=0.5)
    assert not starts_over(epochs=2, workers=8)  # a volatile option: not even a change


def test_a_label_start_over_interrupted_after_it_wrote_a_shard_carries_on_keeping_what_it_made(tmp_path):
    """A label step whose recorded settings changed starts over with `--overwrite-changed` (shards of the old
    settings relabelled, those of the new kept); killed after its first new shard, it carried on as a plain resume,
    which `pipeline label` refuses (the old shards are of other settings), on every run. It carries on with that
    argument now. A change the markers do not record (shard_size) or a force starts over with `--overwrite`,
    again until it has written a shard of its own (also from a record made before this: `"fresh": true`), then
    goes on with `--overwrite-changed`."""
    from pipeline.manifest.runner import ANEW, CHANGED, command_line

    def label_manifest(quality: int = 95, shard_size: int = 4) -> Manifest:
        path = tmp_path / "l.yaml"
        path.write_text(f"workdir: {tmp_path / 'w'}\nsteps:\n  l:\n    run: label\n    with: {{source: coco, "
                        f"coco_root: {SAMPLES}, teacher: classic, jpeg_quality: {quality}, shard_size: {shard_size}}}\n")
        return load_manifest(path, group=cli)

    def how(m: Manifest, state: dict, **selection) -> str:
        (item,) = plan(m, state, {}, **selection)
        return fresh_start(m, state, item)

    old, new = label_manifest(), label_manifest(quality=80)
    state = {"steps": {}}
    state["steps"]["l"] = record(old, "l", state, status="done")
    assert how(new, state) == CHANGED and command_line(new, "l", CHANGED)[-1] == "--overwrite-changed"
    assert how(label_manifest(shard_size=3), state) == ANEW  # its finished shards would all be kept
    assert how(label_manifest(quality=80, shard_size=3), state) == ANEW
    assert how(old, state, force={"l"}) == ANEW and command_line(old, "l", ANEW)[-1] == "--overwrite"

    shard = Path(new.steps["l"].output) / "shard-000000.json"  # what the start-over makes first
    for fresh, nothing_yet, then in ((CHANGED, CHANGED, CHANGED), (ANEW, ANEW, CHANGED), (True, ANEW, CHANGED)):
        shard.unlink(missing_ok=True)
        state["steps"]["l"] = record(new, "l", state, status="running", started="2026-01-01T10:00:00+00:00",
                                     fresh=fresh)  # the runner's record of the start-over, killed
        assert how(new, state) == nothing_yet, fresh
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text("{}")
        assert how(new, state) == then, fresh


# -- bad manifests -------------------------------------------------------------------------------

STEP = "  a:\n    run: label\n    with: {source: coco, teacher: classic}\n"
BAD = {
    "invalid_yaml": ("steps:\n  a:\n    run: label\n    with: {source: coco\n  b: 1\n", 5, "invalid YAML"),
    "unknown_top_key": ("workdir: w\nstep:\n" + STEP, 2, "unknown top-level key 'step' (did you mean 'steps'?)"),
    "var_cycle": ('vars:\n  a: "${b}"\n  b: "${a}"\nsteps:\n' + STEP, 2,
                  "unresolved ${a} in var 'a' (vars refer to each other in a cycle: a -> b -> a)"),
    "cycle": ("steps:\n  a:\n    run: label\n    needs: [b]\n  b:\n    run: label\n    needs: [a]\n", 2,
              "cycle in needs: a -> b -> a"),
    "unknown_needs": ("steps:\n" + STEP + "    needs: [b]\n", 5, "step 'a' needs unknown step 'b'"),
    "unknown_command": ("steps:\n  a:\n    run: lable\n", 3, "unknown command 'lable' (did you mean 'label'?)"),
    "unknown_option": ("steps:\n" + STEP + "  b:\n    run: label\n    with:\n      source: coco\n"
                       "      shard_sise: 4\n", 9,
                       "unknown option 'shard_sise' for `label` (did you mean 'shard_size'?)"),
    "unknown_option_near_a_flag": ("steps:\n  t:\n    run: train\n    with: {labels: l, init_ckp: r}\n", 4,
                                   "unknown option 'init_ckp' for `train` (did you mean 'init'?)"),  # as written
    "mistyped_value": ("steps:\n  a:\n    run: label\n    with:\n      source: coco\n      teacher: classic\n"
                       "      shard_size: many\n", 7,
                       "Invalid value for '--shard-size': 'many' is not a valid integer"),
    "bad_choice": ("steps:\n  a:\n    run: label\n    with:\n      source: coco\n      teacher: nope\n", 6,
                   "Invalid value for '--teacher': 'nope' is not one of"),
    "missing_required": ("steps:\n  a:\n    run: label\n    with: {source: coco}\n", 2, "Missing option '--teacher'"),
    "unresolved_var": ("vars: {teacher: classic}\nsteps:\n  a:\n    run: label\n    with:\n      source: coco\n"
                       "      teacher: ${teachr}\n", 7, "unresolved ${teachr} in teacher (did you mean 'teacher'?)"),
    "unterminated_ref": ("vars: {coco: c, literal: '$${coco'}\nsteps:\n  a:\n    run: label\n    with:\n"
                         "      source: folder\n      teacher: classic\n      images: ${coco/val2017\n", 8,
                         "step 'a': '${coco/val2017' has no closing '}' in images"),  # ($$ keeps the var's ${ literal)
    "unknown_step_ref": ("steps:\n" + STEP + "  b:\n    run: label\n    with:\n      source: folder\n"
                         "      teacher: classic\n      images: ${steps.c.out}\n", 10, "names unknown step 'c'"),
    "duplicate_key": ("steps:\n" + STEP + "  a:\n    run: label\n", 5, "duplicate key 'a' (first at line 2)"),
    "duplicate_key_in_a_step": ("steps:\n  a:\n    run: eval\n    with: {checkpoint: x}\n    run: label\n", 5,
                                "duplicate key 'run' (first at line 3)"),  # alone: not the other command's options
    "unknown_step_key": ("steps:\n" + STEP + "    resourcs: {gpus: 1}\n", 5, "unknown key 'resourcs'"),
    "unknown_resource": ("steps:\n" + STEP + "    resources: {cpu: 1}\n", 5,
                         "step 'a': unknown resource 'cpu' (did you mean 'cpus'?)"),
    "with_as_a_list": ("steps:\n  a:\n    run: label\n    with: [source, teacher]\n", 4,
                       "step 'a': 'with' must be a mapping of option: value"),
    "url_input": ("steps:\n  a:\n    run: label\n    with: {source: coco, teacher: classic, coco_root: 's3://b/c',\n"
                  "      weights: 'https://example.org/w.pth'}\n", 2,
                  "step 'a': s3://b/c is a URL: `pipeline label` reads --coco-root from a local or shared-filesystem "
                  "path only (URLs are taken by --out)"),
    "url_input_named_by_flag": ("steps:\n  t:\n    run: train\n"
                                "    with: {labels: l, teacher_weights: 's3://b/w.pt'}\n", 2,
                                "step 't': s3://b/w.pt is a URL: `pipeline train` reads --teacher-weights from a "
                                "local or shared-filesystem path only (URLs are taken by --gt-maps, --init, --labels, --run, "
                                "--val-labels)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_is_refused_with_file_and_line(case, fresh):
    text, line, message = BAD[case]
    Path(f"{case}.yaml").write_text(text)
    result = invoke("run", f"{case}.yaml", "--dry-run")
    assert result.exit_code == 2, result.output
    assert f"Error: {case}.yaml:{line}: " in result.output and message in result.output, result.output
    assert not Path("runs").exists()  # nothing was started
    if case == "duplicate_key_in_a_step":
        assert result.output.count("Error: ") == 1, result.output


@pytest.mark.parametrize("when", ["reading the manifest", "planning"])
def test_ctrl_c_while_no_step_runs_is_an_interrupted_run_not_an_abort(fresh, monkeypatch, when):
    """Ctrl-C while the manifest is read (its inputs hashed: a big one takes a while) or planned was click's
    `Aborted!`, exit status 1; it is the exit status 130 and the line of every interrupted command."""
    from pipeline.manifest import format as manifest_format
    from pipeline.manifest import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((manifest_format, "load_manifest") if when == "reading the manifest"
                          else (runner, "make_plan")), interrupted)
    if when == "planning":  # (`run` plans once before it takes the workdir, its outputs unchecked)
        monkeypatch.setattr(runner, "plan", interrupted)
    Path("m.yaml").write_text("workdir: w\nsteps:\n" + STEP)
    for command in (["run", "m.yaml"], ["run", "m.yaml", "--dry-run"], ["status", "m.yaml"]):
        if command[0] == "status" and when == "planning":
            continue
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 130, result.output
        assert result.output.splitlines()[-1] == ("interrupted (no step was running): run the same command again to "
                                                  "carry on"), result.output
    assert not Path("w").exists() or not any(Path("w").rglob("state.json"))


def more_steps(text: str) -> str:
    """Steps to follow :data:`LABELS_FIRST` (under its ``steps:``), written at any indentation."""
    return textwrap.indent(textwrap.dedent(text), "  ")


#: a manifest's first lines: its workdir and a label step of the samples
LABELS_FIRST = textwrap.dedent(f"""\
    workdir: w
    steps:
      labels:
        run: label
        with: {{source: coco, teacher: classic, coco_root: {SAMPLES}, split: val2017, executor: local}}
    """)


def test_options_a_command_refuses_together_are_manifest_errors_before_any_step(fresh):
    """eval's --val-shards with --fixations, or --student-output with --teacher, were refused when the step came
    up, after the steps above it had run: they are errors of the manifest, with the step's line."""
    Path("f.h5").touch()
    Path("m.yaml").write_text(LABELS_FIRST + more_steps(f"""\
          score:
            run: eval
            with: {{teacher: classic, fixations: f.h5, val_shards: 2}}
          maps:
            run: predict
            with: {{teacher: classic, student_output: sigmoid, images: {SAMPLES}/val2017}}
        """))
    result = CliRunner().invoke(cli, ["run", "m.yaml"])
    assert result.exit_code == 2 and result.output.splitlines() == [
        "Error: m.yaml:6: step 'score': --val-shards goes with --labels (the held-out shards of a label folder); "
        "--fixations scores every image of the file (--limit takes fewer)",
        "Error: m.yaml:9: step 'maps': --student-output goes with --student, not --teacher (a checkpoint records its "
        "student's output; a teacher's map is its own)"], result.output
    assert not Path("w").exists()


def test_how_a_step_names_its_model_map_runtime_and_settings_are_manifest_errors_before_any_step(fresh):
    """What the model, --map, --image-size, --runtime and a train step's student, options and stage say together was
    found when each step came up (after hours of the steps above), some only once a model was built: each is an
    error of the manifest, with the step's line, before anything runs."""
    Path("f.h5").touch()
    Path("m.yaml").write_text(LABELS_FIRST + more_steps(f"""\
          ponder_teacher:
            run: eval
            with: {{teacher: classic, fixations: f.h5, map: ponder}}
          sized_teacher:
            run: eval
            with: {{teacher: classic, labels: "${{steps.labels.out}}", image_size: 64x96}}
          two_models:
            run: eval
            with: {{teacher: classic, checkpoint: w/run, fixations: f.h5}}
          no_reference:
            run: eval
            with: {{checkpoint: w/run}}
          int8:
            run: predict
            with: {{checkpoint: w/run, images: {SAMPLES}/val2017, runtime: onnx-int8}}
          tiled:
            run: train
            with: {{labels: "${{steps.labels.out}}", student: fastsal_a, tile: 2}}
          taught:
            run: train
            with: {{labels: "${{steps.labels.out}}", teacher: classic}}
          tau:
            run: profile
            with: {{student: sact, tau: 0.1}}
        """))
    result = CliRunner().invoke(cli, ["run", "m.yaml", "--dry-run"])
    assert result.exit_code == 2 and result.output.splitlines() == [
        "Error: m.yaml:6: step 'ponder_teacher': --map ponder is a student's map; a teacher has its saliency map alone",
        "Error: m.yaml:11: step 'sized_teacher': Invalid value for '--image-size': a teacher runs at its own input size; "
        "--image-size goes with a student (--checkpoint or --student)",
        "Error: m.yaml:12: step 'two_models': name the model with exactly one of --checkpoint, --teacher or --student "
        "(got --checkpoint, --teacher)",
        "Error: m.yaml:15: step 'no_reference': give exactly one of --fixations FILE.h5 or --labels FOLDER",
        "Error: m.yaml:18: step 'int8': --runtime onnx-int8 needs --calibration: a label folder or a folder of images",
        "Error: m.yaml:21: step 'tiled': --tile is an option of act, sact, not of fastsal_a",
        "Error: m.yaml:24: step 'taught': --teacher is for the hint stage (--stage hint); the finetune stage learns "
        "from the labels' teacher",
        "Error: m.yaml:27: step 'tau': --tau weights sact's training loss alone and changes no map it computes: give it "
        "to `pipeline train`, not here"], result.output
    assert not Path("w").exists()


def test_a_path_a_step_needs_that_is_missing_stops_the_run_before_any_step(fresh):
    """A mistyped local path (`images: .../val2071`) was found when its step came up, after every step above it
    had run (hours, on COCO): `pipeline run` names it, with the step's line, and starts nothing; `--dry-run`
    warns. A path below a step's output folder is that step's to make, not missing."""
    Path("m.yaml").write_text(LABELS_FIRST + more_steps(f"""\
          train:
            run: train
            with: {{labels: "${{steps.labels.out}}", val_labels: w/labels/classic/val2017, gt_maps: maps/val2071}}
          predict:
            run: predict
            with: {{checkpoint: "${{steps.train.out}}", images: {SAMPLES}/val2071}}
        """))
    result = CliRunner().invoke(cli, ["run", "m.yaml"])
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        f"Error: m.yaml:6: step 'train': --gt-maps maps/val2071 does not exist (relative to the current folder, "
        f"{Path.cwd()})",  # (a bundled manifest run from outside the repository: its paths are relative)
        f"Error: m.yaml:9: step 'predict': --images {SAMPLES}/val2071 does not exist"]
    assert not Path("w").exists()  # the label step did not start, and the workdir was not made
    dry = CliRunner().invoke(cli, ["run", "m.yaml", "--dry-run"])
    assert dry.exit_code == 0 and ("warning: m.yaml:9: step 'predict': --images " f"{SAMPLES}/val2071 does not exist: "
                                   "`pipeline run` starts no step while it is missing") in dry.output, dry.output


def test_a_manifest_that_is_not_text_is_one_line(fresh):
    Path("m.yaml").write_bytes(b"\x00\x01 not yaml")
    result = invoke("run", "m.yaml", "--dry-run")
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "Error: m.yaml: invalid YAML: unacceptable character #x0000: special characters are not allowed"], result.output


def test_every_problem_is_reported_at_once(fresh):
    Path("m.yaml").write_text("bogus: 1\nsteps:\n  a:\n    run: lable\n  b:\n    run: label\n    with: {x: 1}\n")
    with pytest.raises(ManifestError) as e:
        load_manifest("m.yaml", group=cli)
    assert [re.match(r"m\.yaml:(\d+):", x).group(1) for x in e.value.errors] == ["1", "4", "7"]


def test_a_command_of_a_subgroup_can_be_a_step(fresh):
    group = click.Group()
    tools = click.Group("tools")
    group.add_command(tools)
    tools.add_command(click.Command("echo", params=[click.Argument(["words"], nargs=-1),
                                                    click.Option(["--times", "-t"], type=int, default=1)]))
    Path("m.yaml").write_text("steps:\n  a:\n    run: tools  echo\n    with: {words: [hi, -x], times: 2}\n")
    step = load_manifest("m.yaml", group=group).steps["a"]
    assert (step.command, step.args, step.settings) == ("tools echo", ("--times=2", "--", "hi", "-x"),
                                                        {"words": ["hi", "-x"], "times": 2})
    Path("m.yaml").write_text("steps:\n  a:\n    run: tools\n")
    with pytest.raises(ManifestError, match=r"m\.yaml:3: step 'a': `tools` is a group: name one of its commands"):
        load_manifest("m.yaml", group=group)


def test_full_manifest_passes_dry_run_validation(fresh, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(fresh / "torch"))  # an empty weights cache
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    cache = fresh / "torch" / "hub" / "checkpoints"
    deepgaze = f"{cache}/deepgaze2e.pth, {cache}/centerbias_mit1003.npy"  # the DeepGaze steps' weights are inputs
    result = invoke("run", FULL, "--dry-run")
    assert result.exit_code == 0, result.output
    rows = dry_run_table(result.output)
    assert len(rows) == 43 and all(action == "run" for action, _ in rows.values())
    assert rows["label_train_deepgaze"][1] == f"input missing: data/coco/annotations/instances_train2017.json, {deepgaze}"
    assert rows["label_test_salgan"][1] == ("input missing: data/coco/annotations/image_info_test2017.json, "
                                            "data/weights/salgan_generator.pt")
    assert rows["hint_c_salgan"][1] == "input missing: data/weights/salgan_generator.pt"
    assert rows["eval_teacher_deepgaze"][1] == rows["profile_teacher_deepgaze"][1] == f"input missing: {deepgaze}"
    assert rows["finetune_a_deepgaze"][1] == "never run"
    assert rows["fixations_mit1003"][1] == "input missing: data/MIT1003/ALLFIXATIONMAPS"
    assert "--teacher=deepgaze" in result.output and "--shard-size=1000" in result.output
    assert ("finetune_a_deepgaze: pipeline train --labels=runs/full/label_train_deepgaze/deepgaze/train2017 "
            "--labels=runs/full/label_test_deepgaze/deepgaze/test2017") in result.output
    assert "--init=runs/full/hint_c_salgan" in result.output and "--stage=hint" in result.output
    # the SALICON models (SalGAN's labels, then its human maps too), SACT-101, CAT2000 at the SACT paper's sizes
    assert rows["fixations_salicon_val"][1] == "input missing: data/SALICON/fixations/val"
    assert rows["fixations_cat2000"][1] == "input missing: data/CAT2000/trainSet/FIXATIONLOCS"
    assert "--gt-maps=data/SALICON/maps/train" in result.output and "--init=runs/full/hint_c_salicon" in result.output
    assert "--depth=101" in result.output and "--image-size=352x640" in result.output
    assert not Path("runs").exists()


# -- interruption and the lock -------------------------------------------------------------------

def test_sigkill_during_a_label_step_then_rerun_gives_the_same_shards(fresh):
    # 96 photos in 48 shards (the sample's 12, each under 8 ids): the rest of the step outlasts the 10 ms
    # between a first finished shard and the kill, however fast labelling gets
    coco = fresh / "coco"
    (coco / "val2017").mkdir(parents=True)
    files = {}
    for i, src in enumerate(sorted((SAMPLES / "val2017").glob("*.jpg")) * 8):
        files[i + 1] = f"{i + 1:012d}.jpg"
        shutil.copy(src, coco / "val2017" / files[i + 1])
    make_coco(coco, "val2017", files)
    opts = [*OPTS, "--set", f"coco={coco}"]
    whole = fresh / "whole"
    whole.mkdir()
    with chdir(whole):
        assert invoke("run", DEMO, *opts, "--until", "label_val").exit_code == 0

    sigkill_when(["run", DEMO, *opts, "--until", "label_val"], lambda: any(VAL.glob("shard-*.json")),
                 "the first finished shard")
    assert not (VAL / "labels.json").exists(), "the step was not interrupted"
    assert planned(sets=[*SETS, f"coco={coco}"], until=["label_val"])["label_val"][1].startswith("interrupted (started ")

    result = invoke("run", DEMO, *opts, "--until", "label_val")
    assert result.exit_code == 0, result.output
    assert "--overwrite" not in result.output  # resumed, not restarted
    assert re.search(r"[1-9]\d* already done", result.output)
    assert len(digests(VAL)) == 48 and digests(VAL) == digests(whole / VAL)
    assert verify_dataset(VAL) == ""


def test_sigkill_during_a_train_step_then_rerun_gives_the_same_model(finished, fresh):
    for step in ("label_train", "label_val"):  # labels as the runner left them
        shutil.copytree(finished / "runs" / "demo" / step, f"runs/demo/{step}")
    state = load_state(finished / "runs" / "demo")
    state["steps"] = {k: state["steps"][k] for k in ("label_train", "label_val")}
    Path("runs/demo/.pipeline").mkdir(parents=True)
    Path("runs/demo/.pipeline/state.json").write_text(json.dumps(state))
    losses = TRAIN_A / "losses.csv"
    sigkill_when(["run", DEMO, *OPTS, "--until", "train_a"], second_epoch_started(TRAIN_A), "the second epoch")
    assert json.loads((TRAIN_A / "checkpoints" / "latest.json").read_text())["epoch"] == 0, "not killed mid-epoch 2"
    assert planned(until=["train_a"])["train_a"][1].startswith("interrupted (started ")

    result = invoke("run", DEMO, *OPTS, "--until", "train_a")
    assert result.exit_code == 0, result.output
    assert "--restart" not in result.output and "resuming runs/demo/train_a after epoch 1" in result.output
    assert losses.read_text() == (finished / losses).read_text()  # the interrupted epoch's rows are replaced
    assert (TRAIN_A / "metrics.csv").read_text().splitlines()[1:] and \
        [r.split(",")[:3] for r in (TRAIN_A / "metrics.csv").read_text().splitlines()] == \
        [r.split(",")[:3] for r in (finished / TRAIN_A / "metrics.csv").read_text().splitlines()]
    resumed, uninterrupted = final_model(TRAIN_A), final_model(finished / TRAIN_A)
    assert all(torch.equal(resumed[k], v) for k, v in uninterrupted.items())


def test_the_lock_refuses_a_second_runner(fresh):
    with workdir_lock(Path("runs/demo")):
        result = invoke("run", DEMO, *OPTS)
    assert result.exit_code == 1
    assert f"another `pipeline run` (pid {os.getpid()}) is running in workdir runs/demo" in result.output
    assert not Path("runs/demo/label_val").exists()


def test_a_dry_run_beside_an_active_runner_says_its_steps_are_running_not_interrupted(fresh):
    m = load_manifest(DEMO, SETS, group=cli)
    state_file = Path("runs/demo/.pipeline/state.json")
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"steps": {"label_val": record(m, "label_val", status="running",
                                                                    started="2026-11-26 10:00:00")}}))
    with workdir_lock(Path("runs/demo")):
        result = invoke("run", DEMO, *OPTS, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "(workdir runs/demo; a runner is active: its steps are running now):" in result.output
    assert dry_run_table(result.output)["label_val"] == ("run", "running now (started 2026-11-26 10:00:00)")
    alone = invoke("run", DEMO, *OPTS, "--dry-run")  # the runner gone: interrupted
    assert dry_run_table(alone.output)["label_val"] == ("run", "interrupted (started 2026-11-26 10:00:00)")


def test_a_state_file_that_cannot_be_written_is_one_line_and_stops_the_steps(fresh, monkeypatch):
    import pipeline.manifest.runner as runner

    real = runner.write_json

    def full(path, obj):
        if Path(path).name == "state.json" and (obj.get("steps") or {}).get("label_val", {}).get("status") == "done":
            raise OSError(28, "No space left on device", str(path))
        real(path, obj)

    monkeypatch.setattr(runner, "write_json", full)
    result = invoke("run", DEMO, *OPTS, "--until", "train_a")  # label_val's "done" cannot be written
    assert result.exit_code == 1 and not isinstance(result.exception, OSError), result.output
    assert result.output.splitlines()[-1] == (
        "Error: cannot write the state file runs/demo/.pipeline/state.json (No space left on device: "
        "runs/demo/.pipeline/state.json); any running step was stopped, and the next run carries on from the last "
        "state written")
    steps = json.loads(Path("runs/demo/.pipeline/state.json").read_text())["steps"]
    assert steps["label_val"]["status"] == "running"  # the last state written: the next run resumes it


def test_a_lock_left_by_a_killed_runner_is_taken_over(fake, tmp_path, capsys):
    import socket
    import subprocess

    lock = tmp_path / "w" / ".pipeline" / "lock"
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    for left in (json.dumps({"host": socket.gethostname(), "pid": dead.pid}), f"{dead.pid}\n"):  # ours, flock's
        lock.write_text(left)
        os.utime(lock, (time.time() - 60, time.time() - 60))
        code, out, log = fake("steps:\n  a: {run: fake, with: {name: a}}\n")
        assert code == 0, out
        assert f"note: took over the stale lock {lock}" in capsys.readouterr().err
        assert not lock.exists()
    lock.write_text(json.dumps({"host": "node-7", "pid": 4242}))
    with pytest.raises(click.ClickException, match=r"another `pipeline run` \(pid 4242 on host node-7\) may be "
                                                   f"running in workdir {tmp_path / 'w'}; this host cannot tell: if "
                                                   f"it is not, delete {lock}"):
        fake("steps:\n  a: {run: fake, with: {name: a}}\n")


# -- scheduling, with a test-only fake command ---------------------------------------------------

FAKE = """\
import json, os, sys, time
name = next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--name="))
log = os.environ["FAKE_LOG"]
def note(event):
    with open(log, "a") as f:
        f.write(json.dumps([name, event, os.environ.get("CUDA_VISIBLE_DEVICES"), time.monotonic()]) + "\\n")
def started(other):
    return any(json.loads(l)[:2] == [other, "start"] for l in open(log))
note("start")
print(f"hello from {name}")
if name in ("g1", "g2"):  # each waits for the other: they must run at the same time, on different GPUs
    deadline = time.monotonic() + 30
    while not started("g2" if name == "g1" else "g1") and time.monotonic() < deadline:
        time.sleep(0.01)
note("end")
sys.exit(3 if "--fail" in sys.argv else 0)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    group = click.Group()

    @group.command("fake")
    @click.option("--name", required=True)
    @click.option("--fail", is_flag=True)
    def fake_cmd(name, fail):
        """Stands for a real command: only parsed, never run in-process."""

    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    log = tmp_path / "log.jsonl"
    log.touch()
    monkeypatch.setenv("FAKE_LOG", str(log))

    def run(text: str, **kw) -> tuple[int, str, list]:
        path = tmp_path / "fake.yaml"
        path.write_text(f"workdir: {tmp_path / 'w'}\n" + textwrap.dedent(text))
        lines: list[str] = []
        code = run_manifest(load_manifest(path, group=group), launcher=[sys.executable, str(script)],
                            echo=lambda s="", err=False: lines.append(s), **kw)
        return code, "\n".join(lines), [json.loads(x) for x in log.read_text().splitlines()]

    return run


def test_gpu_steps_wait_for_a_free_gpu(fake):
    code, out, log = fake("""\
        steps:
          g1: {run: fake, with: {name: g1}, resources: {gpus: 1}}
          g2: {run: fake, with: {name: g2}, resources: {gpus: 1}}
          g3: {run: fake, with: {name: g3}, resources: {gpus: 1}}
          cpu: {run: fake, with: {name: cpu}, resources: {cpus: 1}}
        """, jobs=4, cpus=4, gpus=2)
    assert code == 0, out
    assert "[g3] hello from g3" in out
    events = {(n, e): (gpu, t) for n, e, gpu, t in log}
    assert {events["g1", "start"][0], events["g2", "start"][0]} == {"0", "1"}
    assert events["g1", "start"][1] < events["g2", "end"][1] and events["g2", "start"][1] < events["g1", "end"][1]
    first_free = min(events["g1", "end"][1], events["g2", "end"][1])
    assert events["g3", "start"][1] > first_free  # waited for a GPU
    assert events["cpu", "start"][0] == ""  # a step sees only the GPUs it declared


def test_keep_going_finishes_independent_steps(fake, tmp_path):
    text = """\
        steps:
          broken: {run: fake, with: {name: broken, fail: true}}
          child: {run: fake, with: {name: child}, needs: [broken]}
          independent: {run: fake, with: {name: independent}}
        """
    code, out, log = fake(text)
    assert code == 1 and "Error: step failed: broken" in out
    assert [n for n, e, *_ in log if e == "start"] == ["broken"]
    assert re.search(r"independent\s+run\s+not run: stopped after broken failed", out)

    code, out, log = fake(text, keep_going=True)
    assert code == 1 and "Error: step failed: broken" in out
    assert "[broken] failed after" in out and "exit code 3: hello from broken" in out
    assert [n for n, e, *_ in log if e == "start"] == ["broken", "broken", "independent"]
    assert re.search(r"child\s+run\s+not run: upstream broken failed", out)
    assert {n: r["status"] for n, r in load_state(tmp_path / "w")["steps"].items()} == {
        "broken": "failed", "independent": "done"}


# -- the run's summary and report ----------------------------------------------------------------

class Page:
    """The tables (rows of cell texts) and image sources of an HTML page, read with html.parser."""

    def __init__(self, text: str):
        from html.parser import HTMLParser

        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        page = self

        class Parser(HTMLParser):
            cell = None

            def handle_starttag(self, tag, attrs):
                if tag == "table":
                    page.tables.append([])
                elif tag == "tr":
                    page.tables[-1].append([])
                elif tag in ("td", "th"):
                    self.cell = ""
                elif tag == "img":
                    page.images.append(dict(attrs)["src"])

            def handle_endtag(self, tag):
                if tag in ("td", "th"):
                    page.tables[-1][-1].append(self.cell)
                    self.cell = None

            def handle_data(self, data):
                if self.cell is not None:
                    self.cell += data

        Parser().feed(text)


EVAL_STEPS = ["eval_a", "eval_c", "eval_sact", "eval_teacher"]


def test_the_run_ends_with_every_eval_steps_scores_and_writes_a_report(finished, demo):
    out = (finished / "output.txt").read_text()
    scores = out.split("\nscores (")[1].split("\n\nspeed (")[0].splitlines()[1:]
    assert re.split(r"\s{2,}", scores[0]) == ["step", "model", "images", "cc", "kl_div", "sim", "nss", "data"]
    rows = {line.split()[0]: re.split(r"\s{2,}", line) for line in scores[1:]}
    assert sorted(rows) == EVAL_STEPS
    for name in EVAL_STEPS:  # every metric of every eval step's JSON, as written, and what it scored
        doc = json.loads(Path(f"runs/demo/{name}/metrics.json").read_text())
        assert rows[name][3:] == [f"{doc['metrics'][m]:.4f}" for m in ("cc", "kl_div", "sim", "nss")] + [doc["data"]]
    assert rows["eval_a"][1:3] == ["fastsal_a (train_a)", "12"] and rows["eval_teacher"][1] == "teacher classic"
    assert "report: runs/demo/report.html\n" in out

    # then how fast each profiled student is: a row per execution path, as each profile.json says
    speed = out.split("\n\nspeed (every profile step, on its device):\n")[1].split("\nreport: ")[0].splitlines()
    assert speed[0].split("  ")[0] == "step" and "GFLOPs / image" in speed[0] and speed[0].endswith("images/s")
    expected = []
    for name in ("profile_a", "profile_c", "profile_sact"):
        doc = json.loads(Path(f"runs/demo/{name}/profile.json").read_text())
        expected += [[name, mode["mode"] if len(doc["modes"]) > 1 else "-", f"{mode['gflops']:.3f}",
                      f"{mode['images_per_s']:.1f}"] for mode in doc["modes"]]
    got = [[line.split()[0], line.split()[3], *line.split()[-3:-2], line.split()[-1]] for line in speed[1:]]
    assert got == expected and [r[1] for r in got] == ["-", "-", "dense", "sparse"]  # (FastSal has one path)

    page = Page(Path("runs/demo/report.html").read_text())
    speed_head, *speed_body = page.tables[1]
    assert speed_head[-1] == "images/s" and [[r[0], r[2], r[8], r[10]] for r in speed_body] == expected
    assert [r[4] for r in speed_body] == ["noise", "noise", "12 images", "12 images"]  # (SACT on the photos)
    head, *body = page.tables[0]
    assert head[:7] == ["step", "model", "images", "cc", "kl_div", "sim", "nss"]
    assert sorted(r[0] for r in body) == EVAL_STEPS
    assert {r[0]: r[3:] for r in body} == {name: rows[name][3:] for name in EVAL_STEPS}  # the terminal's, data too
    assert page.images, "the report shows no image"
    for src in page.images:
        assert not src.startswith(("/", "file:", "http")), src  # relative: the page works when copied
        assert (Path("runs/demo") / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert {"report/train_a/curves.png", "report/train_c/curves.png"} <= set(page.images)
    for name in ("eval_a", "eval_c"):  # image | teacher | student for held-out photos
        assert len([s for s in page.images if s.startswith(f"report/{name}/")]) == 4
    assert len([s for s in page.images if s.startswith("report/predict_a/")]) == 6
    assert len(list(Path("runs/demo/predict_a/compare").glob("*.png"))) == 12

    result = invoke("run", DEMO, *OPTS)  # nothing to do: the same scores, and the report is left as it is
    assert result.exit_code == 0, result.output
    assert result.output.split("\nscores (")[1].split("\nreport: ")[0] == \
        out.split("\nscores (")[1].split("\nreport: ")[0]
    assert "report: runs/demo/report.html (up to date)" in result.output


def test_scores_of_an_eval_step_that_has_not_run_since_it_changed_are_marked_stale(demo, tmp_path):
    """Its metrics file is of what it scored before (the run stopped before it, or it was not selected); the
    report written before the edit is not up to date (it was, by the state file alone, and kept eval_a current;
    so was it with a step deleted from the manifest)."""
    from pipeline.manifest.report import scores_table, up_to_date

    def current(m):
        return up_to_date(m, state, step_states(m, state))

    state = load_state(Path("runs/demo"))
    assert "(stale)" not in scores_table(load_manifest(DEMO, SETS, group=cli), state)
    assert current(load_manifest(DEMO, SETS, group=cli))
    old = 'labels: "${steps.label_val.out}", val_shards: 0}'
    text = DEMO.read_text()
    i = text.index("  eval_a:")
    edited = tmp_path / "demo.yaml"  # (the same name)
    edited.write_text(text[:i] + text[i:].replace(old, old.replace("0}", "1}"), 1))
    table = scores_table(load_manifest(edited, SETS, group=cli), state)
    assert "eval_a (stale)" in table and "eval_c (stale)" not in table, table
    assert not current(load_manifest(edited, SETS, group=cli))
    edited.write_text(text[:text.index("  profile_sact:")])  # (the last step)
    fewer = load_manifest(edited, SETS, group=cli)
    assert "profile_sact" not in fewer.steps and not current(fewer)


TINY = """\
workdir: wd
vars:
  lr: 0.05
  images: {images}
steps:
  train_a:
    run: train
    with: {{labels: "{labels}", student: fastsal_a, epochs: 1, steps_per_epoch: 1, batch_size: 4, lr: "${{lr}}",
           backbone_weights: none, workers: 0}}
  eval_a:
    run: eval
    with: {{checkpoint: "${{steps.train_a.out}}", labels: "{labels}", val_shards: 0}}
    inputs: [note.txt]
  predict_a:
    run: predict
    with: {{checkpoint: "${{steps.train_a.out}}", images: "${{images}}", format: png, compare_teacher: classic}}
"""


@pytest.fixture(scope="module")
def tiny_finished(tmp_path_factory, sample_labels) -> Path:
    """A folder holding tiny.yaml (train one step, score and predict on the held-out photos) run to the end in
    ``wd`` (relative paths, so copies stay valid)."""
    base = tmp_path_factory.mktemp("tiny")
    (base / "tiny.yaml").write_text(TINY.format(images=SAMPLES / "val2017", labels=sample_labels))
    (base / "note.txt").write_text("an input of eval_a\n")
    with chdir(base):
        result = invoke("run", "tiny.yaml")
    assert result.exit_code == 0, result.output
    return base


@pytest.fixture
def tiny(tiny_finished, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished tiny run, as the current directory."""
    shutil.copytree(tiny_finished, tmp_path / "tiny")
    monkeypatch.chdir(tmp_path / "tiny")
    return tmp_path / "tiny"


def report_steps(page: Page) -> dict[str, str]:
    """The report's steps table: {step: status}."""
    head, *rows = next(t for t in page.tables if t[0] == ["step", "command", "status", "seconds"])
    return {r[0]: r[2] for r in rows}


def status_says(*args) -> dict[str, str]:
    result = invoke("status", "tiny.yaml", *args)
    assert result.exit_code == 0, result.output
    return {line.split()[0]: re.split(r"\s{2,}", line)[1] for line in result.output.splitlines()[2:] if line.strip()}


def test_a_retrained_checkpoint_draws_no_sheets_for_the_old_scores(tiny):
    """eval_a's metrics (its ranks, its CC) are of the checkpoint train_a made before: sheets drawn from the new
    one would be captioned with them. The page's steps say what `pipeline status` says."""
    result = invoke("run", "tiny.yaml", "--set", "lr=0.01", "--only", "train_a")
    assert result.exit_code == 0, result.output
    text = html.unescape(Path("wd/report.html").read_text())
    page = Page(text)
    assert not [s for s in page.images if s.startswith("report/eval_a/")], page.images
    assert "eval_a: held-out images</h3><p class=\"note\">(stale: upstream train_a's output changed): no sheets drawn" in text
    assert report_steps(page) == status_says("--set", "lr=0.01") == {
        "train_a": "up to date", "eval_a": "stale: upstream train_a's output changed",
        "predict_a": "stale: upstream train_a's output changed"}
    # predict_a's sheets are its own outputs, of its last run: shown, and said to be so
    assert ("predict_a: 6 of 12 maps at full size; mean CC with teacher classic: " in text
            and "<p class=\"note\">(stale: upstream train_a's output changed): the sheets of its last run</p>" in text)


def train_by_hand(labels) -> None:
    trained = invoke("train", "--run", "wd/train_a", "--labels", labels, "--student", "fastsal_a", "--epochs", 2,
                     "--steps-per-epoch", 1, "--batch-size", 4, "--lr", 0.05, "--backbone-weights", "none",
                     "--workers", 0, "--no-progress")
    assert trained.exit_code == 0, trained.output


def test_a_run_folder_trained_on_by_hand_is_noticed_and_what_scores_it_runs_again(tiny, sample_labels):
    """`pipeline status` (without --checksums) tells by the sha256 its latest.json records that train_a's folder is
    not what the step made; `pipeline run` runs the step again (train carries on from what the folder holds: nothing
    to do) and the steps that read it, so eval_a's scores and sheets are of the checkpoint there now."""
    train_by_hand(sample_labels)
    changed = ("stale: outputs incomplete: wd/train_a changed since the step made it (its latest checkpoint is not "
               "what it made: a command run by hand?)")
    assert status_says() == {"train_a": changed, "eval_a": "stale: upstream train_a is stale",
                             "predict_a": "stale: upstream train_a is stale"}
    from pipeline.manifest.report import scores_table  # its rows are marked as `pipeline status` calls the steps

    m, state = load_manifest(Path("tiny.yaml"), group=cli), load_state(Path("wd"))
    assert "eval_a (stale)" in scores_table(m, state, step_states(m, state))
    result = invoke("run", "tiny.yaml")
    assert result.exit_code == 0, result.output
    assert re.findall(r"^\[(\w+)\] \$ pipeline", result.output, re.M) == ["train_a", "eval_a", "predict_a"], result.output
    assert status_says() == {"train_a": "up to date", "eval_a": "up to date", "predict_a": "up to date"}
    assert json.loads(Path("wd/eval_a/metrics.json").read_text())["model"].endswith("/epoch-0001.pt")
    assert [s for s in Page(html.unescape(Path("wd/report.html").read_text())).images if s.startswith("report/eval_a/")]


def test_a_checkpoint_trained_on_by_hand_draws_no_sheets_for_the_scores_of_the_one_before(tiny, sample_labels):
    """A run folder whose latest.json records no sha256 (an older run's) trained on by hand: `pipeline status`
    cannot tell, and calls eval_a up to date; the report's check of the checkpoint its metrics name can."""
    train_by_hand(sample_labels)
    pointer = Path("wd/train_a/checkpoints/latest.json")
    pointer.write_text(json.dumps({k: v for k, v in json.loads(pointer.read_text()).items() if k != "sha256"}))
    assert status_says() == {"train_a": "up to date", "eval_a": "up to date", "predict_a": "up to date"}
    Path("wd/report.html").unlink()
    result = invoke("run", "tiny.yaml")
    assert result.exit_code == 0, result.output
    text = html.unescape(Path("wd/report.html").read_text())
    assert not [s for s in Page(text).images if s.startswith("report/eval_a/")]
    assert ("(stale: its metrics are of wd/train_a/checkpoints/epoch-0000.pt, the checkpoint now is "
            "wd/train_a/checkpoints/epoch-0001.pt): no sheets drawn") in text


def test_the_report_says_a_failed_steps_error_and_a_step_whose_input_went_missing(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    Path("note.txt").unlink()
    result = invoke("run", "tiny.yaml", "--set", f"images={empty}", "--keep-going")
    assert result.exit_code == 1, result.output
    steps = report_steps(Page(Path("wd/report.html").read_text()))
    assert steps == status_says("--set", f"images={empty}")
    assert steps["eval_a"] == "stale: input missing: note.txt"  # its record says done: it was refused, not run
    assert steps["predict_a"].startswith("failed: ") and "no images" in steps["predict_a"], steps


def test_a_run_with_nothing_run_rewrites_the_report_when_a_steps_status_changed(tiny):
    result = invoke("run", "tiny.yaml", "--set", "lr=0.01", "--only", "eval_a")  # train_a stale, not selected
    assert result.exit_code == 0 and not re.search(r"^\w+\s+run\s", result.output, re.M), result.output
    assert "report: wd/report.html\n" in result.output
    steps = report_steps(Page(Path("wd/report.html").read_text()))
    assert steps["train_a"] == "stale: settings changed: lr 0.05→0.01"
    again = invoke("run", "tiny.yaml", "--set", "lr=0.01", "--only", "eval_a")
    assert "report: wd/report.html (up to date)" in again.output


def test_the_report_of_a_moved_workdir_shows_the_sheets_there(tiny):
    shutil.copytree("wd", "moved")
    shutil.rmtree("wd")
    Path("moved/report.html").unlink()  # (written again, as after a step ran)
    sheets = sorted(Path("moved/predict_a/compare").glob("*.png"))
    assert len(sheets) == 12
    sheets[-1].unlink()
    result = invoke("run", "tiny.yaml", "--workdir", "moved")
    assert result.exit_code == 0, result.output
    assert (f"warning: report: 1 of the 12 sheets moved/predict_a/predictions.json lists are missing from "
            f"moved/predict_a/compare (e.g. {sheets[-1].name})") in result.output
    text = Path("moved/report.html").read_text()
    shown = [s for s in Page(text).images if s.startswith("report/predict_a/")]
    ccs = json.loads(Path("moved/predict_a/predictions.json").read_text())["cc_with_teacher"]
    by_cc = sorted((cc, k) for k, cc in ccs.items() if f"{k}.png" != sheets[-1].name)  # worst to best, of those there
    assert shown == [f"report/predict_a/{by_cc[i][1]}.png" for i in (0, 2, 4, 6, 8, 10)]
    assert all((Path("moved") / s).is_file() for s in shown)
    assert '<p class="note">all sheets: predict_a/compare</p>' in text  # relative to the page, as its images
    assert len([s for s in Page(text).images if s.startswith("report/eval_a/")]) == 4  # its metrics name wd/…


def test_the_curves_and_their_caption_agree_after_a_stop_between_an_epochs_row_and_its_plot(tiny):
    from pipeline.manifest.report import write_report

    run = Path("wd/train_a")
    drawn = (run / "curves.png").read_bytes()
    last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")
    with open(run / "metrics.csv", "a") as f:  # epoch 2's row, its plot never drawn (stopped in between)
        f.write(",".join(["1", *last[1:]]) + "\n")
    m, state = load_manifest(Path("tiny.yaml"), group=cli), load_state(Path("wd"))
    write_report(m, state, step_states(m, state), force=True)
    assert "after epoch 2: " in Path("wd/report.html").read_text()
    assert Path("wd/report/train_a/curves.png").read_bytes() != drawn  # drawn again, with epoch 2
    assert (run / "curves.png").read_bytes() == drawn  # the step's output left as it was

    with open(run / "metrics.csv", "a") as f:  # a crash's half-written row: the curves cannot be drawn again...
        f.write("\0" * 12)
    path, written, warnings = write_report(m, state, step_states(m, state), force=True)
    assert written and Path("wd/report/train_a/curves.png").read_bytes() == drawn  # ...the page shows them as are
    assert len(warnings) == 1 and warnings[0].startswith("train_a: its curves could not be drawn again from "), \
        warnings


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failure(demo):
    Path("runs/demo/report.html").unlink()
    Path("runs/demo/report.html").mkdir()  # in the way
    result = invoke("run", DEMO, *OPTS)
    assert result.exit_code == 0, result.output
    assert "warning: cannot write the report in runs/demo" in result.output
    assert "\nscores (" in result.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render the report with (Debian: apt-get install chromium)")
def test_the_report_renders_offline_in_a_headless_browser(finished, tmp_path):
    import subprocess

    import cv2
    import numpy as np

    copy = tmp_path / "copy"  # the page and its images, moved elsewhere together
    shutil.copytree(finished / "runs" / "demo" / "report", copy / "report")
    shutil.copy(finished / "runs" / "demo" / "report.html", copy / "report.html")
    shot = tmp_path / "shot.png"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           "--window-size=1280,6000", (copy / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=300)
    assert shot.is_file(), done.stdout + done.stderr
    img = cv2.imread(str(shot))
    assert img.shape[:2] == (6000, 1280)
    header = np.all(img == (255, 238, 238), axis=-1)  # the tables' header cells (#eef, in BGR)
    assert header.sum() > 2000, "no table header drawn"
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    colourful = (hsv[..., 1] > 120) & (hsv[..., 2] > 60)  # the maps' colour map, the photos, the curves
    rows = np.flatnonzero(colourful.sum(axis=1) > 100)
    assert len(rows) > 1000, "hardly any image drawn"
    assert rows.max() - rows.min() > 2000  # images all down the page, not one broken icon


def test_a_step_computes_on_as_many_threads_as_cpus_it_holds(tmp_path, monkeypatch):
    group = click.Group()
    group.add_command(click.Command("fake", params=[click.Option(["--name"])]))
    script = tmp_path / "threads.py"
    script.write_text("import os\nprint('threads', os.environ.get('OMP_NUM_THREADS'), os.environ.get('MKL_NUM_THREADS'))\n")
    path = tmp_path / "m.yaml"
    path.write_text(f"workdir: {tmp_path / 'w'}\nsteps:\n"
                    "  one: {run: fake, with: {name: one}, resources: {cpus: 1}}\n"
                    "  two: {run: fake, with: {name: two}, resources: {cpus: 2}}\n"
                    "  big: {run: fake, with: {name: big}, resources: {cpus: 64}}\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)

    def run() -> str:
        lines: list[str] = []
        code = run_manifest(load_manifest(path, group=group), launcher=[sys.executable, str(script)], cpus=4,
                            force=["one", "two", "big"], echo=lambda s="", err=False: lines.append(s))
        assert code == 0, lines
        return "\n".join(lines)

    out = run()
    assert "[one] threads 1 1" in out and "[two] threads 2 2" in out and "[big] threads 4 4" in out
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert "[two] threads 3 2" in run()


# -- content fingerprints, locks and the runner's children, with test-only commands ---------------

MAKER = """\
import json, os, sys, time
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([opts["name"], "start", opts.get("fresh"), time.monotonic()]) + "\\n")
os.makedirs(os.path.dirname(opts["out"]), exist_ok=True)
if os.environ.get("MAKE_STALL") == opts["name"]:  # a step that never ends (killed by the test)
    time.sleep(300)
if os.environ.get("MAKE_KILLED") == opts["name"]:  # as the kernel's out-of-memory killer does
    import signal
    os.kill(os.getpid(), signal.SIGKILL)
if os.environ.get("MAKE_REFUSE") == opts["name"] and "fresh" not in opts:  # as train refuses other settings
    print("Error: its output was made with other settings; use --fresh")
    sys.exit(1)
made = os.environ.get("MAKE_" + opts["name"].upper(), opts["name"])
source = open(opts["src"]).read() if "src" in opts else ""
with open(opts["out"], "w") as f:
    f.write(made + "<" + source)
"""


@pytest.fixture
def maker(tmp_path, monkeypatch):
    """`make --name N [--src FILE] [--note X]`: writes $MAKE_N (default N) plus FILE's content to its output file,
    a command the runner knows as it knows `eval` (output file, its sha256 as the output's digest), started over
    with `--fresh=yes`; with checksums, an output folder holding a file `corrupt` fails its check."""
    from pipeline.manifest.steps import COMMANDS, CommandSpec

    group = click.Group()
    group.add_command(click.Command("make", params=[click.Option(["--name"], required=True), click.Option(["--src"]),
                                                    click.Option(["--note"]), click.Option(["--out"])]))
    monkeypatch.setitem(COMMANDS, "make", CommandSpec(
        defaults={"out": lambda workdir, step: workdir / step / "out.txt"}, output=lambda params: Path(params["out"]),
        verify=lambda p, checksums: f"{p} not written" if not p.is_file() else
        "checksum differs" if checksums and (p.parent / "corrupt").exists() else "", fresh=("--fresh=yes",),
        digest=lambda p: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest(),
        lock=lambda p: p.parent / ".lock"))
    script = tmp_path / "make.py"
    script.write_text(MAKER)
    log = tmp_path / "log.jsonl"
    log.touch()
    monkeypatch.setenv("FAKE_LOG", str(log))
    path = tmp_path / "make.yaml"

    def run(text: str, workdir: Path | None = None, **kw) -> tuple[int, str, list[str]]:
        path.write_text(f"workdir: {workdir or tmp_path / 'w'}\n" + textwrap.dedent(text))
        lines: list[str] = []
        start = len(log.read_text().splitlines())
        code = run_manifest(load_manifest(path, group=group), launcher=[sys.executable, str(script)],
                            echo=lambda s="", err=False: lines.append(s), **kw)
        return code, "\n".join(lines), [json.loads(x)[0] for x in log.read_text().splitlines()[start:]]

    def planned(**kw) -> dict[str, tuple[str, str]]:
        m = load_manifest(path, group=group)
        return {p.step: (p.action, p.reason) for p in make_plan(m, load_state(m.workdir), **kw)}

    def status() -> dict[str, str]:
        m = load_manifest(path, group=group)
        return {row[0]: row[1] for row in status_rows(m, load_state(m.workdir))}

    run.plan, run.status = planned, status
    return run


MAKE_AB = """\
    steps:
      a: {run: make, with: {name: a, note: %s}}
      b: {run: make, with: {name: b, src: "${steps.a.out}"}}
    """


def test_a_steps_seconds_read_the_same_at_the_runs_end_in_status_and_in_the_report(maker, monkeypatch, tmp_path):
    """The state records them to the millisecond; the run's end table printed the unrounded value: a step of
    0.0496 s was 0.0 there, 0.1 in `pipeline status` and the report."""
    import itertools
    import types

    from pipeline.manifest import runner

    ticks = itertools.count()  # each reading of the runner's clock 0.0496 s after the one before
    monkeypatch.setattr(runner, "time", types.SimpleNamespace(monotonic=lambda: next(ticks) * 0.0496,
                                                              sleep=time.sleep))
    code, out, started = maker("steps:\n  a: {run: make, with: {name: a}}\n")
    assert code == 0 and started == ["a"], out
    assert "[a] done in 0.1 s" in out and re.search(r"^a\s+run\s+done\s+0\.1$", out, re.M), out
    assert maker.status() == {"a": "up to date"} and load_state(tmp_path / "w")["steps"]["a"]["seconds"] == 0.05
    assert "<td>a</td><td>make</td><td>up to date</td><td>0.1</td>" in (tmp_path / "w" / "report.html").read_text()


def test_a_step_reruns_when_its_upstream_output_changed_and_only_then(maker, monkeypatch, tmp_path):
    code, out, started = maker(MAKE_AB % "one")
    assert code == 0 and started == ["a", "b"], out
    assert (tmp_path / "w" / "b" / "out.txt").read_text() == "b<a<"

    # a runs again alone and writes the same: b stays up to date
    code, out, started = maker(MAKE_AB % "one", force=["a"], only=["a"])
    assert code == 0 and started == ["a"]
    assert maker.plan() == {"a": ("skip", "up to date"), "b": ("skip", "up to date")}

    # a runs again alone and writes something else (from what the manifest does not declare): b is stale
    monkeypatch.setenv("MAKE_A", "A")
    code, out, started = maker(MAKE_AB % "one", force=["a"], only=["a"])
    assert code == 0 and started == ["a"]
    assert maker.plan() == {"a": ("skip", "up to date"), "b": ("run", "upstream a's output changed")}
    assert maker.status()["b"] == "stale: upstream a's output changed"
    code, out, started = maker(MAKE_AB % "one")
    assert code == 0 and started == ["b"] and (tmp_path / "w" / "b" / "out.txt").read_text() == "b<A<"

    # a's settings change but not what it writes: b was to run because a runs, and is found up to date after it
    assert maker.plan() == {"a": ("skip", "up to date"), "b": ("skip", "up to date")}
    code, out, started = maker(MAKE_AB % "two")
    assert code == 0 and started == ["a"], out
    assert "[b] up to date: its upstream output is unchanged" in out
    assert re.search(r"b\s+run\s+up to date: upstream output unchanged", out)
    assert maker.plan() == {"a": ("skip", "up to date"), "b": ("skip", "up to date")}


def test_a_corrupt_output_found_by_checksums_is_made_again(maker, tmp_path):
    """`pipeline run --checksums`: the plan finds the output corrupt, and the runner's own check before it
    starts the step does too (it skipped the step as 'up to date' and left the corruption there)."""
    assert maker(MAKE_AB % "one")[0] == 0
    (tmp_path / "w" / "a" / "corrupt").touch()
    assert maker.plan(checksums=True)["a"] == ("run", "outputs incomplete: checksum differs")
    code, out, started = maker(MAKE_AB % "one", checksums=True)
    assert code == 0 and started == ["a"], out
    assert "[a] up to date" not in out and "[b] up to date: its upstream output is unchanged" in out
    # an output its own check passes, edited since (an eval's metrics.json emptied or rewritten): its content
    # digest is not the one recorded when the step finished; only --checksums reads it
    (tmp_path / "w" / "a" / "corrupt").unlink()
    output = tmp_path / "w" / "b" / "out.txt"
    output.write_text("edited by hand")
    assert maker.plan()["b"] == ("skip", "up to date")
    assert maker.plan(checksums=True)["b"] == ("run", f"outputs incomplete: {output} changed since the step made it "
                                                     "(its content digest differs)")
    code, out, started = maker(MAKE_AB % "one", checksums=True)
    assert code == 0 and started == ["b"] and output.read_text() != "edited by hand", out


def test_an_eval_or_profile_report_emptied_or_cut_short_is_not_up_to_date(tmp_path):
    from pipeline.manifest.steps import COMMANDS

    report = tmp_path / "metrics.json"
    for command in ("eval", "profile"):
        check = COMMANDS[command].verify
        assert check(report, False) == f"{report} not written"
        for text in ("", '{"cc": 0.5', "[1, 2]"):
            report.write_text(text)
            assert check(report, False) == f"{report} is not the JSON object the command writes"
        report.write_text('{"cc": 0.5}')
        assert check(report, False) == ""
        report.unlink()


def test_an_export_steps_model_deleted_is_made_again(fresh):
    """`export` had no entry among the commands the runner knows: a deleted .onnx stayed "up to date" for good."""
    Path("m.yaml").write_text("workdir: runs/m\nsteps:\n  onnx:\n    run: export\n"
                              "    with: {student: fastsal_a, weights: random, image_size: 64x96}\n")
    first = invoke("run", "m.yaml")
    assert first.exit_code == 0 and Path("runs/m/onnx/model.onnx").is_file(), first.output
    Path("runs/m/onnx/model.onnx").unlink()
    m = load_manifest("m.yaml", group=cli)
    (item,) = make_plan(m, load_state(m.workdir))
    assert item.action == "run" and "model.onnx not written" in item.reason, item.reason
    again = invoke("run", "m.yaml")
    assert again.exit_code == 0 and Path("runs/m/onnx/model.onnx").is_file(), again.output


def test_renaming_an_upstream_step_that_makes_the_same_output_remakes_nothing_below_it(maker, tmp_path):
    """`a` renamed `first` (its output where it was): `first` runs (never run under that name) and makes the same
    output; `b` below it was made again, as "now needs first; no longer needs a". A real change still counts."""
    out = tmp_path / "w" / "a" / "out.txt"
    assert maker(MAKE_AB % "one")[0] == 0
    renamed = """\
        steps:
          first: {run: make, with: {name: a, note: %s, out: "%s"}}
          b: {run: make, with: {name: b, src: "${steps.first.out}"}}
        """
    code, out_text, started = maker(renamed % ("one", out))
    assert code == 0 and started == ["a"], out_text  # (the log names each run by its --name)
    assert "[b] up to date: its upstream output is unchanged" in out_text
    assert maker.plan() == {"first": ("skip", "up to date"), "b": ("skip", "up to date")}
    assert maker.status()["b"] == "up to date"
    (tmp_path / "make.yaml").write_text(f"workdir: {tmp_path / 'w'}\n" + textwrap.dedent(  # b's own change only
        renamed.replace("{name: b,", "{name: b, note: x,") % ("one", out)))
    assert maker.plan()["b"] == ("run", "settings changed: note none→x")  # (not "now needs first; no longer …")
    code, out_text, started = maker(renamed.replace("name: a,", "name: other,") % ("one", out))
    assert code == 0 and started == ["other", "b"], out_text


def test_renaming_an_upstream_step_in_a_moved_workdir_remakes_nothing_below_it(maker, tmp_path):
    """The same rename in a workdir moved since (a copy of a run's workdir, a shared filesystem mounted elsewhere):
    its recorded output was compared as the absolute path it had, so `b` was made again (`train` from scratch)."""
    assert maker(MAKE_AB % "one")[0] == 0
    shutil.move(tmp_path / "w", tmp_path / "moved")
    renamed = """\
        steps:
          first: {run: make, with: {name: a, note: one, out: "${workdir}/a/out.txt"}}
          b: {run: make, with: {name: b, src: "${steps.first.out}"}}
        """
    code, out_text, started = maker(renamed, workdir=tmp_path / "moved")
    assert code == 0 and started == ["a"], out_text
    assert "[b] up to date: its upstream output is unchanged" in out_text
    state = json.loads((tmp_path / "moved" / ".pipeline" / "state.json").read_text())
    assert state["steps"]["first"]["output"] == "${workdir}/a/out.txt"  # recorded so: the same when moved again


def test_a_step_without_an_output_records_none(tmp_path):
    """(Recorded as the string "None" once outputs were recorded as ${workdir}/… .)"""
    from pipeline.manifest.plan import record

    (tmp_path / "m.yaml").write_text(f"workdir: {tmp_path / 'wd'}\nsteps:\n  t: {{run: teachers}}\n")
    assert record(load_manifest(tmp_path / "m.yaml", group=cli), "t")["output"] is None


def test_an_up_to_date_step_selected_alone_says_its_upstream_is_stale(maker, tmp_path):
    """`--only b` after a's settings changed: b is up to date with a's old output, which the plan said nothing of."""
    assert maker(MAKE_AB % "one")[0] == 0
    (tmp_path / "make.yaml").write_text((tmp_path / "make.yaml").read_text().replace("note: one", "note: two"))
    assert maker.plan(only=["b"]) == {"a": ("skip", "not selected (stale: settings changed: note one→two)"),
                                      "b": ("skip", "up to date (warning: upstream a is stale and not selected)")}


def test_a_killed_runners_running_steps_are_interrupted_once_another_runner_holds_the_workdir(maker, tmp_path):
    """A runner killed with `kill -9` leaves its step recorded as running; the next runner (here one that does
    not run that step: --only b) records it interrupted at once, so that `pipeline status` beside it does not
    say it is running."""
    assert maker(MAKE_AB % "one")[0] == 0
    path = tmp_path / "w" / ".pipeline" / "state.json"
    state = json.loads(path.read_text())
    state["steps"]["a"].update(status="running", started="2026-11-26T10:00:00+00:00")
    path.write_text(json.dumps(state))
    code, out, started = maker(MAKE_AB % "one", only=["b"])
    assert code == 0 and started == ["b"], out  # (its upstream has no finished output: it runs, with a warning)
    rec = json.loads(path.read_text())["steps"]["a"]
    assert rec["status"] == "interrupted" and "stopped before it finished" in rec["error"]
    assert maker.status()["a"] == ("stale: interrupted last time: the `pipeline run` running it was stopped before "
                                   "it finished")


def test_an_input_missing_for_a_while_then_back_unchanged_throws_nothing_away(maker, tmp_path):
    """A step not started for a missing input keeps its record as it was: with the input back unchanged it is up
    to date again (it read as 'input changed' and started over, which deletes a label folder or a run's epochs);
    a step that never ran is still 'never run'."""
    source = tmp_path / "source.txt"
    source.write_text("data")
    text = """\
        steps:
          a: {run: make, with: {name: a, src: "%s"}, inputs: ["%s"]}
        """ % (source, source)
    assert maker(text)[0] == 0
    source.rename(tmp_path / "away.txt")
    code, out, started = maker(text)
    assert code == 1 and "[a] failed: input missing" in out and started == []
    assert maker.plan()["a"] == ("run", "input missing: " + str(source))
    (tmp_path / "away.txt").rename(source)
    assert maker.plan()["a"] == ("skip", "up to date")
    more = text.rstrip(" ") + '          b: {run: make, with: {name: b}, inputs: ["%s"]}\n' % (tmp_path / "later.txt")
    assert maker(more)[0] == 1 and maker.plan()["b"] == ("run", "input missing: " + str(tmp_path / "later.txt"))
    (tmp_path / "later.txt").write_text("here")
    assert maker.plan()["b"] == ("run", "never run")


def test_a_start_over_that_was_interrupted_starts_over_again(maker, tmp_path, monkeypatch):
    """A step started over (its settings changed) and killed before it finished must start over again: resumed
    instead, it would keep what it made from the old settings (a model of the old labels)."""
    import signal
    import subprocess

    assert maker(MAKE_AB % "one")[0] == 0
    path = tmp_path / "make.yaml"  # (holding MAKE_AB % "one" now)
    path.write_text(path.read_text().replace("note: one", "note: two"))
    monkeypatch.setenv("MAKE_STALL", "a")
    script = textwrap.dedent("""\
        import sys, click
        from pipeline.manifest.format import load_manifest
        from pipeline.manifest.runner import run_manifest
        from pipeline.manifest.steps import COMMANDS, CommandSpec
        from pathlib import Path
        COMMANDS["make"] = CommandSpec(defaults={"out": lambda workdir, step: workdir / step / "out.txt"},
                                       output=lambda params: Path(params["out"]),
                                       verify=lambda p, checksums: "", digest=lambda p: "x", fresh=("--fresh=yes",))
        group = click.Group()
        group.add_command(click.Command("make", params=[click.Option([o]) for o in
                                                         ("--name", "--src", "--note", "--out")]))
        sys.exit(run_manifest(load_manifest(sys.argv[1], group=group), launcher=[sys.executable, sys.argv[2]]))
        """)
    (tmp_path / "runner.py").write_text(script)
    runner = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(path), str(tmp_path / "make.py")],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "log.jsonl"
    deadline = time.monotonic() + 60
    while sum(1 for line in log.read_text().splitlines() if '"start", "yes"' in line) < 1:
        assert runner.poll() is None and time.monotonic() < deadline, "the step did not start"
        time.sleep(0.05)
    os.killpg(runner.pid, signal.SIGKILL)
    runner.wait()
    monkeypatch.delenv("MAKE_STALL")
    assert maker.plan()["a"][1].startswith("interrupted")
    code, out, started = maker(MAKE_AB % "two")
    assert code == 0 and started[0] == "a" and "[a] $ pipeline make" in out and "--fresh=yes" in out, out


def test_a_train_step_with_no_readable_checkpoint_left_starts_over_instead_of_failing_every_run(fresh):
    """A done train step whose latest checkpoint went missing resumes from an older one that reads; with none
    left, `pipeline train` would fail on every run ('start over with --restart'): the runner adds --restart."""
    (fresh / "m.yaml").write_text("workdir: wd\nsteps:\n  t: {run: train, with: {labels: labels, epochs: 2}}\n")
    m = load_manifest(fresh / "m.yaml", group=cli)
    state = {"steps": {}}
    state["steps"]["t"] = record(m, "t", state, status="done")
    ckpt = fresh / "wd" / "t" / "checkpoints"
    ckpt.mkdir(parents=True)
    (fresh / "wd" / "t" / "config.json").write_text(json.dumps({"epochs": 2}))
    (ckpt / "latest.json").write_text(json.dumps({"checkpoint": "epoch-0001.pt", "epoch": 1}))
    (step,) = make_plan(m, state)
    assert step.reason.startswith("outputs incomplete: checkpoint named by") and fresh_start(m, state, step)
    older = {"model": {}, "student": "fastsal_a", "optimizer": {}, "scheduler": {}, "epoch": 0, "global_step": 1,
             "rng": {}, "config": {}}
    torch.save({"model": {}, "student": "fastsal_a"}, ckpt / "epoch-0000.pt")  # it reads, but holds no state to
    assert fresh_start(m, state, make_plan(m, state)[0])                      # resume from
    torch.save(older, ckpt / "epoch-0000.pt")  # an older one to resume from
    assert not fresh_start(m, state, make_plan(m, state)[0])


def test_a_step_killed_by_a_signal_says_so(maker, monkeypatch):
    monkeypatch.setenv("MAKE_KILLED", "a")
    code, out, started = maker(MAKE_AB % "one")
    assert code == 1 and re.search(r"\[a\] failed after [\d.]+ s: killed by SIGKILL", out), out
    assert maker.plan()["a"] == ("run", "failed last time: killed by SIGKILL")


def test_an_interrupted_start_over_that_made_checkpoints_carries_on_from_them(fresh):
    """`train --restart` deletes the old checkpoints first: once the start-over has written one of its own, an
    interruption resumes from it (90 epochs of the new settings are not thrown away); before that, it starts
    over again."""
    from datetime import datetime, timedelta

    from pipeline.manifest.plan import Planned

    (fresh / "m.yaml").write_text("workdir: wd\nsteps:\n  t: {run: train, with: {labels: labels, epochs: 2}}\n")
    m = load_manifest(fresh / "m.yaml", group=cli)
    started = (datetime.now().astimezone() - timedelta(seconds=30)).isoformat(timespec="seconds")
    state = {"steps": {}}
    state["steps"]["t"] = record(m, "t", state, status="running", started=started, fresh=True)
    item = Planned("t", "run", "interrupted")
    ckpt = fresh / "wd" / "t" / "checkpoints"
    ckpt.mkdir(parents=True)
    old = ckpt / "epoch-0000.pt"
    old.write_bytes(b"from before the start-over")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert fresh_start(m, state, item)
    (ckpt / "epoch-0001.pt").write_bytes(b"written by the start-over")
    assert not fresh_start(m, state, item)


def test_a_workdir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "m.yaml").write_text("workdir: /proc/no/such/wd\nsteps:\n  t: {run: teachers}\n")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "m.yaml")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: cannot create workdir /proc/no/such/wd ("), r.output


def test_a_step_whose_output_folder_is_locked_is_not_started(maker, tmp_path, monkeypatch):
    from pipeline.common.locks import FolderLock
    from pipeline.manifest import runner
    from pipeline.manifest.steps import COMMANDS
    from pipeline.train.loop import run_lock

    assert COMMANDS["train"].lock(Path("runs/x")) == run_lock("runs/x").path  # the lock `pipeline train` takes
    monkeypatch.setattr(runner, "LOCK_GRACE_S", 0.2)  # how long a step waits for a lock being let go of
    with FolderLock(tmp_path / "w" / "a" / ".lock", command="pipeline make"):
        code, out, started = maker(MAKE_AB % "one")
    assert code == 1 and started == []
    assert (f"[a] failed: output folder {tmp_path / 'w' / 'a' / 'out.txt'} is locked by another process (pid "
            f"{os.getpid()} on this host") in out and "not started: wait for it to finish or stop it" in out
    assert load_state(tmp_path / "w")["steps"]["a"]["status"] == "failed"
    code, out, started = maker(MAKE_AB % "one")  # let go of: it runs
    assert code == 0 and started == ["a", "b"]

    # a start-over (--force) refused by the lock did not begin: the record keeps what a last ran with, marked
    # failed, and names no start-over, so what the lock's holder writes meanwhile is never taken for its work
    done = load_state(tmp_path / "w")["steps"]["a"]
    with FolderLock(tmp_path / "w" / "a" / ".lock", command="pipeline make"):
        code, out, started = maker(MAKE_AB % "one", force=["a"])
    assert code == 1 and started == []
    after = load_state(tmp_path / "w")["steps"]["a"]
    assert after["status"] == "failed" and "is locked by another process" in after["error"]
    assert not after.get("fresh") and after["started"] == done["started"]
    assert {k: v for k, v in after.items() if k not in ("status", "error", "ended", "seconds")} == \
        {k: v for k, v in done.items() if k not in ("status", "ended", "seconds")}


RUNNER = """\
import sys, click
from pipeline.manifest.format import load_manifest
from pipeline.manifest.runner import run_manifest
group = click.Group()
group.add_command(click.Command("sleep", params=[click.Option(["--name"])]))
sys.exit(run_manifest(load_manifest(sys.argv[1], group=group), launcher=[sys.executable, sys.argv[2]]))
"""
SLEEPER = """\
import os, sys, time
open(os.environ["SLEEPER_PID"] + ".tmp", "w").write(str(os.getpid()))
os.rename(os.environ["SLEEPER_PID"] + ".tmp", os.environ["SLEEPER_PID"])
time.sleep(300)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_runner_killed_alone_leaves_no_step_behind(tmp_path):
    import signal
    import subprocess

    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    (tmp_path / "m.yaml").write_text(f"workdir: {tmp_path / 'w'}\nsteps:\n  s: {{run: sleep, with: {{name: s}}}}\n")
    pid_file = tmp_path / "sleeper.pid"
    runner = subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "m.yaml"),
                               str(tmp_path / "sleeper.py")], cwd=ROOT, stdout=subprocess.DEVNULL,
                              env={**os.environ, "SLEEPER_PID": str(pid_file), "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not pid_file.exists():
        assert runner.poll() is None, "the runner ended before its step started"
        assert time.monotonic() < deadline, "the step did not start"
        time.sleep(0.05)
    step = int(pid_file.read_text())
    assert os.getpgid(step) == step != os.getpgid(runner.pid)  # its own process group
    runner.send_signal(signal.SIGKILL)  # the runner only: not its process group
    runner.wait()
    deadline = time.monotonic() + 60
    while not gone(step) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(step), "the step outlived its runner"


def test_more_epochs_in_the_manifest_train_on_from_the_checkpoint(demo):
    state = load_state(Path("runs/demo"))["steps"]
    assert state["label_val"]["output_digest"].startswith("labels:")  # what the steps below are fingerprinted with
    assert state["train_a"]["output_digest"].startswith("checkpoint:")
    assert state["train_a"]["needs"] == {name: state[name]["output_digest"] for name in ("label_train", "label_val")}
    losses = (TRAIN_A / "losses.csv").read_text().splitlines()
    sets = [s for s in SETS if not s.startswith("epochs=")] + ["epochs=3"]
    assert planned(sets=sets, until=["train_a"])["train_a"] == ("run", "settings changed: epochs 2→3")
    result = invoke("run", DEMO, *[x for s in sets for x in ("--set", s)], "--until", "train_a")
    assert result.exit_code == 0, result.output
    assert "--restart" not in result.output and "resuming runs/demo/train_a after epoch 2 (step 8)" in result.output, \
        result.output
    now = (TRAIN_A / "losses.csv").read_text().splitlines()
    assert now[:len(losses)] == losses and len(now) > len(losses)  # the first two epochs kept, a third one added
    assert json.loads((TRAIN_A / "checkpoints" / "latest.json").read_text())["epoch"] == 2
    assert planned(sets=sets, until=["train_a"])["train_a"] == ("skip", "up to date")


def test_a_folder_source_step_is_stale_when_its_images_change_and_two_steps_may_not_share_an_output(fresh):
    """The images a folder-source label step reads are an input it need not declare (a new photo was never
    labelled: the step stayed "up to date"); a label folder inside the image folder is not among them."""
    images = fresh / "photos"
    shutil.copytree(ROOT / "samples" / "coco" / "val2017", images)
    Path("m.yaml").write_text(textwrap.dedent(f"""\
        workdir: {images}/runs
        steps:
          photos:
            run: label
            with: {{source: folder, images: {images}, teacher: classic, executor: local, image_size: 64x96,
                    out: {images}/labels}}
        """))
    first = invoke("run", "m.yaml")
    assert first.exit_code == 0, first.output
    assert invoke("run", "m.yaml", "--dry-run").output.count("up to date") == 1  # its own labels are no input
    (images / ".thumbnails").mkdir()  # nor are hidden files, which `pipeline label` leaves out
    (images / ".thumbnails" / "new.jpg").write_bytes(b"x")
    assert invoke("run", "m.yaml", "--dry-run").output.count("up to date") == 1
    shutil.copy(images / sorted(p.name for p in images.glob("*.jpg"))[0], images / "new.jpg")
    assert dry_run_table(invoke("run", "m.yaml", "--dry-run").output)["photos"] == (
        "run", f"input changed: {images}")
    again = invoke("run", "m.yaml")
    assert again.exit_code == 0 and "--overwrite" in again.output, again.output
    assert json.loads((images / "labels" / "classic" / "photos" / "labels.json").read_text())["count"] == 13

    Path("m.yaml").write_text(Path("m.yaml").read_text() + f"  again:\n    run: label\n    with: {{source: folder, "
                              f"images: {images}, teacher: classic, out: {images}/labels, shard_size: 4}}\n")
    refused = invoke("run", "m.yaml", "--dry-run")
    assert refused.exit_code == 2 and (f"steps 'photos' and 'again' write the same output "
                                       f"{images}/labels/classic/photos") in refused.output, refused.output


def test_a_train_steps_ground_truth_maps_are_an_input_it_need_not_declare(fresh):
    """A map of --gt-maps replaced or added makes the train step stale; a train step without gt_maps keeps the
    fingerprint it had before the option existed."""
    maps = fresh / "maps"
    maps.mkdir()
    (maps / "a.png").write_bytes(b"map a")
    body = textwrap.dedent("""\
        steps:
          labels:
            run: label
            with: {source: coco, teacher: classic, coco_root: coco}
          train:
            run: train
            with: {labels: "${steps.labels.out}"%s}
        """)

    def fingerprint(extra: str = f", gt_maps: {maps}") -> str:
        Path("m.yaml").write_text(body % extra)
        step = load_manifest("m.yaml", group=cli).steps["train"]
        return step.own_fingerprint

    before = fingerprint()
    assert fingerprint() == before
    (maps / "a.png").write_bytes(b"map A, redrawn")
    assert fingerprint() != before
    changed = fingerprint()
    (maps / "b.png").write_bytes(b"map b")
    assert fingerprint() != changed
    without = fingerprint("")
    assert fingerprint(", gt_maps: null") == without


def test_a_step_refused_for_what_its_output_holds_says_how_to_start_it_over_in_a_manifest(maker, monkeypatch, tmp_path):
    """train says "use --restart" (label "--overwrite"): no option a manifest user gives; --force STEP is."""
    monkeypatch.setenv("MAKE_REFUSE", "a")
    code, out, started = maker(MAKE_AB % "one")
    assert code == 1 and started == ["a"]
    assert "note: in a manifest, `--force a` added to this `pipeline run` starts step a over (--fresh=yes)" in out
    state = json.loads((tmp_path / "w" / ".pipeline" / "state.json").read_text())  # what status and the report show
    assert state["steps"]["a"]["error"].endswith(" [in a manifest, `--force a` added to this `pipeline run` starts "
                                                 "step a over (--fresh=yes)]")
    code, out, started = maker(MAKE_AB % "one", force=["a"])
    assert code == 0 and started == ["a", "b"] and "note:" not in out


def test_report_image_sources_are_urls_of_the_files_they_name():
    """A map named `photo #1.jpg.png` or `50%.jpg.png` (html.escape alone left `#` and `%`: broken images)."""
    from pipeline.manifest.report import _img, referenced_images

    names = ["report/predict_a/photo #1.jpg.png", "report/predict_a/50%.jpg.png", "report/x/東京.jpg.png"]
    page = "".join(_img(n, "a map") for n in names)
    assert "#" not in page and "%.jpg" not in page
    assert Page(page).images == ['report/predict_a/photo%20%231.jpg.png', 'report/predict_a/50%25.jpg.png',
                                 'report/x/%E6%9D%B1%E4%BA%AC.jpg.png']
    assert referenced_images(page) == names


def test_a_step_takes_sigint_when_the_runner_was_started_with_it_ignored():
    """A runner started in the background by a script (or sbatch) has SIGINT ignored, and its steps inherited that:
    its stop (SIGINT to each step) went unheard for 10 s, then SIGKILL, and no step said what it kept."""
    import signal
    import subprocess

    from pipeline.manifest.runner import child_setup

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        out = subprocess.run([sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT).__name__)"],
                             preexec_fn=child_setup(), capture_output=True, text=True, check=True).stdout
    finally:
        signal.signal(signal.SIGINT, before)
    assert out.strip() == "default_int_handler"  # Python's own: Ctrl-C is KeyboardInterrupt there
