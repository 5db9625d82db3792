"""`pipeline label`: shards readable by plain webdataset, deterministic, resumable, robust to bad input."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.main import cli
from pipeline.common import images
from pipeline.label.config import LabelError
from pipeline.label.driver import label
from pipeline.label.shards import verify_dataset
from pipeline.label.worker import LabelConfig
from pipeline.label.sources import coco_records, folder_records
from tests.conftest import PHOTOS, make_coco, photo, write_jpeg

CONFIG = LabelConfig(teacher="classic", batch_size=3, io_threads=2)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("shard-*.tar"))}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300)


def test_shards_read_back_with_plain_webdataset(coco_tree, tmp_path):
    out = tmp_path / "labels" / "classic" / "val2017"
    summary = label(coco_records(coco_tree, "val2017"), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (summary.labelled, summary.failed, summary.shards_done) == (8, 0, 3)

    urls = str(out / "shard-{000000..000002}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert [s["__key__"] for s in samples] == [f"{i:012d}" for i in [3, 7, 8, 42, 99, 512, 1000, 100000]]
    for s in samples:
        assert s["jpg"].shape == (192, 256, 3) and s["jpg"].dtype == np.uint8
        label_map = s["classic.png"]
        assert label_map.shape[:2] == (192, 256) and label_map.std() > 0
        assert s["json"]["teacher"] == "classic" and s["json"]["id"] == int(s["__key__"])
        assert s["json"]["width"] == 160 or s["json"]["height"] == 160  # the original size is recorded

    marker = json.loads((out / "shard-000000.json").read_text())
    assert marker["keys"] == ["000000000003", "000000000007", "000000000008"]
    assert marker["sha256"] == hashlib.sha256((out / "shard-000000.tar").read_bytes()).hexdigest()
    assert marker["teacher"] == "classic" and marker["weights_digest"] == "none"
    assert marker["encoding_version"] == 1 and "forward_s" in marker["timings"]
    index = json.loads((out / "labels.json").read_text())
    assert index["count"] == 8 and [s["tar"] for s in index["shards"]] == sorted(digests(out))
    preview = cv2.imread(str(out / "preview.png"))  # first shard: image | label overlay, one row each
    assert preview.shape == (3 * 192, 2 * 256, 3)


def test_density_labels_are_float16_log_densities(coco_tree, tmp_path, monkeypatch):
    """A log-density teacher's .npy label sums to 1 after exp, at training resolution."""
    from teachers import Teacher

    class Flat(Teacher):
        name, output_kind, input_size = "flat_density", "log_density", (96, 128)

        def predict(self, x):
            logits = x.mean(1, keepdim=True) / 64.0
            return logits - logits.flatten(1).logsumexp(1).view(-1, 1, 1, 1)

    from teachers import registry

    # registered (a weight-free teacher) for this test only
    monkeypatch.setitem(registry._BUILDERS, "flat_density", lambda *, weights=None: Flat())
    monkeypatch.setitem(registry._CLASSES, "flat_density", Flat)
    monkeypatch.setitem(registry.DEFAULT_WEIGHTS, "flat_density", ())
    out = tmp_path / "out"
    label(coco_records(coco_tree, "val2017")[:2], out, LabelConfig(teacher="flat_density"), executor="local",
          progress=False)
    sample = next(iter(wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False).decode()))
    density = sample["flat_density.npy"]
    assert density.dtype == np.float16 and density.shape == (192, 256)
    assert np.exp(density.astype(np.float64)).sum() == pytest.approx(1.0, abs=2e-3)


def test_same_input_gives_identical_bytes(coco_tree, tmp_path):
    records = coco_records(coco_tree, "val2017")
    a = label(records, tmp_path / "a", CONFIG, shard_size=3, executor="local", progress=False)
    # a different number of I/O threads must not change a byte (batch size may: float sums differ by order)
    b = label(records, tmp_path / "b", LabelConfig(teacher="classic", batch_size=3, io_threads=1), shard_size=3,
              executor="local", progress=False)
    assert digests(a.folder) == digests(b.folder) and len(digests(a.folder)) == 3


def test_rerun_skips_finished_shards_and_redoes_damaged_ones(coco_tree, tmp_path):
    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    before = digests(out)

    again = label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (again.skipped, again.labelled, again.shards_done, again.shards_skipped) == (8, 0, 0, 3)

    (out / "shard-000001.json").unlink()  # killed before its marker
    with open(out / "shard-000002.tar", "r+b") as f:  # corrupted after the fact
        f.truncate(1000)
    redo = label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (redo.skipped, redo.labelled, redo.shards_done) == (3, 5, 2)
    assert digests(out) == before

    fresh = label(records, out, CONFIG, shard_size=3, executor="local", progress=False, overwrite=True)
    assert fresh.shards_done == 3 and digests(out) == before


@pytest.mark.parametrize("bad", [{"device": "tpu"}, {"device": "cuda:99"}, {"weights": "/no/such/weights.pt"}])
def test_overwrite_deletes_nothing_when_the_run_cannot_label(coco_tree, tmp_path, bad):
    """`--overwrite` with a device that is not there or weights that are not there deletes nothing (it
    deleted every shard first, then failed; later labels.json, so the folder no longer counted as finished):
    each old shard goes only when its new one is written. Without --overwrite the device is named too (not
    "labels made with other settings", from the bf16 a GPU would have labelled in)."""
    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    config = LabelConfig(**{**CONFIG.__dict__, **bad})
    for overwrite in (True, False):
        with pytest.raises(Exception, match="unknown device|no CUDA GPU|has 0 CUDA|weights"):
            label(records, out, config, shard_size=3, executor="local", progress=False, overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert verify_dataset(out) == ""
    again = label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (again.shards_done, again.shards_skipped) == (0, 3) and (out / "labels.json").is_file()


def test_overwrite_with_a_smaller_plan_and_stray_tars_leaves_exactly_the_new_shards(coco_tree, tmp_path):
    """Old shards beyond the new plan go once the new ones are written; a tar beyond the plan without a marker
    (an unfinished shard of an earlier plan, left by a kill) is removed by any run (it stayed, and `verify`
    failed on a folder `label` called finished)."""
    records = coco_records(coco_tree, "val2017")
    out, clean = tmp_path / "out", tmp_path / "clean"
    label(records, out, CONFIG, shard_size=2, executor="local", progress=False)  # 4 shards
    (out / "shard-000003.json").unlink()  # shard 3: a tar without its marker
    label(records, out, CONFIG, shard_size=4, executor="local", progress=False, overwrite=True)  # 2 shards
    label(records, clean, CONFIG, shard_size=4, executor="local", progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == sorted(p.name for p in clean.glob("shard-*"))
    assert digests(out) == digests(clean)
    shutil.copy(out / "shard-000001.tar", out / "shard-000009.tar")  # a stray beyond the plan, no marker
    label(records, out, CONFIG, shard_size=4, executor="local", progress=False)
    assert not (out / "shard-000009.tar").exists()
    assert CliRunner().invoke(cli, ["verify", str(out)]).exit_code == 0


def test_overwrite_changed_relabels_shards_of_other_settings_and_keeps_those_already_relabelled(coco_tree, tmp_path,
                                                                                                capsys):
    """A start-over with new settings (`pipeline run` after a manifest edit) interrupted after its first shard:
    the folder holds one shard of the new settings and two of the old. A plain re-run is refused, naming the
    way on; `--overwrite-changed` relabels the two and keeps the one (it failed on every run before)."""
    records = coco_records(coco_tree, "val2017")
    out, new = tmp_path / "out", tmp_path / "new"
    config = LabelConfig(**{**CONFIG.__dict__, "jpeg_quality": 80})
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    label(records, new, config, shard_size=3, executor="local", progress=False)
    for name in ("shard-000000.tar", "shard-000000.json"):  # what the interrupted start-over had written
        shutil.copy(new / name, out / name)
    (out / "labels.json").unlink()
    with pytest.raises(LabelError, match=r"shard-000001: jpeg_quality differs \(shard has 95, this run 80\)\); use "
                                         r"--overwrite-changed to relabel those shards, keeping the ones made with "
                                         r"these settings, --overwrite to relabel all"):
        label(records, out, config, shard_size=3, executor="local", progress=False)
    done = label(records, out, config, shard_size=3, executor="local", progress=False, overwrite_changed=True)
    assert (done.shards_done, done.shards_skipped, done.shards_changed) == (2, 1, ["shard-000001", "shard-000002"])
    assert (f"note: 2 finished shards of {out} were made with other settings (shard-000001: jpeg_quality differs "
            "(shard has 95, this run 80)): relabelling them (--overwrite-changed)") in capsys.readouterr().err
    assert digests(out) == digests(new) and verify_dataset(out) == ""


def test_a_rewrite_cut_short_keeps_the_finished_shard_it_was_rewriting(coco_tree, tmp_path):
    """`--retry-failed` (or any rewrite) interrupted before the new tar is complete: the old tar and its marker
    are still a finished shard (the marker was deleted when the rewrite began)."""
    from pipeline.label.shards import ShardWriter, read_marker, tar_samples, verify_shard

    out = tmp_path / "out"
    label(coco_records(coco_tree, "val2017"), out, CONFIG, shard_size=3, executor="local", progress=False)
    marker = read_marker(out, "shard-000000")
    writer = ShardWriter(out, "shard-000000")
    writer.write(next(iter(tar_samples(out / "shard-000000.tar"))))
    assert verify_shard(out, "shard-000000", {"sha256": marker["sha256"]}) == (marker, "")
    writer.abort()  # as a kill leaves it
    assert verify_shard(out, "shard-000000", {"sha256": marker["sha256"]}) == (marker, "")


def test_a_finished_folder_is_found_finished_without_starting_ray(coco_tree, tmp_path, monkeypatch):
    """`--executor ray` (the default) with `--precision auto` and no cluster address: the embedded Ray would
    have this machine's GPUs, so the precision the shards must have is known without starting it, and a
    folder whose shards are all finished is reported so at once (a Ray start takes seconds)."""
    from pipeline.label import driver

    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a finished folder")

    monkeypatch.setattr(driver, "connect", no_ray)
    again = label(records, out, CONFIG, shard_size=3, executor="ray", progress=False)
    assert (again.skipped, again.labelled, again.shards_skipped) == (8, 0, 3) and not again.error


def test_a_finished_folder_on_a_read_only_mount_is_found_finished_and_nothing_is_written(coco_tree, tmp_path,
                                                                                         monkeypatch, capsys):
    """A dataset shared read-only (a mount, or a folder of another user's): a re-run with its settings is done
    at once, without a lock or any write; one with work left to do is one line saying the folder is not
    writable, and what it would have done. (The mount is simulated: ``os.access`` says no, and the folder's
    mode says so too where the tests do not run as root.)"""
    from pipeline.label import driver

    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    real_access = os.access
    mounted = [True]  # (the last check below writes the folder, then mounts it again)
    monkeypatch.setattr(driver.os, "access", lambda p, mode, **k: not (mounted[0] and Path(p) == out
                                                                        and mode & os.W_OK) and real_access(p, mode, **k))

    def files() -> dict:
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(out.iterdir())}

    before = files()
    out.chmod(0o555)
    try:
        again = label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
        assert (again.skipped, again.labelled, again.shards_skipped) == (8, 0, 3) and not again.error
        assert files() == before
        out.chmod(0o755)
        (out / "shard-000001.json").unlink()
        (out / "labels.json").unlink()
        before = files()
        out.chmod(0o555)
        with pytest.raises(LabelError, match=f"^output folder is not writable: {out} \\(1 shard to label\\)$"):
            label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
        assert files() == before
    finally:
        out.chmod(0o755)
    def on_the_mount_without(name: str):
        """Finish the folder where it is writable, delete ``name``, then label it again on the read-only mount."""
        mounted[0] = False
        label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
        (out / name).unlink()
        mounted[0] = True
        out.chmod(0o555)
        try:
            return label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
        finally:
            out.chmod(0o755)

    unindexed = on_the_mount_without("labels.json")
    assert unindexed.error.startswith(f"every shard is finished but {out / 'labels.json'} is missing or out of "
                                      "date and the folder is not writable")
    unpictured = on_the_mount_without("preview.png")  # (a disk that was full when it was due: a warning then)
    assert not unpictured.error and unpictured.shards_skipped == 3 and not (out / "preview.png").exists()
    assert capsys.readouterr().err.endswith(f"warning: no {out / 'preview.png'}: the folder is not writable\n")


def test_labels_from_other_settings_are_not_mixed_in(coco_tree, tmp_path):
    records = coco_records(coco_tree, "val2017")
    label(records, tmp_path, CONFIG, shard_size=3, executor="local", progress=False)
    with pytest.raises(Exception, match="other settings.*--overwrite"):
        label(records, tmp_path, LabelConfig(teacher="classic", jpeg_quality=80), shard_size=3,
              executor="local", progress=False)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import webdataset
    from pipeline.cli.main import cli
    calls, limit = [0], int(os.environ["KILL_AT_WRITE"])
    real = webdataset.TarWriter.write
    def write(self, sample):
        calls[0] += 1
        if calls[0] == limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, sample)
    webdataset.TarWriter.write = write
    sys.argv[0] = "pipeline"
    cli.main()
""")


@pytest.mark.parametrize("kill_at", [2, 4])  # inside the first shard's tar; after the first shard is whole
def test_sigkill_mid_run_then_resume_gives_the_same_bytes(coco_tree, tmp_path, kill_at):
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_tree), "--shard-size", "3",
            "--executor", "local", "--no-progress"]
    reference = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "ref")])  # (in this process: the same bytes)
    assert reference.exit_code == 0, reference.output

    out = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_WRITE": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    folder = out / "classic" / "val2017"
    finished = {p.stem for p in folder.glob("shard-*.json")}
    assert finished == ({"shard-000000"} if kill_at == 4 else set())
    for tar in folder.glob("shard-*.tar"):  # a tar under a final name is always complete
        assert len(list(wds.WebDataset(str(tar), shardshuffle=False))) == 3

    resumed = run_cli(*args, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "images skipped (already done)  " + ("3" if kill_at == 4 else "0") in resumed.stdout
    assert digests(folder) == digests(tmp_path / "ref" / "classic" / "val2017")
    assert not list(folder.glob(".*tmp*"))  # the killed run's temp file was cleaned up


def test_ray_run_matches_in_process_run_and_survives_sigkill(coco_tree, tmp_path):
    """The default executor (a local Ray cluster) writes the same shards; killed mid-run it resumes cleanly."""
    local = label(coco_records(coco_tree, "val2017"), tmp_path / "local", CONFIG, shard_size=2,
                  executor="local", progress=False)
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_tree), "--shard-size", "2",
            "--batch-size", "3", "--io-threads", "2", "--out", str(tmp_path / "ray"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    folder = tmp_path / "ray" / "classic" / "val2017"
    while proc.poll() is None and not list(folder.glob("shard-*.json")):
        time.sleep(0.01)  # poll until the first shard is finished (a busy loop would starve the labeller)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert digests(folder) == digests(local.folder)


def bad_inputs(root: Path) -> dict[int, str]:
    """Every awkward input a COCO-like tree can hold, keyed by id → file name."""
    d = root / "val2017"
    d.mkdir(parents=True)
    rgb = photo("astronaut", 96)
    write_jpeg(d / "good.jpg", rgb)
    write_jpeg(d / "gray.jpg", photo("camera", 96))
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    cv2.imwrite(str(d / "deep.png"), (cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257))
    cv2.imwrite(str(d / "alpha.png"), np.dstack([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), np.full(rgb.shape[:2], 128, np.uint8)]))
    full = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    write_jpeg(d / "tiny.jpg", np.zeros((1, 1, 3), np.uint8))
    (d / "empty.jpg").write_bytes(b"")
    names = ["good.jpg", "gray.jpg", "cmyk.jpg", "deep.png", "alpha.png", "truncated.jpg", "corrupt.jpg",
             "tiny.jpg", "empty.jpg", "missing.jpg"]
    return {i + 1: n for i, n in enumerate(names)}


def test_bad_images_are_recorded_failures_and_the_run_goes_on(tmp_path):
    root = tmp_path / "coco"
    files = bad_inputs(root)
    make_coco(root, "val2017", files)
    out = tmp_path / "out"
    summary = label(coco_records(root, "val2017"), out, CONFIG, shard_size=4, executor="local", progress=False)
    reasons = {files[int(f["key"])]: f["reason"] for f in summary.failures}
    assert set(reasons) == {"truncated.jpg", "corrupt.jpg", "tiny.jpg", "empty.jpg", "missing.jpg"}
    assert "truncated" in reasons["truncated.jpg"] and "not found" in reasons["missing.jpg"]
    assert "too small" in reasons["tiny.jpg"]
    assert summary.labelled == 5 and summary.failed == 5 and summary.shards_done == 3

    labelled = {s["__key__"]: s for s in wds.WebDataset(str(out / "shard-{000000..000002}.tar"),
                                                          shardshuffle=False).decode("rgb8")}
    assert sorted(files[int(k)] for k in labelled) == sorted(["good.jpg", "gray.jpg", "cmyk.jpg", "deep.png",
                                                              "alpha.png"])
    # the odd formats decode to the same picture as the plain JPEG, not to garbage
    good = labelled["000000000001"]["jpg"].astype(float)
    for key in ["000000000003", "000000000004", "000000000005"]:
        assert np.abs(labelled[key]["jpg"].astype(float) - good).mean() < 12, files[int(key)]


def test_exit_status_follows_max_failure_rate(tmp_path):
    root = tmp_path / "coco"
    make_coco(root, "val2017", bad_inputs(root))
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(root), "--executor", "local",
            "--out", str(tmp_path / "out"), "--no-progress"]
    runner = CliRunner()
    strict = runner.invoke(cli, args)
    assert strict.exit_code == 1
    assert "5 of 10 images failed" in strict.output and "images failed" in strict.output
    assert "--retry-failed" not in strict.output  # (its failures are this run's own)
    lenient = runner.invoke(cli, [*args, "--max-failure-rate", "0.5"])
    assert lenient.exit_code == 0, lenient.output
    assert "images skipped (already done)  10" in lenient.output  # nothing was lost or redone
    # a re-run reports the failures its finished shards recorded: said so, with the way to try them again (after a
    # failed image was fixed, the same Error line came back without a word of --retry-failed)
    assert "images failed                  5 (50.00%), 5 of them in shards already done (--retry-failed tries them " \
           "again)" in lenient.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 1
    assert ("Error: 5 of 10 images failed (more than --max-failure-rate 0.01); each failed in a shard finished before "
            "this run and was not tried again: --retry-failed labels them again") in again.output


def test_failures_beyond_the_ten_shown_are_said_to_be_listed_in_the_markers(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(11):
        (tmp_path / "images" / ("0\n0.jpg" if i == 0 else f"{i:02d}.jpg")).touch()  # (a newline in a name)
    for i, size in zip(range(11, 13), (3, 5)):  # a second cause, behind the ten shown: counted, its sizes aside
        cv2.imwrite(str(tmp_path / "images" / f"{i:02d}.png"), np.zeros((size, size + 1, 3), np.uint8))
    r = CliRunner().invoke(cli, ["label", "folder", "--images", str(tmp_path / "images"), "--teacher", "classic",
                                 "--out", str(tmp_path / "out"), "--shard-size", "6", "--executor", "local",
                                 "--no-progress"])
    folder = tmp_path / "out" / "classic" / "images"
    assert r.stderr.count("failed: ") == 10
    assert "/0\\n0.jpg): empty file" in r.stderr.splitlines()[0]  # one line, the newline written as \n
    assert (f"… and 3 more failures (every one is listed in the shard-NNNNNN.json markers of {folder}, under "
            '"failures")') in r.stderr
    assert sum(len(json.loads(m.read_text())["failures"]) for m in folder.glob("shard-*.json")) == 13
    lines = r.stderr.splitlines()
    by_reason = lines[lines.index("failures by reason:") + 1:][:2]
    assert [line.split()[0] for line in by_reason] == ["11", "2"], r.stderr
    assert by_reason[1].endswith("image too small (N×N); the smallest side must be at least N px")
    assert by_reason[0].split(None, 1)[1] in lines[lines.index("failures by reason:") - 2]  # (as the lines say it)


@pytest.mark.parametrize("setup, extra, message", [
    (lambda root, out: (root / "annotations" / "instances_val2017.json").write_text("{oops"),
     [], "cannot read COCO annotation file"),
    (lambda root, out: None, ["--split", "train2017"], "splits found: val2017"),
    (lambda root, out: out.write_text("I am a file"), [], "not a directory"),
    (lambda root, out: None, ["--weights", "/nonexistent/weights.pt"], "weights"),
    (lambda root, out: None, ["--image-size", "192"], "HxW"),
])
def test_bad_invocations_fail_with_one_clear_line_before_any_work(coco_tree, tmp_path, setup, extra, message):
    out = tmp_path / "out"
    setup(coco_tree, out)
    result = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_tree),
                                      "--out", str(out), "--executor", "local", "--no-progress", *extra])
    assert result.exit_code != 0
    assert message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not list(tmp_path.rglob("shard-*"))


def test_random_weights_are_loudly_marked(coco_tree, tmp_path):
    records = coco_records(coco_tree, "val2017")[:1]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        label(records, tmp_path, LabelConfig(teacher="salgan", weights="random"), executor="local",
              progress=False)
    marker = json.loads((tmp_path / "shard-000000.json").read_text())
    assert marker["weights_random"] is True and marker["weights_digest"] == "random"


def test_classic_labels_of_the_bundled_sample_have_structure(tmp_path):
    """The demo's labels mean something: not constant, and not just the centre-bias blob."""
    from teachers.classic import center_bias

    sample = Path(__file__).resolve().parents[1] / "samples" / "coco"
    result = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(sample),
                                      "--out", str(tmp_path), "--executor", "local", "--no-progress"])
    assert result.exit_code == 0, result.output
    blob = center_bias(192, 256).reshape(-1).numpy()
    maps = [s["classic.png"] for s in wds.WebDataset(str(tmp_path / "classic" / "val2017" / "shard-000000.tar"),
                                                     shardshuffle=False).decode("l8")]
    assert len(maps) == 12
    for m in maps:
        m = m.reshape(-1).astype(float)
        assert m.std() > 5  # gray levels, not a constant map
        assert np.corrcoef(m, blob)[0, 1] < 0.95


def broken_tree(root: Path, broken: dict[int, str] | None = None) -> Path:
    """The eight photos of ``coco_tree`` under ids 1..8 (keys in that order), with the images at the
    given 0-based positions broken: ``"truncated"`` (half a JPEG) or ``"empty"``."""
    d = root / "val2017"
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, name in enumerate(PHOTOS):
        files[i + 1] = f"{i + 1:012d}.jpg"
        write_jpeg(d / files[i + 1], photo(name))
        kind = (broken or {}).get(i)
        if kind == "truncated":
            data = (d / files[i + 1]).read_bytes()
            (d / files[i + 1]).write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            (d / files[i + 1]).write_bytes(b"")
    return make_coco(root, "val2017", files)


def test_a_failed_image_mid_shard_is_part_of_a_finished_shard(tmp_path):
    """Failures at positions 1 and 5 (inside 4-image shards): a re-run reuses both shards, also from
    markers written before planned_keys was recorded."""
    root = broken_tree(tmp_path / "coco", {1: "truncated", 5: "empty"})
    records, out = coco_records(root, "val2017"), tmp_path / "out"
    first = label(records, out, CONFIG, shard_size=4, executor="local", progress=False)
    assert (first.labelled, first.failed, first.shards_done) == (6, 2, 2)
    marker = json.loads((out / "shard-000000.json").read_text())
    assert marker["planned_keys"] == [f"{i:012d}" for i in (1, 2, 3, 4)]
    assert marker["keys"] == [f"{i:012d}" for i in (1, 3, 4)]
    before = digests(out)

    again = label(records, out, CONFIG, shard_size=4, executor="local", progress=False)
    assert (again.labelled, again.skipped, again.shards_skipped, again.failed) == (0, 8, 2, 2)
    for m in out.glob("shard-*.json"):  # a marker of the earlier format: keys then failures, no planned_keys
        old = json.loads(m.read_text())
        del old["planned_keys"]
        m.write_text(json.dumps(old))
    old_format = label(records, out, CONFIG, shard_size=4, executor="local", progress=False)
    assert (old_format.labelled, old_format.shards_skipped) == (0, 2) and digests(out) == before


def test_retry_failed_writes_the_shard_a_run_without_the_failure_writes(tmp_path):
    root = broken_tree(tmp_path / "coco", {1: "truncated", 5: "empty"})
    records, out = coco_records(root, "val2017"), tmp_path / "out"
    label(records, out, CONFIG, shard_size=4, executor="local", progress=False)
    untouched = digests(out)["shard-000001.tar"]

    still_broken = label(records, out, CONFIG, shard_size=4, executor="local", progress=False, retry_failed=True)
    assert (still_broken.labelled, still_broken.failed, still_broken.shards_done) == (0, 2, 0)
    assert digests(out)["shard-000001.tar"] == untouched

    write_jpeg(root / "val2017" / "000000000002.jpg", photo(PHOTOS[1]))  # the truncated one, repaired
    retried = label(records, out, CONFIG, shard_size=4, executor="local", progress=False, retry_failed=True)
    assert (retried.labelled, retried.skipped, retried.failed, retried.shards_done) == (1, 6, 1, 1)
    assert digests(out)["shard-000001.tar"] == untouched  # its failure is still there: not rewritten

    reference = tmp_path / "reference"
    label(coco_records(root, "val2017"), reference, CONFIG, shard_size=4, executor="local", progress=False)
    assert digests(out) == digests(reference)
    assert [s["__key__"] for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)] == [
        f"{i:012d}" for i in (1, 2, 3, 4)]
    assert json.loads((out / "shard-000000.json").read_text())["failures"] == []


def test_an_image_replaced_under_its_name_is_a_changed_source(tmp_path):
    """Its shard's marker records each image's size, modification time and content digest: a photo edited in
    place made resume keep its old labels ("already done"); now it is the changed-source refusal, and
    --overwrite-changed relabels that shard alone. A file of the same size is told by its content."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee", "chelsea", "rocket", "astronaut", "camera"):
        write_jpeg(folder / f"{name}.jpg", photo(name, 96))
    out = tmp_path / "out"
    records = folder_records(folder)
    label(records, out, CONFIG, shard_size=2, executor="local", progress=False)
    marker = json.loads((out / "shard-000001.json").read_text())
    assert marker["sizes"] == {k: (folder / f"{k}.jpg").stat().st_size for k in marker["keys"]}
    kept = {n: (out / n).read_bytes() for n in ("shard-000000.tar", "shard-000002.tar")}

    write_jpeg(folder / "coffee.jpg", 255 - photo("coffee", 96))  # shard-000001: chelsea, coffee
    with pytest.raises(Exception, match=r"shard-000001\.tar was labelled from another version of coffee\.jpg "
                                        r"\(\d+ bytes then, \d+ now\): .*--overwrite-changed"):
        label(records, out, CONFIG, shard_size=2, executor="local", progress=False)
    redo = label(records, out, CONFIG, shard_size=2, executor="local", progress=False, overwrite_changed=True)
    assert (redo.shards_done, redo.shards_skipped, redo.shards_changed) == (1, 2, ["shard-000001"])
    assert {n: (out / n).read_bytes() for n in kept} == kept
    label(records, tmp_path / "fresh", CONFIG, shard_size=2, executor="local", progress=False)
    assert digests(out) == digests(tmp_path / "fresh")

    # uncompressed images of one size have one byte count: the content tells them apart, read only when touched
    marker = json.loads((out / "shard-000002.json").read_text())  # rocket, alone
    bmp = folder / "rocket.jpg"
    before = bmp.read_bytes()
    assert marker["blake2b"] == {"rocket": images.content_digest(before)}
    assert marker["mtimes"] == {"rocket": bmp.stat().st_mtime_ns}
    os.utime(bmp, ns=(bmp.stat().st_atime_ns, bmp.stat().st_mtime_ns + 10**9))  # touched, the same bytes: done
    read = []
    digest = images.content_digest
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(images, "content_digest", lambda data: read.append(1) or digest(data))
        for _ in range(2):
            again = label(records, out, CONFIG, shard_size=2, executor="local", progress=False)
            assert (again.shards_done, again.shards_skipped) == (0, 3)
    assert read == [1]  # read once: its new time is recorded, and the next run only stats it
    assert json.loads((out / "shard-000002.json").read_text())["mtimes"] == {"rocket": bmp.stat().st_mtime_ns}
    bmp.write_bytes(before[:-3] + bytes(3 - i for i in range(3)))  # as many bytes, other ones
    assert bmp.stat().st_size == len(before)
    with pytest.raises(Exception, match=r"shard-000002\.tar was labelled from another version of rocket\.jpg "
                                        rf"\(as many bytes, {len(before)}, other content\)"):
        label(records, out, CONFIG, shard_size=2, executor="local", progress=False)


def test_a_changed_source_names_the_shard_and_overwrite_changed_keeps_the_rest(tmp_path):
    root = broken_tree(tmp_path / "coco")
    out = tmp_path / "out"
    label(coco_records(root, "val2017"), out, CONFIG, shard_size=4, executor="local", progress=False)
    kept = (out / "shard-000000.tar").stat().st_mtime_ns

    files = {i: f"{i:012d}.jpg" for i in range(1, 9) if i != 6}  # image 6 leaves, image 9 arrives
    (root / "val2017" / "000000000006.jpg").rename(root / "val2017" / "000000000009.jpg")
    files[9] = "000000000009.jpg"
    make_coco(root, "val2017", files)
    records = coco_records(root, "val2017")
    with pytest.raises(Exception, match=r"shard-000001\.tar holds other images than this run plans for it "
                                        r"\(.*000000000006.*\).*--overwrite-changed.*--overwrite"):
        label(records, out, CONFIG, shard_size=4, executor="local", progress=False)

    # the shard that lost image 6 is relabelled without it; image 9 goes into a new shard; shard 0 stays
    changed = label(records, out, CONFIG, shard_size=4, executor="local", progress=False, overwrite_changed=True)
    assert (changed.shards_done, changed.shards_skipped, changed.shards_changed) == (2, 1, ["shard-000001"])
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept
    held = {n: json.loads((out / f"{n}.json").read_text())["keys"] for n in ("shard-000001", "shard-000002")}
    assert held == {"shard-000001": [f"{i:012d}" for i in (5, 7, 8)], "shard-000002": ["000000000009"]}

    shrunk = {i: f"{i:012d}.jpg" for i in range(1, 5)}  # the second shard's images all leave
    make_coco(root, "val2017", shrunk)
    with pytest.raises(Exception, match="shard-000001.json is a shard beyond the 1 this run plans"):
        label(coco_records(root, "val2017"), out, CONFIG, shard_size=4, executor="local", progress=False)
    label(coco_records(root, "val2017"), out, CONFIG, shard_size=4, executor="local", progress=False,
          overwrite_changed=True)
    assert sorted(digests(out)) == ["shard-000000.tar"]
    assert len(json.loads((out / "labels.json").read_text())["shards"]) == 1


def test_a_folder_that_gains_or_loses_an_image_changes_one_shard_not_every_later_one(tmp_path):
    """Shards were cut from the sorted list by position: deleting one junk file named in the failures, or adding
    a photo that sorts first, moved every later shard's boundary, and --overwrite-changed relabelled them all
    (10 of 10 in a 40-image folder). Now finished shards keep their images: a new photo goes into a new shard,
    a deleted failed one changes nothing, and a shard left unfinished is planned as before."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["astronaut", "camera", "chelsea", "coffee", "rocket", "astronaut2", "camera2", "chelsea2"]
    for name in names:
        write_jpeg(folder / f"{name}.jpg", photo(name.rstrip("2"), 96 if name[-1] != "2" else 112))
    (folder / "b_junk.jpg").write_bytes(b"not an image")  # sorts into the first shard; fails
    out = tmp_path / "out"
    first = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert first.shards_done == 3 and [f["key"] for f in first.failures] == ["b_junk"]
    before = digests(out)

    (folder / "b_junk.jpg").unlink()  # the junk the failure list named: nothing to relabel, and no failure now
    import pipeline.label.driver as driver

    real_access = os.access  # (a finished folder on a read-only mount is still done, and left as it is)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(driver.os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
        read_only = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert read_only.shards_skipped == 3 and "b_junk" in (out / "shard-000000.json").read_text()
    again = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (again.shards_done, again.shards_skipped, again.shards_changed) == (0, 3, []) and digests(out) == before
    assert (again.failures, again.failed, again.skipped) == ([], 0, 8)  # (it said 1 failed, 9 done, run after run)
    assert "b_junk" not in (out / "shard-000000.json").read_text() and verify_dataset(out) == ""

    write_jpeg(folder / "aaa.jpg", photo("rocket", 80))  # sorts first: by position, every shard would move
    grown = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert (grown.shards_done, grown.shards_skipped, grown.shards_changed) == (1, 3, [])
    assert {n: d for n, d in digests(out).items() if n in before} == before
    assert json.loads((out / "shard-000003.json").read_text())["keys"] == ["aaa"]

    for i in range(3):  # a shard of failures alone (they sort last), then every one of them deleted
        (folder / f"zz_junk{i}.jpg").write_bytes(b"not an image")
    junk = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert junk.shards_done == 1 and len(junk.failures) == 3
    for i in range(3):
        (folder / f"zz_junk{i}.jpg").unlink()
    cleared = label(folder_records(folder), out, CONFIG, shard_size=3, executor="local", progress=False)
    assert cleared.failures == [] and cleared.shards_total == 4 and verify_dataset(out) == ""  # (it was refused:
    assert not (out / "shard-000004.json").exists()  # "a shard beyond the 4 this run plans: the source changed")

    fresh = tmp_path / "fresh"  # an unfinished shard in the middle is planned as a fresh run plans it
    label(folder_records(folder), fresh, CONFIG, shard_size=3, executor="local", progress=False)
    (fresh / "shard-000001.json").unlink()
    (fresh / "shard-000001.tar").unlink()
    redo = label(folder_records(folder), fresh, CONFIG, shard_size=3, executor="local", progress=False)
    assert redo.shards_done == 1
    again_fresh = tmp_path / "again"
    label(folder_records(folder), again_fresh, CONFIG, shard_size=3, executor="local", progress=False)
    assert digests(fresh) == digests(again_fresh)


@pytest.fixture
def hang_guard():
    """Fail (rather than hang the suite) if the test body blocks for a minute: a guard, not a timing."""
    def hung(signum, frame):
        raise TimeoutError("blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_an_image_stating_more_pixels_than_are_decoded_is_a_per_image_failure_read_from_its_header():
    """A 1 MB PNG stating 32768×32767 pixels (under OpenCV's own 2^30) ran `predict` out of 21 GB; its header says
    what it would cost, before it is decoded. A 108-megapixel photo's worth stays under the limit."""
    import struct
    import zlib

    def png(w: int, h: int) -> bytes:  # a header, and one row of data (enough to be refused: nothing is decoded)
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(bytes(w + 1))) + chunk(b"IEND", b""))

    with pytest.raises(images.ImageError, match="^image too large \\(32768×32767, 1074 megapixels; at most 134 are "
                                                "decoded\\)$"):
        images.decode_image(png(32768, 32767))
    assert images.stated_size(png(12000, 9000)) == (9000, 12000) and 12000 * 9000 <= images.DECODE_PIXELS
    big = cv2.imencode(".jpg", np.zeros((64, 48, 3), np.uint8))[1].tobytes()
    assert images.stated_size(big) == (64, 48) and images.decode_image(big).shape == (64, 48, 3)
    # BMP, WebP and TIFF headers are read too (a 12000×12000 one was decoded whole: 432 MB)
    stating = {"bmp": b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
               + struct.pack("<IiiHHIIiiII", 40, 12000, 12000, 1, 24, 0, 0, 0, 0, 0, 0),
               "webp": b"RIFF" + struct.pack("<I", 17) + b"WEBPVP8L" + struct.pack("<IBI", 5, 0x2F, 11999 | 11999 << 14),
               "tiff": b"II*\0" + struct.pack("<IHHHIIHHII", 8, 2, 256, 4, 1, 12000, 257, 3, 1, 12000)}
    for kind, data in stating.items():
        with pytest.raises(images.ImageError, match="^image too large \\(12000×12000, 144 megapixels"):
            images.decode_image(data)
        small = cv2.imencode(f".{kind}", np.zeros((64, 48, 3), np.uint8))[1].tobytes()
        assert images.stated_size(small) == (64, 48) and images.decode_image(small).shape == (64, 48, 3), kind


def test_fifos_devices_and_oversized_files_are_per_image_failures(tmp_path, hang_guard):
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    write_jpeg(root / "val2017" / "good.jpg", photo("astronaut", 96))
    write_jpeg(root / "val2017" / "big.jpg", photo("astronaut", 160))
    make_coco(root, "val2017", {1: "good.jpg", 4: "big.jpg"})
    os.mkfifo(root / "val2017" / "fifo.jpg")  # opened for reading without a writer, this would block
    ann = root / "annotations" / "instances_val2017.json"
    doc = json.loads(ann.read_text())
    doc["images"] += [{"id": 2, "file_name": "fifo.jpg"}, {"id": 3, "file_name": "/dev/zero"}]
    ann.write_text(json.dumps(doc))
    cap = (root / "val2017" / "good.jpg").stat().st_size
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(root), "--out", str(tmp_path / "out"),
            "--executor", "local", "--no-progress", "--max-failure-rate", "1", "--max-image-bytes", str(cap)]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "id 3 ('/dev/zero')" in refused.output and "--allow-outside-root" in refused.output

    result = CliRunner().invoke(cli, [*args, "--allow-outside-root"])
    assert result.exit_code == 0, result.output
    marker = json.loads((tmp_path / "out" / "classic" / "val2017" / "shard-000000.json").read_text())
    reasons = {f["key"][-1]: f["reason"] for f in marker["failures"]}
    assert marker["keys"] == ["000000000001"]
    assert reasons["2"] == "not a regular file" and reasons["3"] == "not a regular file"
    assert reasons["4"].startswith("file too large") and "--max-image-bytes" in reasons["4"]


def test_a_symlink_out_of_an_image_folder_is_a_per_image_failure(tmp_path):
    photos, outside = tmp_path / "photos", tmp_path / "outside"
    photos.mkdir()
    outside.mkdir()
    write_jpeg(photos / "a.jpg", photo("coffee", 96))
    write_jpeg(outside / "secret.jpg", photo("chelsea", 96))
    (photos / "b.jpg").symlink_to(outside / "secret.jpg")
    args = ["label", "folder", "--teacher", "classic", "--images", str(photos), "--out", str(tmp_path / "out"),
            "--executor", "local", "--no-progress", "--max-failure-rate", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "b (" in result.output and "outside the image folder" in result.output
    allowed = CliRunner().invoke(cli, [*args, "--allow-outside-root", "--out", str(tmp_path / "allowed")])
    assert allowed.exit_code == 0 and "images labelled                2" in allowed.output


def test_an_out_folder_inside_the_image_folder_is_not_read_as_images_and_odd_entries_are_failures(tmp_path):
    """`--images photos --out photos`: the labels (and their preview.png) land inside the image folder; a second
    run must find its shards finished, not new images. A FIFO and a broken symlink named like images are
    per-image failures (not silently left out)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea", "rocket"):
        write_jpeg(photos / f"{name}.jpg", photo(name, 96))
    os.mkfifo(photos / "pipe.jpg")
    (photos / "gone.jpg").symlink_to(photos / "deleted.jpg")
    (photos / "away.jpg").symlink_to(tmp_path / "elsewhere.jpg")  # broken, and it would lead out: "missing"
    args = ["label", "folder", "--teacher", "classic", "--images", str(photos), "--out", str(photos),
            "--executor", "local", "--no-progress", "--max-failure-rate", "1", "--image-size", "64x96"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert (photos / "classic" / "photos" / "preview.png").is_file()
    assert f"{photos / 'classic' / 'photos' / 'preview.png'} (the first shard's images" in first.output  # said where
    assert "images labelled                3" in first.output and "images failed                  3" in first.output
    assert "pipe (" in first.output and "not a regular file" in first.output
    assert (f"gone ({photos / 'gone.jpg'}): file not found: {photos / 'gone.jpg'} is a symlink to "
            f"{photos / 'deleted.jpg'}, which does not exist") in first.output, first.output  # (was "file not found")
    assert f"away ({photos / 'away.jpg'}): file not found: {tmp_path / 'elsewhere.jpg'} (a symlink's target" \
        in first.output, first.output  # the folder's entry, then where it leads
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert "0 written, 1 already done" in again.output, again.output
    assert "other runs' maps or labels" not in again.output  # its own label folder is not another run's


def test_maps_predict_wrote_inside_the_image_folder_are_not_labelled_as_photos(tmp_path):
    """`predict --images photos --out photos/maps`, then `label folder --images photos`: the maps were labelled
    as photos (38 images for 19, keys such as maps__astronaut_png), and a manifest's label step went stale; they
    are left out with a note, as `predict` leaves other runs' outputs out."""
    from pipeline.manifest.steps import COMMANDS

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea"):
        write_jpeg(photos / f"{name}.jpg", photo(name, 96))
    params = {"source": "folder", "images": str(photos), "out": str(tmp_path / "labels")}
    (_, listing), = COMMANDS["label"].reads(params).values()
    before = listing()
    maps = photos / "maps"
    maps.mkdir()
    cv2.imwrite(str(maps / "coffee.png"), np.zeros((96, 96), np.uint8))
    (maps / "predictions.json").write_text(json.dumps({"model": "fastsal_a", "maps": 1, "failures": []}))
    assert listing() == before  # the manifest's step is not stale for it
    r = CliRunner().invoke(cli, ["label", "folder", "--teacher", "classic", "--images", str(photos), "--out",
                                 str(tmp_path / "labels"), "--executor", "local", "--no-progress", "--image-size",
                                 "64x96"])
    assert r.exit_code == 0, r.output
    assert f"note: left out 1 folder of other runs' maps or labels below {photos} (maps)" in r.output
    assert "images labelled                2" in r.output, r.output


def test_a_smaller_shard_size_on_finished_shards_is_said_not_silently_ignored(tmp_path):
    """A folder labelled into one shard of 1000 (the default) cannot be trained (no shard left to train on when
    one is held out); labelling it again with --shard-size 4 wrote nothing, "1 already done", without a word."""
    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLE), "--split", "val2017", "--out",
            str(tmp_path), "--executor", "local", "--no-progress", "--image-size", "64x96"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "note:" not in again.output, again.output
    smaller = CliRunner().invoke(cli, [*args, "--shard-size", "4"])
    assert smaller.exit_code == 0 and "0 written, 1 already done" in smaller.output
    assert (f"note: 1 finished shard of {tmp_path / 'classic' / 'val2017'} holds more than --shard-size 4 images "
            "(labelled with a larger one), kept as made; --overwrite labels every image again in shards of 4") \
        in smaller.output, smaller.output


def test_a_shard_stream_stopped_after_its_end_was_queued_leaves_no_temp_tar(tmp_path):
    """Ctrl-C while the worker waited in `drain` (its end already queued, the writer thread ending without
    aborting) left `.shard-000000.tar.tmp-…`, removed only by the next run."""
    from pipeline.label.shards import TarStream

    stream = TarStream(tmp_path, "shard-000000", depth=2)
    stream.put({"__key__": "a", "txt": b"x"})
    stream.drain()  # (where the interrupt came: the thread has written everything and ended)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the temp tar, not finished
    stream.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_temp_tar_left_by_a_worker_killed_mid_run_is_gone_when_the_run_finishes(tmp_path, monkeypatch):
    """A Ray actor killed mid-shard (out of memory) leaves its temp tar; its shard is retried and the run ends
    done, but the temp file stayed (a 1000-image shard's worth) until the next run."""
    from pipeline.label.worker import ShardLabeler

    real = ShardLabeler.label_shard

    def killed_once(self, plan, folder, *args, **kwargs):
        (Path(folder) / f".{plan.name}.tar.tmp-4242-abcdef").write_bytes(b"\0" * 100)  # (as the killed one left)
        return real(self, plan, folder, *args, **kwargs)

    monkeypatch.setattr(ShardLabeler, "label_shard", killed_once)
    r = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLE), "--split",
                                 "val2017", "--out", str(tmp_path), "--executor", "local", "--no-progress",
                                 "--image-size", "64x96", "--shard-size", "6"])
    assert r.exit_code == 0, r.output
    assert not list((tmp_path / "classic" / "val2017").glob(".*.tmp-*"))


def test_errors_keep_their_cause_in_one_line():
    import ray.exceptions

    from pipeline.common.errors import error_message

    enospc = OSError(errno.ENOSPC, "No space left on device")
    wrapped = ray.exceptions.RayTaskError("label_shard", "Traceback (most recent call last):\n  ...\n"
                                          "\x1b[31mOSError: [Errno 28] No space left on device\x1b[0m", enospc,
                                          proctitle="ray::ShardLabeler", pid=1, ip="127.0.0.1")
    assert error_message(wrapped) == error_message(wrapped.as_instanceof_cause()) == "No space left on device"
    assert error_message(IndexError()) == "IndexError" and error_message(OSError()) == "OSError"
    assert error_message(KeyError("shard")) == "KeyError: 'shard'"
    assert error_message(RuntimeError("\x1b[1m\x1b[31mboom\x1b[0m\n\tdetails")) == "RuntimeError: boom"
    assert error_message(ValueError("Traceback (most recent call last):\n  File x\nValueError: bad")) == "ValueError: bad"
    h5 = OSError(errno.ENOSPC, "Can't close file (file write failed: time = Fri Nov 27\n, filename = 'p.h5')", "p.h5")
    assert error_message(h5) == "Can't close file (file write failed: time = Fri Nov 27 , filename = 'p.h5'): p.h5"


def first_shard_then(fail):
    """A ``ShardLabeler.write_shard`` that writes shard 0 and calls ``fail(plan, folder, progress)`` for every
    other shard; its ``calls`` lists the shards it was asked for, in order."""
    import pipeline.label.worker

    real = pipeline.label.worker.ShardLabeler.write_shard
    calls: list[str] = []

    def write_shard(self, plan, folder, progress=None, **kw):
        calls.append(plan.name)
        if plan.index == 0:
            return real(self, plan, folder, progress=progress, **kw)
        fail(plan, folder, progress)

    write_shard.calls = calls
    return write_shard


def test_a_store_that_stops_answering_stops_the_run_and_retries_are_not_counted_twice(coco_tree, tmp_path,
                                                                                         monkeypatch):
    """Object storage gone mid-run: every shard waited for its timeouts and failed, one by one, for tens of
    minutes, and each retry counted its images again (the progress read 141%). A shard the store refused stops
    the run with one sentence; the shards finished before it stay."""
    import botocore.exceptions

    import pipeline.label.driver
    import pipeline.label.worker

    def fail(plan, folder, progress):
        progress(2)  # two images of it done, then the upload fails
        try:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b")
        except botocore.exceptions.EndpointConnectionError as e:
            raise OSError("upload failed") from e  # as s3fs raises it

    write_shard = first_shard_then(fail)
    calls = write_shard.calls

    counts = []

    class Bar:
        n = 0

        def update(self, n=1):
            self.n += n
            counts.append(self.n)

        def __getattr__(self, name):
            return lambda *a, **k: None

    monkeypatch.setattr(pipeline.label.worker.ShardLabeler, "write_shard", write_shard)
    bar = Bar()
    monkeypatch.setattr(pipeline.label.driver, "show_progress", lambda *a, **k: contextlib.nullcontext(bar))
    with pytest.raises(LabelError) as e:
        label(coco_records(coco_tree, "val2017"), tmp_path, CONFIG, shard_size=3, executor="local", retries=2,
              progress=False)
    assert calls == ["shard-000000", "shard-000001", "shard-000001", "shard-000001"]  # shard 2 never started
    assert str(e.value).startswith(f"shard shard-000001 could not be written to {tmp_path}: object storage refused "
                                   "the request (EndpointConnectionError")
    assert str(e.value).endswith("The 1 shard finished in this run is kept: run the same command again when the "
                                 "store answers")
    assert verify_dataset(tmp_path) != "" and (tmp_path / "shard-000000.json").is_file()
    assert max(counts[:-1]) <= 3 + 2 and counts[-1] == 3 + 3  # each retry's images taken back; the shard counted once

    # from a Ray actor the error comes pickled, without the botocore error it was raised from: the labeller names
    # the refusal itself, in an exception that survives the trip
    import ray.cloudpickle
    import ray.exceptions

    from pipeline.common.errors import root_cause
    from pipeline.label.config import StoreRefused

    from pipeline.label.sources import plan_shards

    second = plan_shards(coco_records(coco_tree, "val2017"), 3)[1]
    # its write fails as above
    labeler = type("Labeler", (), {"write_shard": write_shard, "device": torch.device("cpu")})()
    with pytest.raises(StoreRefused) as refused:
        pipeline.label.worker.ShardLabeler.label_shard(labeler, second, tmp_path, progress=lambda n: None)
    trip = ray.cloudpickle.loads(ray.cloudpickle.dumps(refused.value))
    wrapped = ray.exceptions.RayTaskError("label_shard", "Traceback …", trip).as_instanceof_cause()
    assert isinstance(root_cause(wrapped), StoreRefused)
    assert str(root_cause(wrapped)).startswith("object storage refused the request (EndpointConnectionError")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM])
def test_a_full_or_read_only_disk_stops_the_run_at_its_first_shard(coco_tree, tmp_path, monkeypatch, code):
    """A full disk failed every remaining shard, each after its retries (294 lines of `No space left on device`
    for 300 shards). The first shard it refuses stops the run with one sentence; the finished shards stay. So
    does a file-size limit (EFBIG), and a folder made unwritable mid-run (EACCES, EPERM on a file of it: they were
    a line per shard, each tried three times)."""
    import pipeline.label.worker

    def fail(plan, folder, progress):
        raise OSError(code, os.strerror(code), str(folder))

    write_shard = first_shard_then(fail)
    calls = write_shard.calls
    monkeypatch.setattr(pipeline.label.worker.ShardLabeler, "write_shard", write_shard)
    with pytest.raises(LabelError) as e:
        label(coco_records(coco_tree, "val2017"), tmp_path, CONFIG, shard_size=3, executor="local", retries=1,
              progress=False)
    assert calls == ["shard-000000", "shard-000001", "shard-000001"]  # shard 2 never started
    limit = (" (a file-size limit below a shard's size, `ulimit -f`: raise it, or label with a smaller --shard-size)"
             if code == errno.EFBIG else "")
    assert str(e.value) == (f"shard shard-000001 could not be written to {tmp_path}: {os.strerror(code)}: {tmp_path}"
                            f"{limit}. The 1 shard finished in this run is kept: run the same command again once there "
                            "is room (or write access) there")
    assert (tmp_path / "shard-000000.json").is_file()


def test_a_file_refused_outside_the_output_folder_fails_its_shard_not_the_run(coco_tree, tmp_path, monkeypatch):
    """Permission denied on something that is not the output folder's (here: a file elsewhere) is that shard's
    failure: the other shards are still labelled."""
    import pipeline.label.worker

    elsewhere = tmp_path / "elsewhere"
    real = pipeline.label.worker.ShardLabeler.write_shard
    calls = []

    def write_shard(self, plan, folder, progress=None, **kw):
        calls.append(plan.name)
        if plan.index == 1:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(elsewhere))
        return real(self, plan, folder, progress=progress, **kw)

    monkeypatch.setattr(pipeline.label.worker.ShardLabeler, "write_shard", write_shard)
    summary = label(coco_records(coco_tree, "val2017"), tmp_path / "out", CONFIG, shard_size=3, executor="local",
                    retries=0, progress=False)
    assert calls[:2] == ["shard-000000", "shard-000001"] and len(calls) == len(set(calls)) > 2  # the rest labelled
    assert summary.shards_failed == ["shard-000001"]
    assert summary.shard_errors["shard-000001"].startswith("Permission denied")


def test_on_ray_a_shard_the_store_refused_is_tried_again_first_so_the_run_stops_without_the_rest(coco_tree,
                                                                                                   monkeypatch):
    """On the Ray executor a failed shard went to the back of the queue: with the store down, every queued shard
    waited for the store's retries in turn (minutes), before any shard ran out of its own. A shard the store
    refused is now tried again before any other, so the run stops after its retries, as in-process; another
    failure still goes to the back. (Ray's scheduling is driven here by a stand-in for ``ray`` that runs each
    call when it is waited for.)"""
    import sys
    import types

    import ray.exceptions

    import pipeline.label.executors as executors
    from pipeline.label.config import StoreRefused
    from pipeline.label.sources import plan_shards

    calls = []

    class Labeler:
        def __init__(self, config):
            pass

        def identity(self):
            return {"id": 1}

        def label_shard(self, plan, folder, reuse=None, next_plan=None):
            calls.append(plan.index)
            if plan.index == 0:
                return {"count": len(plan.records)}
            if plan.index == 1 and calls.count(1) == 1:
                raise ValueError("a bad shard")  # not the store: retried after the others
            raise StoreRefused("object storage refused the request (EndpointConnectionError)")

    class Ref:
        def __init__(self, call):
            self.call = call

        def result(self):
            try:
                return self.call()
            except Exception as e:  # as Ray hands a task's exception to the driver
                raise ray.exceptions.RayTaskError("label_shard", "Traceback …", e, proctitle="ray::ShardLabeler", pid=1,
                                                  ip="127.0.0.1").as_instanceof_cause() from None

    class Actor:
        def __init__(self, obj):
            self.obj = obj

        def __getattr__(self, name):
            method = getattr(self.obj, name)
            return types.SimpleNamespace(remote=lambda *a, **k: Ref(lambda: method(*a, **k)))

    fake = types.SimpleNamespace(
        exceptions=ray.exceptions,
        remote=lambda **options: (lambda cls: types.SimpleNamespace(remote=lambda config: Actor(cls(config)))),
        get=lambda refs: [r.result() for r in refs] if isinstance(refs, list) else refs.result(),
        wait=lambda refs, num_returns=1: (refs[:1], refs[1:]))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(executors, "ShardLabeler", Labeler)
    plans = plan_shards(coco_records(coco_tree, "val2017"), 1)[:6]
    done, failed = [], []

    def on_done(plan, marker, error):
        if marker is not None:
            done.append(plan.index)
        elif isinstance(root_cause(error), StoreRefused):
            raise LabelError(f"shard {plan.name}: {root_cause(error)}")
        else:
            failed.append(plan.index)

    from pipeline.common.errors import root_cause

    placement = executors.Placement(device="cpu", device_type="cpu", workers=2)
    bar = types.SimpleNamespace(update=lambda n: None)
    with pytest.raises(LabelError, match="refused the request"):
        executors.label_on_ray(CONFIG, placement, {"id": 1}, plans, {}, "out", bar, on_done, retries=2)
    assert done == [0] and failed == []
    assert set(calls) <= {0, 1, 2}, calls  # shards 3 to 5 never started: the refused ones were tried again first
    assert max(calls.count(1) - 1, calls.count(2)) == 3  # a refused shard's 3 tries (its first failure was its own)


def test_a_failing_shard_is_one_error_line_and_a_broken_preview_only_a_warning(coco_tree, tmp_path, monkeypatch):
    import pipeline.label.driver
    import pipeline.label.worker

    args = ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_tree), "--out", str(tmp_path),
            "--shard-size", "3", "--executor", "local", "--no-progress", "--retries", "0"]
    real = pipeline.label.worker.ShardWriter

    class FailSecond(real):
        def write(self, sample):
            if self.name == "shard-000001":
                raise IndexError()  # an exception without a message, on the tar's writer thread
            super().write(sample)

    monkeypatch.setattr(pipeline.label.worker, "ShardWriter", FailSecond)
    failed = CliRunner().invoke(cli, args)
    assert failed.exit_code == 1 and isinstance(failed.exception, SystemExit)
    assert "Error: 1 of 3 shards failed (shard-000001: IndexError)" in failed.output
    assert "images labelled                5" in failed.output and "Traceback" not in failed.output
    monkeypatch.setattr(pipeline.label.worker, "ShardWriter", real)
    assert not list(tmp_path.glob("classic/val2017/.*.tmp-*"))  # the failed shard left no temp file

    def no_preview(*a, **k):
        raise OSError(errno.EACCES, "Permission denied", "preview.png")

    monkeypatch.setattr(pipeline.label.driver, "write_preview", no_preview)
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    assert "warning: preview.png not written: Permission denied: preview.png" in done.output
    assert "images labelled                3" in done.output and (tmp_path / "classic/val2017/labels.json").is_file()

    def no_index(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.label.driver, "write_json", no_index)
    (tmp_path / "classic/val2017/shard-000002.json").unlink()
    no_space = CliRunner().invoke(cli, args)
    assert no_space.exit_code == 1 and "Traceback" not in no_space.output
    assert "Error: every shard is finished but" in no_space.output
    assert "labels.json could not be written (No space left on device); re-run" in no_space.output


def test_a_ray_task_error_shows_the_original_cause(coco_tree, tmp_path):
    """OSError(ENOSPC) raised inside a Ray actor reaches the user as "No space left on device", no traceback, and
    stops the run as a full disk (the labeller's OutputRefused, pickled back by Ray)."""
    import ray

    def no_space_left():  # runs in every Ray worker process before any task: shard writes fail there
        import errno

        import pipeline.label.worker

        class NoSpace(pipeline.label.worker.ShardWriter):
            def write(self, sample):  # on the tar's writer thread
                raise OSError(errno.ENOSPC, "No space left on device")

        pipeline.label.worker.ShardWriter = NoSpace

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, object_store_memory=256 * 1024**2,
             runtime_env={"worker_process_setup_hook": no_space_left})
    try:
        result = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_tree),
                                          "--out", str(tmp_path), "--shard-size", "8", "--io-threads", "2",
                                          "--retries", "0", "--no-progress"])
    finally:
        ray.shutdown()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith(f"Error: shard shard-000000 could not be written to {tmp_path}")
    assert result.output.rstrip().endswith(": No space left on device. No shard was finished in this run: run the same "
                                           "command again once there is room (or write access) there")
    assert "Traceback" not in result.output and "\x1b[" not in result.output


# --------------------------------------------------------------------------- the shard identity, planned by the driver


@pytest.fixture
def weights_files(tmp_path, monkeypatch):
    """Stand-in weights files for every teacher that loads some, so that the driver's planned identity can be
    compared with a built teacher's: a small centre bias cached as the published one, and a weights file
    whose contents the builders are told to accept (the digest, not the layout, is what is compared)."""
    import dataclasses

    import torch

    import teachers.deepgaze as dg
    import teachers.salgan as sg
    from teachers import weights

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cache = weights.checkpoint_dir()
    cache.mkdir(parents=True)
    np.save(cache / "centerbias_mit1003.npy", np.log(np.full((16, 16), 1 / 256.0)))
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "centerbias_mit1003",
                        dataclasses.replace(weights.KNOWN_WEIGHTS["centerbias_mit1003"], sha256=None))
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"stand-in weights")
    for module in (dg, sg):
        monkeypatch.setattr(module, "load_state_dict", lambda p: {"w": torch.zeros(1)})
        monkeypatch.setattr(module, "load_strict", lambda *a, **k: None)
    return path


def test_the_driver_plans_the_identity_every_teacher_records_without_building_it(weights_files, monkeypatch):
    """The settings the driver checks finished shards against (weights resolved and hashed, no network built)
    are those a labeller with the built teacher writes into every marker, for every teacher and weights."""
    import teachers.registry
    from pipeline.label.config import planned_identity
    from pipeline.label.worker import ShardLabeler

    real_build = teachers.registry.build_teacher
    for name in teachers.registry.available():
        for weights in ([None] if name == "classic" else [str(weights_files), "random"]):
            config = LabelConfig(teacher=name, weights=weights, device="cpu", precision="bf16")
            built = []
            monkeypatch.setattr(teachers.registry, "build_teacher", lambda *a, **k: built.append(a) or 1 / 0)
            planned = planned_identity(config, "bf16", "cpu-reduced")  # auto on a CPU
            assert not built, "planning the identity built the teacher"
            monkeypatch.setattr(teachers.registry, "build_teacher", real_build)
            labeler = ShardLabeler(config)
            labeler.close()
            assert planned == labeler.identity(), (name, weights)
            assert planned["weights_random"] == (weights == "random")
            assert planned["precision"] == "bf16" and planned["tolerance"] == {"vs_fp32_cc_min": 0.999}
            if name.startswith("deepgaze") and weights != "random":
                assert "+centerbias:" in planned["weights_digest"]  # the centre bias changes the labels too


def test_the_driver_builds_no_teacher_for_finished_shards_and_names_every_missing_file(coco_tree, tmp_path,
                                                                                         monkeypatch):
    import pipeline.label.worker
    from teachers import build_teacher

    built = []
    monkeypatch.setattr(pipeline.label.worker, "build_teacher",
                        lambda *a, **k: built.append(a) or build_teacher(*a, **k))
    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    assert len(built) == 1  # --executor local: the one labeller that does the work
    again = label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    assert again.shards_skipped == 3 and len(built) == 1  # nothing to do: no teacher built
    marker = json.loads((out / "shard-000000.json").read_text())
    index = json.loads((out / "labels.json").read_text())
    for recorded in (marker, index):  # the precision as resolved (auto is fp32 on CPU), never "auto"
        assert {k: recorded[k] for k in ("precision", "tolerance", "label_version")} == {
            "precision": "fp32", "tolerance": None, "label_version": 1}

    import torch

    from teachers.weights import WeightsError

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "empty-hub"))  # nothing cached

    with pytest.raises(WeightsError) as e:  # a missing weights file and a missing centre bias: one error, both named
        label(records, tmp_path / "dg2", LabelConfig(teacher="deepgaze2", weights=str(tmp_path / "nope.pt")),
              executor="local", progress=False)
    assert "nope.pt" in str(e.value) and "centerbias_mit1003.npy" in str(e.value)
    assert len(built) == 1 and not list((tmp_path / "dg2").glob("shard-*"))


@pytest.mark.parametrize("change, why", [
    (LabelConfig(teacher="classic", batch_size=3, io_threads=2, precision="bf16"), "precision differs"),
    ("label_version", "label_version differs"),
    ("old marker", r"label_version differs \(the shard records none"),
])
def test_a_resume_with_another_precision_or_label_version_refuses_to_mix(coco_tree, tmp_path, monkeypatch,
                                                                           change, why):
    """fp32 labels are not topped up with bf16 ones, nor labels of older label code with newer ones; a marker
    written before precision and label_version were recorded counts as other settings."""
    from teachers.classic import ClassicTeacher

    records = coco_records(coco_tree, "val2017")
    out = tmp_path / "out"
    label(records, out, CONFIG, shard_size=3, executor="local", progress=False)
    (out / "shard-000002.json").unlink()  # an unfinished run: the resume has work to do
    config = CONFIG
    if change == "label_version":
        monkeypatch.setattr(ClassicTeacher, "label_version", 2)
    elif change == "old marker":
        marker = json.loads((out / "shard-000000.json").read_text())
        for key in ("precision", "tolerance", "label_version"):
            del marker[key]
        (out / "shard-000000.json").write_text(json.dumps(marker))
    else:
        config = change
    before = digests(out)
    with pytest.raises(Exception, match=f"other settings.*{why}.*--overwrite"):
        label(records, out, config, shard_size=3, executor="local", progress=False)
    assert digests(out) == before and not (out / "shard-000002.json").exists()
    fresh = label(records, out, config, shard_size=3, executor="local", progress=False, overwrite=True)
    assert fresh.shards_done == 3


# --------------------------------------------------------------------------- where the workers run


@pytest.mark.parametrize("device, executor, gpus, cluster_gpus, want", [
    # in-process: the device as given (cuda:1 is GPU 1 of this machine)
    ("cuda:1", "local", None, 0, ("cuda:1", "cuda", 1, {})),
    ("auto", "local", None, 0, ("auto", "cpu", 1, {})),
    ("cpu", "local", None, 0, ("cpu", "cpu", 1, {})),
    # Ray: every GPU actor sees its one GPU as cuda:0, and reserves the CPUs of its I/O threads too
    ("cuda:1", "ray", None, 1, ("cuda", "cuda", 1, {"num_gpus": 1, "num_cpus": 4})),
    ("cuda", "ray", None, 4, ("cuda", "cuda", 4, {"num_gpus": 1, "num_cpus": 4})),
    ("auto", "ray", 2, 4, ("cuda", "cuda", 2, {"num_gpus": 1, "num_cpus": 4})),
    ("auto", "ray", 8, 4, ("cuda", "cuda", 4, {"num_gpus": 1, "num_cpus": 4})),
    # no GPU asked for, or none there: CPU actors
    ("cpu", "ray", None, 4, ("cpu", "cpu", 3, {"num_cpus": 2})),
    ("auto", "ray", 0, 4, ("cpu", "cpu", 3, {"num_cpus": 2})),
    ("auto", "ray", None, 0, ("cpu", "cpu", 3, {"num_cpus": 2})),
    ("cuda:1", "ray", None, 0, ("cpu", "cpu", 3, {"num_cpus": 2})),
])
def test_workers_are_placed_one_per_gpu_each_handed_its_own_device(device, executor, gpus, cluster_gpus, want):
    from pipeline.label.executors import place_workers

    where = place_workers(device, executor=executor, gpus=gpus, cpu_workers=3, io_threads=4, shards=10,
                          cluster_gpus=cluster_gpus, cluster_cpus=32, cuda_available=False)
    assert (where.device, where.device_type, where.workers, where.options) == want
    # the user is told why not GPU 1, and why not the GPUs asked for
    assert bool(where.note) == ((device == "cuda:1" or (gpus or 0) > cluster_gpus) and executor == "ray")


def test_worker_placement_fits_the_cluster_and_the_work():
    from pipeline.label.executors import cpus_per_gpu, place_workers

    assert place_workers("auto", executor="local", cuda_available=True).device_type == "cuda"
    two_cores = place_workers("cpu", executor="ray", cpu_workers=3, io_threads=4, cluster_cpus=2)
    assert (two_cores.workers, two_cores.options) == (2, {"num_cpus": 1})  # each schedulable: it hung for ever
    assert "--cpu-workers 3: the Ray cluster has 2 CPUs, labelling on 2 CPU actors" in two_cores.note
    few_cpus = place_workers("auto", executor="ray", io_threads=16, cluster_gpus=2, cluster_cpus=6)
    assert few_cpus.options == {"num_gpus": 1, "num_cpus": 3}  # schedulable: 2 actors × 3 CPUs on 6 CPUs
    assert place_workers("auto", executor="ray", cluster_gpus=8, cluster_cpus=64, shards=2).workers == 2
    assert place_workers("cpu", executor="ray", cpu_workers=4, shards=1).workers == 1
    # --gpus beyond the cluster's: said (it labelled on CPU actors without a word where there was no GPU)
    assert place_workers("auto", executor="ray", gpus=8, cluster_gpus=2, cluster_cpus=16).note == \
        "--gpus 8: the Ray cluster has 2 GPUs, labelling on 2"
    assert place_workers("auto", executor="ray", gpus=8, cpu_workers=2, cluster_cpus=2).note == \
        "--gpus 8: the Ray cluster has no GPU, labelling on 2 CPU actor(s)"
    assert not place_workers("auto", executor="ray", gpus=2, cluster_gpus=2, cluster_cpus=16).note
    shared = place_workers("cuda", executor="ray", io_threads=8, cluster_gpus=2, cluster_cpus=32, workers_per_gpu=4)
    assert (shared.workers, shared.options) == (8, {"num_gpus": 0.25, "num_cpus": 4})  # 4 actors on each GPU
    assert place_workers("cpu", executor="ray", cpu_workers=2, cluster_gpus=2, workers_per_gpu=4).workers == 2
    for gpus, cpus, want in ((1, 1, 1), (8, 8, 1), (4, 6, 1), (2, 5, 2)):  # SalGAN's 2 per GPU, as the CPUs allow
        fit = place_workers("cuda", executor="ray", cluster_gpus=gpus, cluster_cpus=cpus, workers_per_gpu=2)
        assert (fit.workers, fit.options["num_gpus"]) == (gpus * want, 1 / want)
        assert fit.workers * fit.options["num_cpus"] <= cpus  # every actor schedulable: none waits for ever
        assert ("labelling with 1 per GPU" in fit.note) == (want == 1)
    # a CPU-only head of 64 cores beside GPU nodes of 8 GPUs with 16 and 24 CPUs: an actor reserves its CPUs on
    # its GPU's node (6 each, the cluster-wide share, gave the first node's 8 GPUs 2 actors: the others waited)
    nodes = [{"Resources": {"CPU": 64.0}}, {"Resources": {"CPU": 16.0, "GPU": 8.0}},
             {"Resources": {"CPU": 24.0, "GPU": 8.0}}]
    assert cpus_per_gpu(nodes) == 2.0 and cpus_per_gpu(nodes[:1]) is None
    apart = place_workers("cuda", executor="ray", io_threads=8, cluster_gpus=16, cluster_cpus=104, cpus_per_gpu=2.0)
    assert (apart.workers, apart.options) == (16, {"num_gpus": 1, "num_cpus": 2}) and not apart.note
    salgan = place_workers("cuda", executor="ray", io_threads=8, cluster_gpus=16, cluster_cpus=104, cpus_per_gpu=2.0,
                           workers_per_gpu=4)
    assert (salgan.workers, salgan.options) == (32, {"num_gpus": 0.5, "num_cpus": 1})
    assert "4 workers per GPU: the Ray cluster's GPU nodes have 2 CPUs per GPU, labelling with 2 per GPU" in salgan.note
    from pipeline.common.devices import DeviceError

    with pytest.raises(DeviceError, match="unknown device 'gpu'"):
        place_workers("gpu", executor="ray", cluster_gpus=1)


def test_ray_workers_that_cannot_load_the_weights_stop_the_run_with_one_line(coco_tree, tmp_path):
    """The driver only hashes the weights; a file that is there but unreadable stops the run when the Ray
    workers build their teacher: one line saying why, no shard written, no retries shard by shard."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli("label", "coco", "--teacher", "salgan", "--weights", str(bad), "--coco-root", str(coco_tree),
                     "--out", str(tmp_path / "out"), "--shard-size", "4", "--io-threads", "2", "--no-progress")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: the labelling workers could not start: cannot read weights file") and str(bad) in last
    assert "Traceback" not in result.stderr, result.stderr  # (Ray printed the actor's, 30 lines, before that line)
    assert not list(tmp_path.rglob("shard-*"))


# -- the data path: streamed tar, decode ahead across shards, the device path ------------------------------

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "coco"


def test_a_streamed_tar_is_byte_for_byte_the_tar_of_its_samples_and_its_marker_hashes_it(tmp_path):
    """The tar is hashed while written (never read back): the marker's sha256 and size are the file's, and the
    bytes are those ``webdataset.TarWriter`` writes for the same samples in one go."""
    import io

    from pipeline.label.shards import encode_sample, write_shard

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"{i:012d}", "jpg": rng.bytes(1000 + 517 * i),
                "classic.png": rng.bytes(300 + i), "json": {"id": i, "file": f"{i}.jpg"}} for i in range(5)]
    marker = write_shard(tmp_path, "shard-000000", [encode_sample(s) for s in samples[:2]] + samples[2:], {"count": 5})
    data = (tmp_path / "shard-000000.tar").read_bytes()
    assert marker["sha256"] == hashlib.sha256(data).hexdigest() and marker["bytes"] == len(data)
    assert json.loads((tmp_path / "shard-000000.json").read_text())["sha256"] == marker["sha256"]
    plain = io.BytesIO()
    with wds.TarWriter(plain, mtime=0, user="", group="") as w:
        for s in samples:
            w.write(s)
    assert data == plain.getvalue()
    assert b"PaxHeader" not in data  # an integer mtime: one 512-byte header per member, no pax header before it
    assert not list(tmp_path.glob(".*"))  # no temp file left


def test_a_shard_writer_that_fails_leaves_the_finished_shard_as_it_was(tmp_path):
    from pipeline.label.shards import ShardWriter, write_shard

    first = write_shard(tmp_path, "shard-000000", [{"__key__": "a", "jpg": b"x"}], {"count": 1})
    writer = ShardWriter(tmp_path, "shard-000000")
    writer.write({"__key__": "b", "jpg": b"y" * 5000})
    writer.abort()
    assert hashlib.sha256((tmp_path / "shard-000000.tar").read_bytes()).hexdigest() == first["sha256"]
    assert not list(tmp_path.glob(".*"))


def test_the_next_shard_is_decoding_before_this_shards_tar_is_finished(tmp_path):
    """``next_plan``: the next shard's images are read while this shard is still being written, and read
    once: its own call picks them up. The tars are those of calls without it."""
    import threading

    from pipeline.label import worker as worker_mod
    from pipeline.label.sources import folder_records, plan_shards

    plans = plan_shards(folder_records(SAMPLE / "val2017"), 6)
    labeler = worker_mod.ShardLabeler(LabelConfig(teacher="classic", batch_size=2, io_threads=2))
    loads: dict[str, int] = {}
    next_started = threading.Event()
    real_load = labeler._load

    def load(record):
        loads[record.key] = loads.get(record.key, 0) + 1
        if record in plans[1].records:
            next_started.set()
        return real_load(record)

    labeler._load = load
    seen_before_finish = []

    class Watched(worker_mod.ShardWriter):
        def finish(self, marker):
            if self.name == plans[0].name:  # loads of the next shard are under way by now (or never will be)
                seen_before_finish.append(next_started.wait(timeout=30))
            return super().finish(marker)

    for name in ("ahead", "plain"):
        (tmp_path / name).mkdir()
    worker_mod.ShardWriter, real_writer = Watched, worker_mod.ShardWriter
    try:
        first = labeler.label_shard(plans[0], tmp_path / "ahead", next_plan=plans[1])
        second = labeler.label_shard(plans[1], tmp_path / "ahead")
    finally:
        worker_mod.ShardWriter = real_writer
        labeler._load = real_load
    assert seen_before_finish == [True]
    assert sorted(loads) == sorted(r.key for p in plans for r in p.records) and set(loads.values()) == {1}
    plain = [labeler.label_shard(p, tmp_path / "plain") for p in plans]
    labeler.close()
    assert [first["sha256"], second["sha256"]] == [m["sha256"] for m in plain]


def test_a_wrong_guess_of_the_next_shard_costs_nothing_but_its_decoding(tmp_path):
    from pipeline.label.sources import folder_records, plan_shards
    from pipeline.label.worker import ShardLabeler

    plans = plan_shards(folder_records(SAMPLE / "val2017"), 4)
    labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=2, io_threads=2))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    guessed = [labeler.label_shard(plans[0], tmp_path / "a", next_plan=plans[1]),
               labeler.label_shard(plans[2], tmp_path / "a", next_plan=plans[1]),
               labeler.label_shard(plans[1], tmp_path / "a")]
    plain = [labeler.label_shard(p, tmp_path / "b") for p in (plans[0], plans[2], plans[1])]
    labeler.close()
    assert [m["sha256"] for m in guessed] == [m["sha256"] for m in plain]


def test_decoding_and_resizing_with_torch_gives_labels_close_to_the_opencv_path(tmp_path):
    """The GPU path (torchvision decode, torch resize, images staged on the device) run on the CPU: the
    classic teacher's labels of the bundled sample (colour and grey photos) agree with the OpenCV path's."""
    from pipeline.label.sources import folder_records, plan_shards
    from pipeline.label.worker import ShardLabeler

    plan = plan_shards(folder_records(SAMPLE / "val2017"), 100)[0]
    out = {}
    for decode in ("cpu", "device"):
        labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=5, io_threads=2, decode=decode))
        (tmp_path / decode).mkdir()
        marker = labeler.label_shard(plan, tmp_path / decode)
        labeler.close()
        assert marker["count"] == 12 and not marker["failures"]
        out[decode] = list(wds.WebDataset(str(tmp_path / decode / "shard-000000.tar"),
                                          shardshuffle=False).decode("rgb8"))
    for cpu, dev in zip(out["cpu"], out["device"]):
        assert cpu["__key__"] == dev["__key__"] and cpu["json"] == dev["json"]
        a, b = cpu["classic.png"][..., 0].astype(float).ravel(), dev["classic.png"][..., 0].astype(float).ravel()
        assert np.corrcoef(a, b)[0, 1] >= 0.999
        assert np.abs(cpu["jpg"].astype(float) - dev["jpg"].astype(float)).mean() < 4  # of 255


def test_a_large_jpeg_is_decoded_reduced_to_no_less_than_its_target_and_keeps_its_full_size(tmp_path):
    """`cpu-reduced`'s decode: the JPEG's size is read from its frame header (baseline, progressive, grey; none
    for a PNG or a header cut short), a JPEG at least 2, 4 or 8 times the target on both sides is decoded at
    that fraction (never below the target), with its full size reported, and its pixels, once area-resized to
    the target, lie within a few grey levels of the whole decode's on average (closer than a bilinear resize of
    the whole decode lies to its area resize); anything else is decoded whole."""
    rng = np.random.default_rng(0)
    base = cv2.resize(cv2.imread(str(SAMPLE / "val2017" / "000000000139.jpg")), (1280, 960))
    jpeg = cv2.imencode(".jpg", base, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    progressive = cv2.imencode(".jpg", base, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    grey = cv2.imencode(".jpg", cv2.cvtColor(base, cv2.COLOR_BGR2GRAY))[1].tobytes()
    png = cv2.imencode(".png", base)[1].tobytes()
    for data in (jpeg, progressive, grey):
        assert images.jpeg_size(data) == (960, 1280)
    assert images.jpeg_size(png) is None and images.jpeg_size(jpeg[:20]) is None
    assert images.jpeg_size(rng.integers(0, 256, 100, dtype=np.uint8).tobytes()) is None
    for path in sorted((SAMPLE / "val2017").glob("*.jpg")):
        assert images.jpeg_size(path.read_bytes()) == cv2.imread(str(path)).shape[:2]

    for target, reduced in [((96, 128), (120, 160)), ((192, 256), (240, 320)), ((384, 512), (480, 640)),
                            ((480, 641), (960, 1280)), ((481, 320), (960, 1280))]:
        for data in (jpeg, progressive):
            rgb, full = images.decode_at_least(data, target)
            assert rgb.shape == (*reduced, 3) and full == (960, 1280), target
            whole = images.resize(images.decode_image(data), target)
            diff = np.abs(images.resize(rgb, target).astype(int) - whole.astype(int))
            assert diff.mean() < 3, (target, diff.mean())  # 2.5 at 1/8, 1.3 at 1/4, 0.5 at 1/2
    rgb, full = images.decode_at_least(png, (96, 128))
    assert rgb.shape == (960, 1280, 3) and full == (960, 1280)
    assert np.array_equal(images.decode_at_least(grey, (96, 128))[0][..., 0], images.decode_image(grey, reduce=8)[..., 0])


def test_a_side_that_shrinks_is_averaged_when_the_other_side_grows():
    """A portrait photo into a landscape input (640×480 into DeepGaze's 384×512): its height shrinks while its
    width grows. OpenCV's area filter, asked for both at once, samples the shrinking side without averaging, so
    1-pixel stripes across it kept twice the contrast that averaging leaves (a pattern the photo does not
    have); each side is now filtered as it changes, as the device path's antialiased resize does."""
    stripes = np.zeros((640, 480, 3), np.uint8)
    stripes[::2] = 255  # each output row averages the 1.67 rows it covers: std 25.5 (of 127.5 for the stripes)
    for image, size in ((stripes, (384, 512)), (stripes.transpose(1, 0, 2), (512, 384))):
        out = images.resize(image, size)
        assert out.shape == (*size, 3) and out.std() < 30, out.std()
        assert cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA).std() > 45  # what this replaces: 48.8
    photo = cv2.imread(str(SAMPLE / "val2017" / "000000000139.jpg"))[:, :320]  # both sides shrink: as before
    assert np.array_equal(images.resize(photo, (200, 160)), cv2.resize(photo, (160, 200), interpolation=cv2.INTER_AREA))


def test_a_jpeg_whose_header_states_too_many_pixels_is_one_failed_image_on_every_decode_path(tmp_path):
    """A JPEG whose frame header claims 65000×65000 pixels (more than is decoded) is a per-image failure
    with its reason on every decode path, not a failed shard, nor (reduced at 1/8) a grey picture labelled as
    65000×65000, nor 12 GB that torchvision's decoder (or nvJPEG on a GPU) allocates for it; the other photos
    of its shard are labelled."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((SAMPLE / "val2017").glob("*.jpg"))[:2]:
        shutil.copy(path, photos / path.name)
    data = bytearray((SAMPLE / "val2017" / "000000000139.jpg").read_bytes())
    sof = next(i for i in range(2, len(data)) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (65000).to_bytes(2, "big") * 2
    (photos / "bomb.jpg").write_bytes(bytes(data))
    assert images.jpeg_size(bytes(data)) == (65000, 65000)
    for decode in ("cpu", "cpu-reduced", "device"):
        summary = label(folder_records(photos), tmp_path / decode, LabelConfig(teacher="classic", batch_size=4,
                        io_threads=1, device="cpu", decode=decode), shard_size=4, executor="local", progress=False)
        marker = json.loads((tmp_path / decode / "shard-000000.json").read_text())
        assert summary.labelled == 2 and [f["file"].rsplit("/", 1)[1] for f in marker["failures"]] == ["bomb.jpg"]
        assert marker["failures"][0]["reason"] == ("image too large (65000×65000, 4225 megapixels; at most 134 are "
                                                   "decoded)"), marker["failures"]  # (its header, read first)


def test_an_unknown_decode_setting_is_refused():
    with pytest.raises(ValueError, match="unknown decode 'gpu'"):
        LabelConfig(teacher="classic", decode="gpu")


def test_decoding_ahead_stays_within_its_window_and_the_next_lists_loads_are_reused():
    """Memory stays bounded however long a shard is: never more than ``window`` images loaded or loading
    ahead of the consumer, the next shard's included; what was started for the next run is not loaded twice."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.common.prefetch import LoadAhead

    lock, started, consumed, worst = threading.Lock(), [], [0], [0]

    def load(i):
        with lock:
            started.append(i)
            worst[0] = max(worst[0], len(started) - consumed[0])
        return i * i

    submitted = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, *args, **kwargs):
            submitted.append(args[0])
            return super().submit(fn, *args, **kwargs)

    with Recording(3) as pool:
        ahead = LoadAhead(pool, load, window=5)
        first = []
        for i, r in ahead.run(range(40), then=range(40, 60)):
            first.append((i, r))
            time.sleep(0.001)  # a consumer slower than the loads
            with lock:
                consumed[0] += 1
        assert first == [(i, i * i) for i in range(40)]
        assert submitted[-5:] == list(range(40, 45))  # the next list was under way before this one ended
        second = []
        for _, r in ahead.run(range(40, 60)):
            second.append(r)
            with lock:
                consumed[0] += 1
    assert second == [i * i for i in range(40, 60)]
    assert sorted(started) == sorted(submitted) == list(range(60))  # each loaded once
    assert worst[0] <= 5 + 1  # the window, plus the one being handed to the consumer


def test_the_device_path_fails_the_images_the_cpu_path_fails_with_the_same_reasons(tmp_path):
    """An image the device cannot decode (garbage between a JPEG's markers) fails the batched decode; the
    batch is decoded again one by one and that image goes to the CPU path, so the rest are labelled and the
    failures are the CPU path's (a CMYK JPEG in the batch is labelled either way)."""
    from pipeline.label.sources import plan_shards
    from pipeline.label.worker import ShardLabeler

    root = broken_tree(tmp_path / "coco", {1: "truncated", 5: "empty"})
    d = root / "val2017"
    (d / f"{3:012d}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300 + b"\xff\xda" + b"\x13" * 50 + b"\xff\xd9")
    Image.open(d / f"{7:012d}.jpg").convert("CMYK").save(d / f"{7:012d}.jpg", "JPEG")
    plan = plan_shards(coco_records(root, "val2017"), 100)[0]
    markers = {}
    for decode in ("cpu", "device"):
        (tmp_path / decode).mkdir()
        labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=4, io_threads=2, decode=decode))
        markers[decode] = labeler.label_shard(plan, tmp_path / decode)
        labeler.close()
    cpu, dev = markers["cpu"], markers["device"]
    assert [f["key"] for f in cpu["failures"]] == [f"{i:012d}" for i in (2, 3, 6)]
    assert dev["keys"] == cpu["keys"] and dev["failures"] == cpu["failures"]


def test_a_map_of_nan_or_inf_is_a_recorded_failure_not_a_stored_label(tmp_path):
    """A teacher that returns NaN or inf for an image (a diverged network, an overflow in low precision) must not
    have that map quantised into a PNG of garbage that training then reads as a label: the image is a
    per-image failure with its reason, the rest of the shard is labelled, and --retry-failed can redo it."""
    from pipeline.label.sources import folder_records, plan_shards
    from pipeline.label.worker import ShardLabeler
    from teachers import build_teacher

    classic = build_teacher("classic")

    class Broken(type(classic)):
        def forward(self, images):
            maps = super().forward(images).clone()
            maps[1] = float("nan")  # the second image of every batch
            maps[2, 0, 0, 0] = float("inf")  # one pixel of the third
            return maps

    plan = plan_shards(folder_records(SAMPLE / "val2017"), 100)[0]
    labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=4, io_threads=2, device="cpu"), Broken())
    marker = labeler.label_shard(plan, tmp_path)
    labeler.close()
    bad = [plan.records[i].key for i in (1, 2, 5, 6, 9, 10)]
    assert [f["key"] for f in marker["failures"]] == bad
    assert {f["reason"] for f in marker["failures"]} == {"the teacher's map holds NaN or inf values"}
    stored = [s["__key__"] for s in wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)]
    assert stored == marker["keys"] == [r.key for r in plan.records if r.key not in bad]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                                                                  reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_labels_quantised_where_the_teacher_ran_are_the_bytes_numpy_would_store(device):
    """The worker turns maps into what the tar stores (8-bit probability, float16 log density) on the teacher's
    device, a batch at once; the values are the ones the former NumPy path stored, halfway and out-of-range
    values included, so shards keep their bytes."""
    import torch

    from pipeline.common import images
    from pipeline.label.worker import encode_label, quantize_label

    rng = np.random.default_rng(0)
    p = rng.uniform(-0.2, 1.2, (3, 24, 32)).astype(np.float32)
    p[0, 0, :10] = (np.arange(10, dtype=np.float32) + 0.5) / 255.0  # halfway between two 8-bit steps
    q = quantize_label(torch.from_numpy(p).to(device), "probability_map").cpu().numpy()
    assert q.dtype == np.uint8
    assert np.array_equal(q, np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8))
    for i in range(3):  # the PNG written is the one a float map gave before
        assert encode_label(q[i], "probability_map") == images.encode_png(
            np.rint(np.clip(p[i], 0.0, 1.0) * 255.0).astype(np.uint8))
    d = (rng.normal(-12.0, 3.0, (2, 24, 32)) + rng.uniform(0, 1e-3, (2, 24, 32))).astype(np.float32)
    h = quantize_label(torch.from_numpy(d).to(device), "log_density").cpu().numpy()
    assert h.dtype == np.float16 and np.array_equal(h, d.astype(np.float16))
    assert encode_label(h[0], "log_density") is not None and np.array_equal(encode_label(h[0], "log_density"), h[0])


@pytest.mark.parametrize("device", DEVICES)
def test_images_of_one_shape_resized_together_equal_each_resized_alone(device, monkeypatch):
    """A batch's photos are resized one call per shape (in groups of at most RESIZE_GROUP), with exactly the
    values of one call per image, shrinking and enlarging, in the order given."""
    import torch

    from pipeline.common import images

    monkeypatch.setattr(images, "RESIZE_GROUP", 2)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 48, 64), (3, 30, 20), (3, 48, 64), (3, 48, 64), (3, 12, 16), (3, 30, 20), (3, 48, 64)]
    imgs = [torch.randint(0, 256, s, generator=g, dtype=torch.uint8).to(device) for s in shapes]
    for size in ((24, 32), (40, 40)):
        together = images.resize_tensors(imgs, size)
        assert [tuple(t.shape) for t in together] == [(3, *size)] * len(imgs)
        for alone, t in zip((images.resize_tensor(x, size) for x in imgs), together):
            assert t.dtype == torch.uint8 and torch.equal(alone, t)


def test_the_folder_check_is_made_on_the_file_opened_through_symlinks_dot_dot_and_swapped_folders(tmp_path):
    """An image must lie in its folder: what is checked is the file the read opened, so a symlinked file or
    folder that leads out, a path whose ``..`` climbs out, and a folder swapped for a link leading out after a
    first read are all refused, and links that stay inside are read."""
    from pipeline.common import images

    root, out = tmp_path / "photos", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    out.mkdir()
    for f in (root / "a.jpg", root / "sub" / "b.jpg", out / "b.jpg"):
        f.write_bytes(f.name.encode())
    (root / "link_out.jpg").symlink_to(out / "b.jpg")
    (root / "link_in.jpg").symlink_to(root / "sub" / "b.jpg")
    (root / "away").symlink_to(out)
    (root / "here").symlink_to(root / "sub")
    r = str(root)
    for name, inside in (("a.jpg", True), ("sub/b.jpg", True), ("link_in.jpg", True), ("here/b.jpg", True),
                         ("link_out.jpg", False), ("away/b.jpg", False), ("../outside/b.jpg", False),
                         ("sub/../../outside/b.jpg", False)):
        if inside:
            assert images.read_file(os.path.join(r, name), root=r) in (b"a.jpg", b"b.jpg"), name
        else:
            with pytest.raises(images.ImageError, match="outside the image folder"):
                images.read_file(os.path.join(r, name), root=r)
    assert images.read_file(str(root / "link_out.jpg")) == b"b.jpg"  # no root: no check (--allow-outside-root)
    (root / "here").unlink()
    (root / "here").symlink_to(out)  # the folder read a moment ago now leads out
    with pytest.raises(images.ImageError, match="outside the image folder"):
        images.read_file(str(root / "here" / "b.jpg"), root=r)
    (root / "gone.jpg").symlink_to(out / "missing.jpg")  # broken, and it would lead out
    with pytest.raises(images.ImageError, match=r"file not found: .*/missing.jpg \(a symlink's target"):  # where it leads
        images.read_file(str(root / "gone.jpg"), root=r)
    with pytest.raises(images.ImageError, match="^file not found$"):
        images.read_file(str(root / "missing.jpg"), root=r)

    # a file out of the folder is refused without being opened for reading: a FIFO's blocked writer stays blocked
    import threading

    os.mkfifo(out / "pipe.jpg")
    (root / "pipe.jpg").symlink_to(out / "pipe.jpg")
    writer = threading.Thread(target=lambda: os.close(os.open(out / "pipe.jpg", os.O_WRONLY)), daemon=True)
    writer.start()  # blocks until a reader opens the FIFO
    with pytest.raises(images.ImageError, match="outside the image folder"):
        images.read_file(str(root / "pipe.jpg"), root=r)
    writer.join(0.3)
    assert writer.is_alive()  # never opened by the check
    os.close(os.open(out / "pipe.jpg", os.O_RDONLY | os.O_NONBLOCK))  # (lets it go)
    writer.join(5)
    assert images._within("pipe:[123]", r) is False  # what /proc names a pipe: no path, so not inside


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 1024 * 1024 + 7])
def test_read_file_returns_every_byte_and_refuses_one_over_the_limit(tmp_path, size):
    from pipeline.common import images

    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    assert images.read_file(str(f)) == data
    assert images.read_file(str(f), max_bytes=None) == data
    assert images.read_file(str(f), max_bytes=size) == data
    if size:
        with pytest.raises(images.ImageError, match="file too large"):
            images.read_file(str(f), max_bytes=size - 1)


def test_read_file_reads_on_after_short_reads_and_catches_a_file_that_grew_past_the_limit(tmp_path, monkeypatch):
    """Reads that return less than asked (a network filesystem), and a file that grew after its size was taken
    (a camera still writing it): every byte is read, and growth past ``max_bytes`` is refused."""
    from pipeline.common import images

    size = 100_003
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    real_read, real_fstat = os.read, os.fstat
    monkeypatch.setattr(images.os, "read", lambda fd, n: real_read(fd, min(n, 999)))
    assert images.read_file(str(f)) == data and images.read_file(str(f), max_bytes=size) == data
    monkeypatch.setattr(images.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 10, *real_fstat(fd)[7:10])))
    assert images.read_file(str(f)) == data  # it says 10 bytes: the rest is read too
    with pytest.raises(images.ImageError, match="file too large"):
        images.read_file(str(f), max_bytes=size - 1)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("teacher", ["classic", "salgan"])
def test_the_worker_hands_a_batch_to_the_gpu_without_synchronising(teacher):
    """Once a batch is decoded on the GPU, staging it, the teacher, the label resize, quantising and the copies
    back to pinned memory run under ``torch.cuda.set_sync_debug_mode("error")``: the main thread only waits
    when it asks for the labels, so the GPU stays a batch ahead."""
    import torch

    from pipeline.label.sources import folder_records, plan_shards
    from pipeline.label.worker import ShardLabeler

    labeler = ShardLabeler(LabelConfig(teacher=teacher, weights="random" if teacher == "salgan" else None,
                                       batch_size=6, io_threads=2, device="cuda", decode="device"))
    try:
        records = plan_shards(folder_records(SAMPLE / "val2017"), 100)[0].records
        for _ in range(2):  # the first batch may fill caches (cuDNN, the pinned-memory pool)
            batch = [labeler._load(r) for r in records[:6]]
            labeler._decode_on_device(batch)
            assert all(it.device_input is not None for it in batch)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                wait = labeler._submit(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            labels, finite = wait()
            assert labels.shape == (6, *labeler.config.image_size) and finite.all()
            assert all(it.image is not None and it.bgr for it in batch)
    finally:
        labeler.close()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_decode_never_writes_into_memory_the_callers_stream_has_just_freed():
    """torchvision's nvJPEG decode writes on a stream of its own without waiting for the caller's stream. Memory
    the caller's stream has freed while its work is still queued (a running batch's input) must not be where
    the decoded images land, or the decoder overwrites it under the running teacher."""
    import torch

    from pipeline.common import images

    datas = [p.read_bytes() for p in sorted((SAMPLE / "val2017").glob("*.jpg"))[:6]]
    device = torch.device("cuda")
    sizes = [x.numel() for x in images.decode_jpegs(datas, device)]  # also creates the decoder
    for _ in range(3):
        busy = torch.randn(2048, 2048, device=device)
        held = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
        for _ in range(20):  # keep the caller's stream busy with work that still reads what is freed below
            busy = busy @ busy / 2048
            for h in held:
                h.add_(1)
        freed = [(h.data_ptr(), h.data_ptr() + h.nbytes) for h in held]
        del held
        decoded = images.decode_jpegs(datas, device)
        for x in decoded:  # no byte of a decoded image in a freed block
            start, end = x.data_ptr(), x.data_ptr() + x.nbytes
            assert not any(start < hi and lo < end for lo, hi in freed)
        torch.cuda.synchronize()


def test_a_light_teacher_gets_four_workers_per_gpu_unless_told(coco_tree, tmp_path, monkeypatch):
    """`--workers-per-gpu` defaults to the teacher's: 4 for SalGAN (one worker process, not the GPU, bounds it:
    with four, 2,023-2,182 images/s on an H100 decoding on the GPU, against about 1,900 with two and 1,450 with
    one), 1 for the others; a number given is used as it is."""
    import pipeline.label.driver as driver

    seen = []

    class Placed(Exception):
        pass

    def place(device, **kw):
        seen.append(kw["workers_per_gpu"])
        raise Placed

    monkeypatch.setattr(driver, "place_workers", place)
    records = coco_records(coco_tree, "val2017")
    for teacher, given in (("salgan", None), ("classic", None), ("deepgaze", None), ("salgan", 3)):
        config = LabelConfig(teacher=teacher, weights="random" if teacher != "classic" else None)
        with pytest.raises(Placed):
            label(records, tmp_path / f"{teacher}{given}", config, executor="local", workers_per_gpu=given,
                  progress=False)
    assert seen == [4, 1, 1, 3]


def test_another_image_folder_of_the_same_name_is_told_apart_before_any_overwrite_is_suggested(tmp_path):
    """Label folders are named after the image folder: a second `photos/` labelled into the same --out met the
    first one's shards, and the error suggested --overwrite-changed or --overwrite, which would have deleted
    the first folder's labels. It now says first that this may be another folder of the same name."""
    for folder, names in (("a", ("chelsea", "astronaut")), ("b", ("coffee", "rocket"))):
        (tmp_path / folder / "photos").mkdir(parents=True)
        for name in names:
            write_jpeg(tmp_path / folder / "photos" / f"{name}.jpg", photo(name, 96))
    args = ["label", "folder", "--teacher", "classic", "--out", str(tmp_path / "labels"), "--executor", "local",
            "--no-progress", "--image-size", "64x96"]
    assert CliRunner().invoke(cli, [*args, "--images", str(tmp_path / "a" / "photos")]).exit_code == 0
    other = CliRunner().invoke(cli, [*args, "--images", str(tmp_path / "b" / "photos")])
    assert other.exit_code == 1, other.output
    assert "or this is another image folder of the same name" in other.output
    assert other.output.index("give that one another --out") < other.output.index("--overwrite-changed")


def _decoding_runs(tmp_path: Path):
    """The sample's val2017 photos copied into a folder, the folder of their labels, and a function that labels
    them there (classic on the CPU, shards of 6) decoding as it is told."""
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLE / "val2017", photos)
    folder = tmp_path / "labels"

    def run(decode: str):
        return label(folder_records(photos), folder, LabelConfig(teacher="classic", batch_size=4, io_threads=2,
                                                                 device="cpu", decode=decode),
                     shard_size=6, executor="local", progress=False)

    return photos, folder, run


def test_shards_decoded_on_the_other_path_are_not_mixed_in_and_older_markers_resume_as_before(tmp_path):
    """The decode path (`--decode`, resolved: cpu or device) is part of the shard identity: its labels differ by
    more than the bf16 tolerance. A run on the other path refuses the finished shards; markers written before
    the path was recorded have it from their settings (auto was then cpu on a CPU), so such a folder resumes as before
    (a photo added goes into a new shard), and `pipeline verify` accepts a folder of old and new markers; a
    marker edited by hand there is an unfinished shard, not a crash."""
    from pipeline.label.verify import verify_labels

    photos, folder, run = _decoding_runs(tmp_path)

    assert run("cpu").labelled == 12
    markers = sorted(folder.glob("shard-*.json"))
    assert [json.loads(m.read_text())["decode"] for m in markers] == ["cpu", "cpu"]
    with pytest.raises(LabelError, match=r"decode differs \(shard has 'cpu', this run 'device'\)"):
        run("device")
    assert run("auto").skipped == 12  # auto resumes on the path the finished shards were made on

    for m in markers:  # as written before the path was recorded
        old = json.loads(m.read_text())
        del old["decode"]
        old["config"]["decode"] = "auto"
        m.write_text(json.dumps(old))
    shutil.copy(photos / "000000000139.jpg", photos / "000000000000.jpg")  # sorts first
    summary = run("auto")
    assert (summary.labelled, summary.skipped, summary.shards_done) == (1, 12, 1)
    assert verify_labels(folder).ok, verify_labels(folder).problems
    old = json.loads(markers[0].read_text())
    old["device"] = "cuda:0"  # an older GPU run decoded on the device
    markers[0].write_text(json.dumps(old))
    with pytest.raises(LabelError, match=r"shard-000000: decode differs \(shard has 'device', this run 'cpu-reduced'\)"):
        run("auto")
    old["config"] = "edited by hand"
    markers[0].write_text(json.dumps(old))
    report = verify_labels(folder)
    assert report.shards == 3 and report.ok, report.problems


def test_auto_decodes_salgans_photos_on_the_cpus_beside_a_gpu_and_the_other_teachers_on_it(tmp_path, monkeypatch):
    """`--decode auto` on a GPU: SalGAN's forward pass is so light that its workers label faster decoding on
    the CPUs beside the GPU (measured on an H100), so its photos are decoded there; the other teachers' on the
    GPU. An explicit --decode is kept. (The driver's resolution, on a machine made to report one GPU: the
    identity it plans is caught before any worker starts.)"""
    import pipeline.label.driver as driver

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    seen = []

    def planned(config, precision, decode):
        seen.append((config.teacher, config.decode, precision, decode))
        raise KeyboardInterrupt  # stop here: no Ray, no teacher

    monkeypatch.setattr(driver, "planned_identity", planned)
    for teacher, decode in [("salgan", "auto"), ("classic", "auto"), ("salgan", "device"), ("classic", "cpu")]:
        with pytest.raises(KeyboardInterrupt):
            label(folder_records(SAMPLE / "val2017"), tmp_path / f"{teacher}-{decode}",
                  LabelConfig(teacher=teacher, weights="random" if teacher == "salgan" else None, decode=decode),
                  executor="ray", progress=False)
    assert [s[2:] for s in seen] == [("bf16", "cpu-reduced"), ("bf16", "device"), ("bf16", "device"), ("bf16", "cpu")]


def test_auto_resumes_a_folder_on_the_decode_path_its_finished_shards_were_made_on(tmp_path, capsys):
    """A folder labelled on one decode path resumes under `--decode auto` on that path, with a note, whatever
    auto would choose on its own (a default that changed, another machine), instead of refusing the finished
    shards; the new shard is made on the same path. An explicit other path is still refused, and so is a path
    this version does not know."""
    photos, folder, run = _decoding_runs(tmp_path)

    assert run("device").labelled == 12
    capsys.readouterr()
    shutil.copy(photos / "000000000139.jpg", photos / "000000000000.jpg")  # sorts first: a shard of its own
    summary = run("auto")  # auto on a CPU alone would take cpu-reduced
    assert (summary.labelled, summary.skipped) == (1, 12)
    assert "note: --decode auto decodes 'device', as the finished shards of" in capsys.readouterr().err
    markers = [json.loads(m.read_text()) for m in sorted(folder.glob("shard-*.json"))]
    assert [(m["decode"], m["config"]["decode"]) for m in markers] == [("device", "device")] * 3
    with pytest.raises(LabelError, match=r"decode differs \(shard has 'device', this run 'cpu'\)"):
        run("cpu")
    capsys.readouterr()
    assert run("auto").skipped == 13 and "note:" not in capsys.readouterr().err  # nothing left to do: no note
    for path in sorted(folder.glob("shard-*.json")):  # a path this version does not know (a newer one's)
        path.write_text(json.dumps({**json.loads(path.read_text()), "decode": "device-reduced"}))
    with pytest.raises(LabelError, match=r"decode differs \(shard has 'device-reduced', this run 'cpu-reduced'\)"):
        run("auto")


def test_a_run_refused_before_any_work_leaves_no_folder_behind(coco_tree, tmp_path):
    """`pipeline label` refused before it writes anything (here SalGAN without --weights) removes the output
    folders it created, its lock too; a folder that was there before stays, and a run that is not refused labels
    there as usual."""
    out = tmp_path / "new" / "labels"
    args = ["label", "coco", "--teacher", "salgan", "--coco-root", str(coco_tree), "--split", "val2017",
            "--executor", "local", "--no-progress"]
    r = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert r.exit_code != 0 and "salgan needs --weights" in r.output, r.output
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "kept")])
    assert r.exit_code != 0 and (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "salgan").exists()
    r = CliRunner().invoke(cli, [*args[:3], "classic", *args[4:], "--out", str(out), "--shard-size", "4"])
    assert r.exit_code == 0, r.output
    assert (out / "classic" / "val2017" / "labels.json").is_file()


def test_a_relative_weights_path_reaches_the_workers_as_an_absolute_one(tmp_path, monkeypatch):
    """Ray actors on another node (or started in another folder) resolve a relative --weights against their
    own folder: `pipeline label` hands them the file's absolute path (the recorded digest is the file's)."""
    import pipeline.label.driver as driver

    seen = []
    monkeypatch.setattr(driver, "label", lambda records, folder, config, **kw: seen.append(config.weights) or 1 / 0)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "gen.pt").write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["label", "folder", "--teacher", "salgan", "--weights", "w/gen.pt", "--images",
                                 str(SAMPLE / "val2017"), "--out", str(tmp_path / "labels"), "--no-progress"])
    assert seen == [str((tmp_path / "w" / "gen.pt").resolve())], r.output


def test_the_previews_captions_keep_accented_names_readable():
    """OpenCV's Hershey fonts draw every letter outside ASCII as `?`: `Málaga/café` was captioned `M?laga/caf?`."""
    from pipeline.label.preview import caption

    assert caption("Málaga/café_01") == "Malaga/cafe_01"
    assert caption("Ångström ﬁ") == "Angstrom fi"  # (a ligature: its letters)
    assert caption("猫/photo") == "?/photo"  # no ASCII spelling: still one mark per letter


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_batch_decoded_partly_on_the_device_and_partly_on_the_host_keeps_its_order_without_a_sync(device):
    """A PNG (or a JPEG nvJPEG refuses) among photos decoded on the device is decoded on the host: the teacher's
    batch holds each image where the plan put it, and on a GPU is put together without waiting for it (it
    indexed a GPU tensor with a list, a copy from pageable memory: checked under CUDA's sync debug mode)."""
    from types import SimpleNamespace

    from pipeline.label.worker import ShardLabeler

    labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=4, io_threads=1, decode="device",
                                       image_size=(8, 12), device=device))
    rng = np.random.default_rng(0)
    on_device = [torch.from_numpy(rng.integers(0, 255, (3, 8, 12), dtype=np.uint8)).to(device) for _ in range(2)]
    on_host = [rng.integers(0, 255, (8, 12, 3), dtype=np.uint8) for _ in range(2)]
    batch = [SimpleNamespace(device_input=on_device[0], teacher_input=None),
             SimpleNamespace(device_input=None, teacher_input=on_host[0]),
             SimpleNamespace(device_input=None, teacher_input=on_host[1]),
             SimpleNamespace(device_input=on_device[1], teacher_input=None)]
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        x = labeler._teacher_batch(batch)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        labeler.close()
    host = [torch.from_numpy(a).permute(2, 0, 1).to(device) for a in on_host]
    assert torch.equal(x, torch.stack([on_device[0], host[0], host[1], on_device[1]]))
