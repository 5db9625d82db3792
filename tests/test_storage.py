"""Object storage: `pipeline label --out s3://…`, `pipeline train --labels s3://… --run s3://… --init s3://…`,
`pipeline verify s3://…`, `--checkpoint s3://…` and `--out s3://…` of eval, predict, profile, export and fixations
against moto's stand-alone S3 server (its own process on loopback, no patching); file:// URLs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "coco"
LABEL = ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES), "--shard-size", "4",
         "--io-threads", "2", "--executor", "local", "--image-size", "64x96", "--no-progress"]


@pytest.fixture(scope="module")
def s3(s3_server):
    """The S3 server's variables in this process's environment (and so in its subprocesses'); yields an s3fs
    client."""
    import os

    import fsspec
    import s3fs

    saved = {k: os.environ.get(k) for k in s3_server}
    os.environ.update(s3_server)
    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield fsspec.filesystem("s3")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def labelled(sample_labels) -> Path:
    """The samples labelled into a local folder (conftest's, with the options of LABEL): the reference shards,
    and the input of the training test."""
    return sample_labels


def test_labels_on_s3_are_the_local_labels_and_resume_and_verify_there(s3, labelled, monkeypatch):
    """Labels written to S3 are the local run's bytes; a resume reads the markers there and downloads no
    finished tar whose version (size and ETag) is the one its marker recorded, but hashes one that was
    replaced since (same size, other bytes: relabelled); `pipeline verify` checks them all."""
    from pipeline.common.storage import RemotePath

    folder = labelled
    remote = "labels/run/classic/val2017"

    first = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])
    assert first.exit_code == 0, first.output
    names = sorted(p.rsplit("/", 1)[1] for p in s3.ls(remote, refresh=True))
    assert names == ["labels.json", "preview.png", "shard-000000.json", "shard-000000.tar", "shard-000001.json",
                     "shard-000001.tar", "shard-000002.json", "shard-000002.tar"]
    for tar in sorted(folder.glob("shard-*.tar")):  # the same bytes as the local run's
        assert sha(s3.cat_file(f"{remote}/{tar.name}")) == sha(tar.read_bytes())

    hashed = []  # the tars read back from the store

    def reading(self, mode="r", real=RemotePath.open, **kwargs):
        if self.name.endswith(".tar"):
            hashed.append(self.name)
        return real(self, mode, **kwargs)

    def asked(self, real=RemotePath.version):
        hashed.append(f"HEAD {self.name}")
        return real(self)

    monkeypatch.setattr(RemotePath, "open", reading)
    monkeypatch.setattr(RemotePath, "version", asked)
    again = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])  # resume reads the markers there
    assert again.exit_code == 0 and "0 written, 3 already done" in again.output, again.output
    assert hashed == []  # each tar is the very object its marker recorded (one listing says so): nothing downloaded
    size = len(s3.cat_file(f"{remote}/shard-000000.tar"))
    s3.pipe_file(f"{remote}/shard-000000.tar", b"x" * size)  # replaced by other bytes of the same size
    s3.invalidate_cache()
    swapped = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])
    assert swapped.exit_code == 0 and "1 written, 2 already done" in swapped.output, swapped.output
    assert hashed == ["shard-000000.tar", "HEAD shard-000000.tar"]  # hashed, relabelled, its new version recorded
    assert sha(s3.cat_file(f"{remote}/shard-000000.tar")) == sha((folder / "shard-000000.tar").read_bytes())

    s3.rm_file(f"{remote}/shard-000001.json")  # a shard whose marker never made it: redone, alone
    s3.invalidate_cache()
    redo = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])
    assert redo.exit_code == 0 and "1 written, 2 already done" in redo.output, redo.output
    assert sha(s3.cat_file(f"{remote}/shard-000001.tar")) == sha((folder / "shard-000001.tar").read_bytes())

    from pipeline.label.shards import verify_dataset

    assert verify_dataset(f"s3://{remote}") == ""
    ok = CliRunner().invoke(cli, ["verify", f"s3://{remote}", "--deep"])
    assert ok.exit_code == 0 and ok.output.startswith(f"OK: s3://{remote}: 3 shards, 12 samples"), ok.output
    s3.pipe_file(f"{remote}/shard-000002.tar", b"not the tar")
    s3.invalidate_cache()
    assert "tar missing or of the wrong size" in verify_dataset(f"s3://{remote}")
    bad = CliRunner().invoke(cli, ["verify", f"s3://{remote}"])
    assert bad.exit_code == 1 and "shard-000002" in bad.output and "tar is 11 bytes" in bad.output, bad.output
    root = CliRunner().invoke(cli, ["verify", "s3://labels/run"])  # the --out root: names the folders below it
    assert root.exit_code == 1 and f"label folders below it: s3://{remote} (give one of those" in root.output
    assert "labels.json  missing" not in root.output, root.output
    for args in (["verify", "s3://labels/nothing"], ["eval", "--teacher", "classic", "--labels", "s3://labels/nothing"],
                 ["train", "--labels", "s3://labels/nothing", "--run", "/nonexistent/run"]):
        r = CliRunner().invoke(cli, args)  # a usage mistake, as a missing local folder is
        assert r.exit_code == 2 and "s3://labels/nothing does not exist" in r.output, (args, r.output)


TRAIN = ["train", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--backbone-weights", "none",
         "--workers", "1", "--shuffle-buffer", "4", "--no-progress"]


def final_weights(read_bytes) -> dict:
    """The model of the checkpoint a run folder's latest.json names (``read_bytes``: relative path → bytes)."""
    import torch

    name = json.loads(read_bytes("checkpoints/latest.json"))["checkpoint"]
    return torch.load(io.BytesIO(read_bytes(f"checkpoints/{name}")), map_location="cpu", weights_only=False)["model"]


def without_seconds(text: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(io.StringIO(text))]


def test_training_reads_and_writes_object_storage_as_it_does_local_folders(s3, labelled, tmp_path):
    """Labels on S3, a run folder on S3 trained one epoch then resumed for a second: the same weights, metrics
    and losses as the same two epochs trained from and into local folders; `pipeline eval --labels s3://…` scores
    as on the local folder; a corrupt tar there is refused."""
    local, url = labelled, "s3://labels/train/classic/val2017"
    for f in sorted(local.iterdir()):
        s3.put_file(str(f), f"labels/train/classic/val2017/{f.name}")
    val = tmp_path / "val"  # a label folder of the last shard alone: a short validation
    val.mkdir()
    index = json.loads((local / "labels.json").read_text())
    index.update(shards=index["shards"][-1:], count=index["shards"][-1]["count"])
    (val / "labels.json").write_text(json.dumps(index))
    for name in ("shard-000002.tar", "shard-000002.json"):
        (val / name).write_bytes((local / name).read_bytes())
        s3.put_file(str(val / name), f"labels/val/{name}")
    s3.put_file(str(val / "labels.json"), "labels/val/labels.json")

    here = CliRunner().invoke(cli, [*TRAIN, "--labels", str(local), "--val-labels", str(val), "--run",
                                    str(tmp_path / "run"), "--epochs", "2"])
    assert here.exit_code == 0, here.output
    remote = [*TRAIN, "--labels", url, "--val-labels", "s3://labels/val", "--run", "s3://labels/runs/a"]
    first = CliRunner().invoke(cli, remote)
    assert first.exit_code == 0 and "checkpoints: s3://labels/runs/a/checkpoints" in first.output, first.output
    pointer = json.loads(s3.cat_file("labels/runs/a/checkpoints/latest.json"))
    assert (pointer["checkpoint"], pointer["epoch"]) == ("epoch-0000.pt", 0)
    assert pointer["sha256"] == sha(s3.cat_file("labels/runs/a/checkpoints/epoch-0000.pt"))
    second = CliRunner().invoke(cli, [*remote, "--epochs", "2"])
    assert second.exit_code == 0, second.output + second.stderr
    assert "resuming s3://labels/runs/a after epoch 1 (step 1)" in second.stderr

    s3.invalidate_cache()
    names = sorted(p.split("labels/runs/a/", 1)[1] for p in s3.find("labels/runs/a"))
    names = [n for n in names if not n.startswith("tensorboard/")]  # (there too where the extra is installed)
    assert names == ["checkpoints/best.json", "checkpoints/epoch-0000.pt", "checkpoints/epoch-0001.pt",
                     "checkpoints/latest.json", "config.json", "curves.png", "losses.csv", "metrics.csv"]
    a = final_weights(lambda rel: (tmp_path / "run" / rel).read_bytes())
    b = final_weights(lambda rel: s3.cat_file(f"labels/runs/a/{rel}"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert s3.cat_file("labels/runs/a/losses.csv") == (tmp_path / "run" / "losses.csv").read_bytes()
    metrics = without_seconds(s3.cat_file("labels/runs/a/metrics.csv").decode())
    assert len(metrics) == 2 and metrics == without_seconds((tmp_path / "run" / "metrics.csv").read_text())

    scores = [CliRunner().invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run"), "--labels", labels,
                                       "--val-shards", "0", "--no-progress"]) for labels in (str(val), "s3://labels/val")]
    assert all(r.exit_code == 0 for r in scores), scores[1].output
    here, there = ([line for line in r.output.splitlines()[1:] if not line.lstrip().startswith(("wall", "images/s"))]
                   for r in scores)
    assert there == here and len(here) == 6  # cc, kl_div, sim, nss, scored, failed: the same from S3

    s3.pipe_file("labels/train/classic/val2017/shard-000001.tar", (local / "shard-000001.tar").read_bytes()[:-1] + b"x")
    s3.invalidate_cache()
    corrupt = CliRunner().invoke(cli, [*remote, "--epochs", "3"])
    assert corrupt.exit_code == 1, corrupt.output
    assert corrupt.output.splitlines()[-1].startswith(f"Error: shard {url}/shard-000001.tar")


def test_a_missing_storage_package_is_one_sentence_naming_the_extra(monkeypatch, tmp_path):
    import importlib

    registry = importlib.import_module("fsspec.registry")
    for protocol, package in (("s3", "s3fs"), ("gs", "gcsfs")):  # as if neither were installed
        monkeypatch.delitem(registry._registry, protocol, raising=False)
        monkeypatch.setitem(sys.modules, package, None)
    train = CliRunner().invoke(cli, [*TRAIN, "--labels", "s3://bucket/labels", "--run", str(tmp_path / "run")])
    assert train.exit_code == 1
    assert train.output == ("Error: s3:// paths need the s3fs package: pip install 'saliency-pipeline[s3]' "
                            "(or pip install s3fs)\n")
    verify = CliRunner().invoke(cli, ["verify", "gs://bucket/labels"])
    assert verify.exit_code == 1 and "gs:// paths need the gcsfs package: pip install 'saliency-pipeline[gcs]'" \
        in verify.output, verify.output
    sentence = "Error: s3:// paths need the s3fs package: pip install 'saliency-pipeline[s3]' (or pip install s3fs)\n"
    for args in (["eval", "--checkpoint", "s3://bucket/run", "--labels", str(tmp_path)],
                 ["profile", "--student", "fastsal_a", "--out", "s3://bucket/profile.json"],
                 ["export", "--student", "fastsal_a", "--weights", "random", "--out", "s3://bucket/a.onnx"],
                 ["predict", "--student", "fastsal_a", "--weights", "imagenet", "--images", str(tmp_path), "--out",
                  "s3://bucket/maps"],
                 [*TRAIN, "--labels", str(tmp_path), "--run", str(tmp_path / "run"), "--init", "s3://bucket/run"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and r.output == sentence, (args, r.output)


def test_object_storage_without_credentials_is_one_sentence_naming_the_variables(tmp_path):
    """botocore's NoCredentialsError (raised where the command first reads the bucket) is one line saying where
    credentials come from, not 100 lines of traceback."""
    import os
    import subprocess

    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true")  # no ~/.aws, no instance metadata
    r = subprocess.run([sys.executable, "-m", "pipeline", *TRAIN, "--labels", "s3://bucket/labels", "--run",
                        str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.splitlines() == [
        "Error: object storage refused the request (NoCredentialsError: Unable to locate credentials); its "
        "credentials and endpoint come from the usual variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
        "AWS_ENDPOINT_URL; GOOGLE_APPLICATION_CREDENTIALS) or the provider's config files"], r.stderr


def test_a_run_folders_pointer_goes_up_last_and_never_names_a_missing_checkpoint(tmp_path, monkeypatch):
    """An upload that fails half-way (the connection drops before latest.json) leaves the remote run folder as
    it was plus whole new files: its latest.json still names a checkpoint that is there, so a resume works."""
    from pipeline.common import storage
    from pipeline.train.loop import run_mirror

    url = f"memory://runs/{tmp_path.name}"
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "epoch-0000.pt").write_bytes(b"epoch 0")
    (ckpt / "latest.json").write_text('{"checkpoint": "epoch-0000.pt", "epoch": 0}')
    (tmp_path / "metrics.csv").write_text("epoch\n0\n")
    mirror = run_mirror(url, tmp_path)
    uploads = []
    real = storage.RemotePath.upload
    monkeypatch.setattr(storage.RemotePath, "upload",
                        lambda self, local: (uploads.append(self.name), real(self, local)))
    assert mirror.push() == 3 and uploads[-1] == "latest.json"

    (ckpt / "epoch-0001.pt").write_bytes(b"epoch 1")
    (ckpt / "epoch-0002.pt").write_bytes(b"epoch 2")
    (ckpt / "epoch-0000.pt").unlink()  # the run keeps the two newest
    (ckpt / "latest.json").write_text('{"checkpoint": "epoch-0002.pt", "epoch": 2}')

    def drop(self, local):
        if self.name == "latest.json":
            raise ConnectionError("the connection dropped")
        real(self, local)

    monkeypatch.setattr(storage.RemotePath, "upload", drop)
    with pytest.raises(ConnectionError):
        mirror.push()
    remote = storage.as_path(url)
    named = json.loads((remote / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert named == "epoch-0000.pt" and (remote / "checkpoints" / named).read_bytes() == b"epoch 0"

    monkeypatch.setattr(storage.RemotePath, "upload", real)
    assert mirror.push() == 1  # only the pointer was left to upload; then the old checkpoint goes
    assert sorted(p.relative_to(remote) for p in remote.files()) == [
        "checkpoints/epoch-0001.pt", "checkpoints/epoch-0002.pt", "checkpoints/latest.json", "metrics.csv"]

    deleted, unlink = [], storage.RemotePath.unlink  # --restart: the pointer goes first, then what it names
    monkeypatch.setattr(storage.RemotePath, "unlink", lambda self, **k: (deleted.append(self.name), unlink(self, **k)))
    mirror.remove(["checkpoints/*"])
    assert deleted == ["latest.json", "epoch-0001.pt", "epoch-0002.pt"] and not list(ckpt.iterdir())


def test_a_restarted_run_deletes_its_pointer_before_its_checkpoints(tmp_path, monkeypatch):
    """A reader between two deletions (a kill, or `eval --checkpoint` of the run) met a latest.json naming a
    deleted checkpoint: it is deleted first, locally as on object storage (above)."""
    from pipeline.train.loop import RESTART_FILES

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for name in ("epoch-0001.pt", "epoch-0002.pt", "latest.json"):
        (ckpt / name).write_text(name)
    deleted, unlink, glob = [], Path.unlink, Path.glob
    monkeypatch.setattr(Path, "unlink", lambda self, **k: (deleted.append(self.name), unlink(self, **k)))
    monkeypatch.setattr(Path, "glob", lambda self, p: iter(sorted(glob(self, p))))  # (a folder may list so)
    from pipeline.train import loop

    class Run:  # the little of a Trainer that the restart reads
        run, ckpt_dir, rank, world = tmp_path, ckpt, 0, 1

        def resume(self):
            raise SystemExit  # (the run stops there: only its deletions are looked at)

    with pytest.raises(SystemExit):
        loop._train(Run(), None, restart=True, progress=False)
    assert "checkpoints/*" in RESTART_FILES and deleted[0] == "latest.json" and not list(ckpt.iterdir())


@pytest.mark.parametrize("url, said", [
    ("s3://labels/x?versionId=3", "s3://labels/x?…: a '?' in an object-storage URL may be read as the start of a query"),
    ("s3://AKIA:topsecret@labels/x", "a s3:// URL with credentials before its bucket (user:secret@bucket): they "
                                     "are not read from a URL")])
def test_an_object_storage_url_no_store_reads_as_given_is_refused_before_any_work(url, said, s3, tmp_path):
    """A '?' made s3fs cut every key there: each tar, marker and labels.json was written over the one object
    `labels/x`, and the run ended as if it had labelled. Credentials before the bucket are never used; the
    refusal does not repeat them."""
    before = s3.find("labels")
    for args in ([*LABEL, "--out", url], [*TRAIN, "--labels", str(tmp_path), "--run", url]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and said in r.output, (args, r.output)
        assert "topsecret" not in r.output
    s3.invalidate_cache()
    assert s3.find("labels") == before


def test_the_stores_own_refusal_of_a_parameter_says_which(s3):
    """botocore's ParamValidationError reads "Parameter validation failed:" on its first line and why on the next:
    the one line said the first alone."""
    import botocore.exceptions

    from pipeline.common.errors import storage_error

    e = botocore.exceptions.ParamValidationError(report='Invalid bucket name "Bad_Bucket!": Bucket name must match')
    assert 'refused the request (ParamValidationError: Parameter validation failed: Invalid bucket name "Bad_Bucket!"' \
        in storage_error(e)


def test_a_marker_rewritten_after_a_listing_is_read_as_it_is_now(s3):
    """s3fs answered an open from the listing it had cached (the old ETag) and raised FileExpired: a traceback
    where another run had rewritten the marker."""
    from pipeline.common.storage import as_path
    from pipeline.label.shards import read_marker

    folder = as_path("s3://labels/rewritten")
    s3.pipe("labels/rewritten/shard-000000.json", b"{}")
    assert [p.name for p in folder.glob("shard-*.json")] == ["shard-000000.json"]  # (listed: cached)
    other = type(s3)(skip_instance_cache=True)  # another writer
    other.pipe("labels/rewritten/shard-000000.json", b'{"a": "longer than before"}')
    assert json.loads((folder / "shard-000000.json").read_text()) == {"a": "longer than before"}
    assert read_marker(folder, "shard-000000") is None  # (not a whole marker: read, not raised)


def test_a_manifest_with_its_workdir_on_object_storage_runs_resumes_and_checks_its_outputs_there(
        s3, labelled, tmp_path, monkeypatch):
    """`workdir: s3://…`: every step's output goes there (labels whose shards are the local run's, a run folder,
    metrics), and the runner's state too, so a second `pipeline run` (from any machine) finds everything done; an output
    that went missing there is noticed and only its step runs again. A URL where a command reads only local
    paths is one line naming what takes URLs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the machine-local lock of a URL workdir
    manifest = tmp_path / "tiny.yaml"
    manifest.write_text(f"""\
workdir: s3://labels/runs/tiny
steps:
  labels:
    run: label
    with: {{source: coco, teacher: classic, coco_root: {SAMPLES}, split: val2017, shard_size: 4, io_threads: 2,
           executor: local, image_size: 64x96}}
  train:
    run: train
    with: {{labels: "${{steps.labels.out}}", epochs: 1, steps_per_epoch: 1, batch_size: 2, backbone_weights: none,
           workers: 0, shuffle_buffer: 4}}
  score:
    run: eval
    with: {{checkpoint: "${{steps.train.out}}", labels: "${{steps.labels.out}}", val_shards: 1}}
""")
    first = CliRunner().invoke(cli, ["run", str(manifest)])
    assert first.exit_code == 0, first.output
    assert "[labels] done" in first.output and "[train] done" in first.output
    s3.invalidate_cache()
    state = json.loads(s3.cat_file("labels/runs/tiny/.pipeline/state.json"))
    assert {n: r["status"] for n, r in state["steps"].items()} == {"labels": "done", "train": "done",
                                                                    "score": "done"}
    assert json.loads(s3.cat_file("labels/runs/tiny/score/metrics.json"))["images"] == 4  # the held-out shard
    assert "scores (every eval step" in first.output
    assert state["steps"]["labels"]["output_digest"].startswith("labels:")
    for tar in sorted(labelled.glob("shard-*.tar")):  # the same shards as a local run's
        assert sha(s3.cat_file(f"labels/runs/tiny/labels/classic/val2017/{tar.name}")) == sha(tar.read_bytes())
    assert json.loads(s3.cat_file("labels/runs/tiny/train/checkpoints/latest.json"))["epoch"] == 0

    again = CliRunner().invoke(cli, ["run", str(manifest)])
    assert again.exit_code == 0 and "$ pipeline" not in again.output, again.output  # nothing ran
    status = CliRunner().invoke(cli, ["status", str(manifest)])
    assert status.exit_code == 0 and status.output.count("up to date") == 3, status.output

    s3.rm_file("labels/runs/tiny/train/checkpoints/latest.json")  # the run folder lost its pointer
    s3.invalidate_cache()
    redo = CliRunner().invoke(cli, ["run", str(manifest)])
    assert redo.exit_code == 0, redo.output
    assert "[train] $ pipeline train" in redo.output and "[labels] $" not in redo.output, redo.output
    assert "[score] up to date: its upstream output is unchanged" in redo.output  # the same checkpoint again

    manifest.write_text(manifest.read_text().replace("coco_root: " + str(SAMPLES), "coco_root: s3://labels/coco"))
    refused = CliRunner().invoke(cli, ["run", str(manifest), "--dry-run"])
    assert refused.exit_code == 2 and refused.output.count("Error") == 1, refused.output
    assert ("step 'labels': s3://labels/coco is a URL: `pipeline label` reads --coco-root from a local or "
            "shared-filesystem path only (URLs are taken by --out)") in refused.output


def test_the_bundled_manifests_plan_with_their_workdir_on_object_storage(s3, monkeypatch, tmp_path):
    """CLI.md says full.yaml runs whole with `--workdir s3://…`: each of its steps' options that the workdir turns
    into URLs takes one (its SACT profile step's --images, a label folder, did not)."""
    from tests.conftest import chdir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # (the machine-local lock of a URL workdir)
    root = Path(__file__).resolve().parents[1]
    for name in ("demo", "full"):
        with chdir(root):  # (their paths are relative to the repository's root)
            r = CliRunner().invoke(cli, ["run", f"manifests/{name}.yaml", "--workdir", f"s3://labels/runs/{name}",
                                         "--dry-run"])
        assert r.exit_code == 0 and "Error" not in r.output, r.output
        assert f"--images=s3://labels/runs/{name}/label_val" in r.output  # profile_sact's, on the store


@pytest.fixture(scope="module")
def s3_run(s3, labelled, tmp_path_factory) -> tuple[str, Path]:
    """A one-step run trained into ``s3://labels/runs/shared`` (from the local labels), and its local copy."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_torch_thread (below) does
    try:
        r = CliRunner().invoke(cli, [*TRAIN, "--labels", str(labelled), "--run", "s3://labels/runs/shared"])
    finally:
        torch.set_num_threads(n)
    assert r.exit_code == 0, r.output
    local = tmp_path_factory.mktemp("run")
    for obj in s3.find("labels/runs/shared"):
        target = local / obj.split("labels/runs/shared/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.get_file(obj, str(target))
    return "s3://labels/runs/shared", local


@pytest.fixture
def one_torch_thread():
    """Tiny inputs: one intra-op thread is as fast, and spares a busy 2-core machine OpenMP's spinning."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ok(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def test_eval_and_profile_read_a_checkpoint_url_and_write_their_json_there(s3, s3_run, labelled, tmp_path,
                                                                           one_torch_thread):
    """--checkpoint s3://run (its latest.json, then the checkpoint it names) or s3://…/epoch-0000.pt and --out
    s3://…: the same metrics as from and into local files."""
    url, local = s3_run
    ckpt = f"{url}/checkpoints/epoch-0000.pt"
    score = ["eval", "--labels", labelled, "--val-shards", "0", "--device", "cpu", "--no-progress"]
    ok(*score, "--checkpoint", local, "--out", tmp_path / "metrics.json")
    assert "metrics: s3://labels/out/metrics.json" in ok(*score, "--checkpoint", url, "--out",
                                                          "s3://labels/out/metrics.json")
    ok(*score, "--checkpoint", ckpt, "--out", "s3://labels/out/metrics-file.json")

    def same(doc: dict) -> dict:
        return {k: v for k, v in doc.items() if k not in ("model", "seconds")}

    here = json.loads((tmp_path / "metrics.json").read_text())
    assert here["model"] == f"fastsal_a@{local}/checkpoints/epoch-0000.pt" and len(here["per_image"]) == 12
    for name in ("metrics.json", "metrics-file.json"):
        there = json.loads(s3.cat_file(f"labels/out/{name}"))
        assert there["model"] == f"fastsal_a@{ckpt}" and same(there) == same(here)

    assert "profile: s3://labels/out/profile.json" in ok("profile", "--checkpoint", url, "--device", "cpu",
                                                         "--iters", "1", "--out", "s3://labels/out/profile.json")
    assert json.loads(s3.cat_file("labels/out/profile.json"))["model"] == f"fastsal_a@{ckpt}"

    for f in sorted(labelled.iterdir()):  # --images: a label folder's URL, as a manifest's workdir on S3 gives it
        s3.put_file(str(f), f"labels/profiled/{f.name}")
    measure = ["profile", "--checkpoint", local, "--device", "cpu", "--iters", "1", "--max-images", "5", "--out"]
    ok(*measure, tmp_path / "here.json", "--images", labelled)
    ok(*measure, tmp_path / "there.json", "--images", "s3://labels/profiled")
    here, there = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("here", "there"))
    assert here["inputs"] == f"5 images of {labelled}" and there["inputs"] == "5 images of s3://labels/profiled"
    assert [m["gflops"] for m in here["modes"]] == [m["gflops"] for m in there["modes"]]
    s3.pipe_file("labels/photos/a.jpg", (labelled / "preview.png").read_bytes())
    r = CliRunner().invoke(cli, [*measure[:-1], "--images", "s3://labels/photos"])
    assert r.exit_code == 1 and r.output == ("Error: --images s3://labels/photos: no labels.json there; a URL is read "
                                             "as a label folder (a folder of image files must be local)\n"), r.output


def test_predict_from_a_checkpoint_url_uploads_the_local_maps_and_predictions_json_last(s3, s3_run, tmp_path,
                                                                                       monkeypatch, one_torch_thread):
    from pipeline.common import storage

    url, local = s3_run
    uploads = []
    real = storage.RemotePath.upload
    monkeypatch.setattr(storage.RemotePath, "upload", lambda self, f: (uploads.append(self.name), real(self, f)))
    predict = ["predict", "--images", SAMPLES / "val2017", "--device", "cpu", "--no-progress"]
    ok(*predict, "--checkpoint", local, "--out", tmp_path / "maps")
    ok(*predict, "--checkpoint", url, "--out", "s3://labels/out/maps")
    maps = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.png"))
    assert len(maps) == 12 and len(uploads) == 13 and uploads[-1] == "predictions.json"
    s3.invalidate_cache()
    assert sorted(p.split("labels/out/maps/", 1)[1] for p in s3.find("labels/out/maps")) == [*maps,
                                                                                          "predictions.json"]
    for rel in maps:
        assert s3.cat_file(f"labels/out/maps/{rel}") == (tmp_path / "maps" / rel).read_bytes(), rel
    there = json.loads(s3.cat_file("labels/out/maps/predictions.json"))
    assert there["maps"] == 12 and there["failures"] == [] and there["model"] == f"fastsal_a@{url}/checkpoints/epoch-0000.pt"

    import h5py

    ok(*predict, "--checkpoint", url, "--out", "s3://labels/out/maps.h5", "--format", "hdf5")
    ok(*predict, "--checkpoint", local, "--out", tmp_path / "maps.h5", "--format", "hdf5")
    with h5py.File(tmp_path / "maps.h5") as a, h5py.File(io.BytesIO(s3.cat_file("labels/out/maps.h5"))) as b:
        assert len(a) and sorted(a) == sorted(b) and all((a[k][()] == b[k][()]).all() for k in a)


def test_export_from_a_checkpoint_url_into_a_url_is_the_local_graph(s3, s3_run, tmp_path, one_torch_thread):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    url, local = s3_run
    ok("export", "--checkpoint", local, "--out", tmp_path / "model.onnx")
    assert "s3://labels/out/model.onnx" in ok("export", "--checkpoint", url, "--out", "s3://labels/out/model.onnx")
    here, there = (onnx.load_from_string(data) for data in ((tmp_path / "model.onnx").read_bytes(),
                                                            s3.cat_file("labels/out/model.onnx")))
    assert there.graph == here.graph  # the metadata differ only in the checkpoint named


def test_fixations_out_url_is_the_local_hdf5_and_eval_reads_it_there(s3, s3_run, tmp_path, one_torch_thread):
    from tests.test_train import write_mit1003

    root = write_mit1003(tmp_path / "MIT1003", sorted((SAMPLES / "val2017").glob("*.jpg"))[:2])
    ok("fixations", "mit1003", "--root", root, "--out", tmp_path / "f.h5")
    assert "s3://labels/out/f.h5: 2 images" in ok("fixations", "mit1003", "--root", root, "--out",
                                                  "s3://labels/out/f.h5")
    assert s3.cat_file("labels/out/f.h5") == (tmp_path / "f.h5").read_bytes()
    scores = [ok("eval", "--checkpoint", s3_run[1], "--fixations", f, "--no-progress")
              for f in (tmp_path / "f.h5", "s3://labels/out/f.h5")]
    here, there = ([line for line in text.splitlines() if not line.lstrip().startswith(("wall", "images/s"))]
                   for text in scores)
    assert there == here and any(line.lstrip().startswith("auc_judd") for line in here)


def test_a_missing_checkpoint_url_is_a_usage_error_and_writes_nothing(s3, labelled):
    cases = [["eval", "--labels", labelled, "--out", "s3://labels/none/m.json"],
             ["predict", "--images", SAMPLES / "val2017", "--out", "s3://labels/none/maps"],
             ["profile", "--out", "s3://labels/none/p.json"],
             ["export", "--out", "s3://labels/none/m.onnx"]]
    for args in cases:
        r = CliRunner().invoke(cli, [*map(str, args), "--checkpoint", "s3://labels/missing"])
        assert r.exit_code == 2 and r.output.splitlines()[-1] == \
            "Error: Invalid value for '--checkpoint': s3://labels/missing does not exist", r.output
    r = CliRunner().invoke(cli, [*TRAIN, "--labels", str(labelled), "--run", "s3://labels/none/run", "--init",
                                 "s3://labels/missing/epoch-0000.pt"])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == \
        "Error: Invalid value for '--init': s3://labels/missing/epoch-0000.pt does not exist", r.output
    s3.invalidate_cache()
    assert not s3.find("labels/none")


def test_train_init_from_a_run_url_starts_from_its_weights(s3, s3_run, labelled, tmp_path, one_torch_thread):
    """--init s3://run: the same start as --init with its local copy (lr 0: the weights stay the checkpoint's)."""
    url, local = s3_run
    runs = {}
    for name, init in (("here", local), ("there", url)):
        r = CliRunner().invoke(cli, [*TRAIN, "--labels", str(labelled), "--run", str(tmp_path / name), "--init",
                                     str(init), "--lr", "0"])
        assert r.exit_code == 0, r.output
        runs[name] = final_weights(lambda rel: (tmp_path / name / rel).read_bytes())
    assert f"init from {url}/checkpoints/epoch-0000.pt (a fastsal_a checkpoint): all " in r.stderr
    start = final_weights(lambda rel: (local / rel).read_bytes())
    a, b = runs["here"], runs["there"]
    assert a.keys() == b.keys() == start.keys() and all(a[k].equal(b[k]) for k in a)
    assert all(b[k].equal(start[k]) for k in b if "running_" not in k and "num_batches" not in k)


def test_file_urls_name_absolute_local_paths(s3_run, labelled, tmp_path, one_torch_thread):
    """file:///abs/path is the local path /abs/path: a checkpoint read there, outputs written into new folders."""
    _, local = s3_run
    url = f"file://{local}"
    ok("eval", "--labels", labelled, "--val-shards", "0", "--device", "cpu", "--no-progress", "--checkpoint", url,
       "--out", f"file://{tmp_path}/new/metrics.json")
    doc = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert doc["model"] == f"fastsal_a@{local}/checkpoints/epoch-0000.pt" and len(doc["per_image"]) == 12
    ok("predict", "--images", SAMPLES / "val2017", "--device", "cpu", "--no-progress", "--checkpoint", url,
       "--out", f"file://{tmp_path}/maps")
    assert len(list((tmp_path / "maps").rglob("*.png"))) == 12 and (tmp_path / "maps" / "predictions.json").is_file()
    r = CliRunner().invoke(cli, ["eval", "--labels", str(labelled), "--checkpoint", f"file://{tmp_path}/none"])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == \
        f"Error: Invalid value for '--checkpoint': {tmp_path}/none does not exist", r.output  # (the path it names)


def test_a_manifests_inputs_on_object_storage_are_checked_by_what_the_store_lists(s3, labelled, tmp_path,
                                                                                   monkeypatch):
    """`inputs: [s3://…]`: an object or a prefix, fingerprinted from its listing (sizes, ETags), nothing
    downloaded; new content of the same size re-runs the step, a missing one is "input missing", and a store
    that cannot be asked is one manifest line."""
    from pipeline.manifest.format import ManifestError, load_manifest
    from pipeline.manifest.plan import plan, record

    s3.pipe_file("labels/inputs/init/weights.pt", b"first")
    s3.put_file(str(labelled / "labels.json"), "labels/inputs/labels/labels.json")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""\
workdir: {tmp_path / 'w'}
steps:
  labels:
    run: label
    with: {{source: coco, teacher: classic, coco_root: {SAMPLES}}}
    inputs: ["s3://labels/inputs/init/weights.pt", "s3://labels/inputs/labels"]
""")
    m = load_manifest(manifest, group=cli)
    inputs = m.steps["labels"].inputs
    assert list(inputs) == ["s3://labels/inputs/init/weights.pt", "s3://labels/inputs/labels"]
    assert all(d.startswith("objects:") for d in inputs.values())
    done = {"steps": {"labels": record(m, "labels", status="done")}}
    assert plan(load_manifest(manifest, group=cli), done, {}) == [("labels", "skip", "up to date")]

    s3.pipe_file("labels/inputs/init/weights.pt", b"other")  # same size, new content: a new ETag
    assert plan(load_manifest(manifest, group=cli), done, {}) == [
        ("labels", "run", "input changed: s3://labels/inputs/init/weights.pt")]
    s3.pipe_file("labels/inputs/labels/extra.json", b"{}")  # an object more under the prefix
    s3.pipe_file("labels/inputs/init/weights.pt", b"first")
    assert plan(load_manifest(manifest, group=cli), done, {}) == [
        ("labels", "run", "input changed: s3://labels/inputs/labels")]
    s3.rm("labels/inputs/labels", recursive=True)
    assert plan(load_manifest(manifest, group=cli), done, {})[0][2] == "input missing: s3://labels/inputs/labels"

    manifest.write_text(manifest.read_text().replace("s3://labels/inputs/labels", "s3://no-such-bucket/x"))
    assert plan(load_manifest(manifest, group=cli), done, {})[0][2] == "input missing: s3://no-such-bucket/x"

    import importlib

    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if s3fs were not installed
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest, group=cli)
    assert str(e.value) == (f"{manifest}:6: step 'labels': input s3://labels/inputs/init/weights.pt: s3:// paths "
                            "need the s3fs package: pip install 'saliency-pipeline[s3]' (or pip install s3fs)")


def test_a_file_url_upload_of_a_name_near_the_limit_fits(tmp_path):
    """Its temp name was the name plus 14 bytes: a map name of 249 bytes could not be written there."""
    from pipeline.common.storage import as_path

    (tmp_path / "src").write_bytes(b"map")
    name = "z" * 245 + ".png"
    as_path(f"file://{tmp_path}/out/{name}").upload(tmp_path / "src")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]


def test_a_store_that_refuses_the_labels_index_is_said_as_such_not_as_an_unfinished_folder(monkeypatch):
    """Credentials the store refuses made `train` and `eval` say "not a finished label folder … re-run `pipeline
    label`": the folder may be whole. The store's refusal is named instead."""
    import botocore.exceptions

    from pipeline.common.storage import RemotePath
    from pipeline.train.data import DataError, open_label_set

    def read_text(self, *a, **k):
        try:
            raise botocore.exceptions.ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "bad key"}},
                                                  "GetObject")
        except botocore.exceptions.ClientError:
            raise PermissionError("Access Denied")  # as s3fs raises it

    monkeypatch.setattr(RemotePath, "read_text", read_text)
    monkeypatch.setattr(RemotePath, "is_file", lambda self: False)
    with pytest.raises(DataError) as e:
        open_label_set("s3://bucket/labels/classic/val2017")
    assert str(e.value).startswith("cannot read s3://bucket/labels/classic/val2017/labels.json: object storage "
                                   "refused the request (ClientError")
    assert "re-run `pipeline label`" not in str(e.value)


def test_an_output_url_whose_bucket_does_not_exist_is_refused_before_any_work(s3, tmp_path, labelled):
    """A misspelt bucket: `train` lost its epoch with the staging folder, `eval` printed its scores then failed,
    `label` labelled every shard and then failed each."""
    why = ": its bucket s3://nobucket does not exist; create it, or check the name"
    for args in ([*LABEL, "--out", "s3://nobucket/labels"],
                 [*TRAIN, "--labels", str(labelled), "--run", "s3://nobucket/run"],
                 ["eval", "--teacher", "classic", "--labels", str(labelled), "--out", "s3://nobucket/m.json"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and r.output.count("\n") == 1 and why in r.output, (args, r.output)
        assert "images scored" not in r.output and "backbone" not in r.output


def test_a_start_over_on_object_storage_knows_what_it_wrote_by_the_stores_versions(s3, tmp_path):
    """An interrupted start-over (`train --restart`) with its run on S3 started over again at every `pipeline run`,
    however many epochs it had uploaded: object storage gave no time to compare. The pieces there when it began
    are recorded (as the store describes them: checksum and its own modification time), and one rewritten or
    added since means it made outputs of its own (a local run folder: files' mtimes, as before)."""
    import time

    from pipeline.common.storage import as_path
    from pipeline.manifest.steps import COMMANDS, made_since, pieces_now

    train = COMMANDS["train"]
    run = as_path("s3://labels/pieces/run")
    s3.pipe_file("labels/pieces/run/checkpoints/epoch-0000.pt", b"old settings")
    s3.pipe_file("labels/pieces/run/checkpoints/latest.json", b"{}")  # not a piece
    before = pieces_now(train, run)
    assert list(before) == ["epoch-0000.pt"]
    assert not made_since(train, run, time.time(), before)
    time.sleep(1.1)  # (the store's clock counts seconds)
    s3.pipe_file("labels/pieces/run/checkpoints/latest.json", b"{ }")
    assert not made_since(train, run, time.time(), before)
    s3.pipe_file("labels/pieces/run/checkpoints/epoch-0000.pt", b"old settings")  # the same bytes, written anew
    assert made_since(train, run, 0.0, before)
    s3.rm_file("labels/pieces/run/checkpoints/epoch-0000.pt")
    s3.pipe_file("labels/pieces/run/checkpoints/epoch-0001.pt", b"new")
    assert made_since(train, run, 0.0, before)
    assert not made_since(train, run, 0.0, None)  # nothing recorded: start over, as before
    local = tmp_path / "run"
    (local / "checkpoints").mkdir(parents=True)
    (local / "checkpoints" / "epoch-0000.pt").write_bytes(b"x")
    assert pieces_now(train, local) is None
    assert made_since(train, local, time.time() - 60, None) and not made_since(train, local, time.time() + 60, None)
    label = COMMANDS["label"]
    s3.pipe_file("labels/pieces/labels/shard-000000.json", b"{}")
    assert list(pieces_now(label, as_path("s3://labels/pieces/labels"))) == ["shard-000000.json"]


def test_a_bucket_check_that_cannot_reach_the_store_says_why_not_that_the_bucket_is_missing(s3, labelled,
                                                                                            monkeypatch):
    """s3fs's exists() answers False for any error: a dead endpoint read "its bucket does not exist"."""
    import s3fs

    from pipeline.common.storage import StorageError, check_bucket

    check_bucket("s3://labels/anything")  # there
    with pytest.raises(StorageError, match="its bucket s3://nobucket does not exist"):
        check_bucket("s3://nobucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        r = CliRunner().invoke(cli, ["eval", "--teacher", "classic", "--labels", str(labelled), "--out",
                                     "s3://labels/m.json"])
        assert r.exit_code == 1 and r.output.startswith("Error: object storage refused the request "
                                                        "(EndpointConnectionError"), r.output
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_file_url_output_folder_is_locked_as_its_path_is(tmp_path):
    """`--out file:///x` labelled into /x while another run held /x's lock (and kept a killed run's temp tars)."""
    import fcntl

    folder = tmp_path / "out" / "classic" / "val2017"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for out in (str(tmp_path / "out"), f"file://{tmp_path}/out"):
            r = CliRunner().invoke(cli, [*LABEL, "--split", "val2017", "--out", out])
            assert r.exit_code == 1 and f"another labelling run is writing to {folder}" in r.output, (out, r.output)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


def test_a_run_url_holding_checkpoints_is_known_to_resume_before_its_pull(s3):
    """A resumed run on object storage loaded --init (or refused a deleted one) for nothing: what resumes was
    known only once the run folder had been pulled."""
    from pipeline.train.checkpoints import resumes

    s3.pipe("labels/resumes/checkpoints/epoch-0001.pt", b"x")
    assert resumes("s3://labels/resumes") and not resumes("s3://labels/resumes", restart=True)
    assert not resumes("s3://labels/resumes-not")  # (a sibling prefix)


def test_a_file_url_is_read_one_way_everywhere(tmp_path):
    """`file:///abs/x` is /abs/x (also `file://localhost/abs/x`), `file://rel/x` is rel/x as fsspec reads it, on
    every option and in a run's recorded settings: a run whose labels were given as a file:// URL resumes when
    they are given as the path (their places compared), and an option that reads local paths only agrees."""
    from pipeline.cli.options import LocalPath, path_or_url
    from pipeline.common.storage import as_path, file_path, local_place
    from pipeline.train.loop import as_places

    assert [file_path(u) for u in ("file:///abs/x", "file://localhost/abs/x", "file://rel/x", "s3://b/x", "/abs")] \
        == ["/abs/x", "/abs/x", "rel/x", None, None]
    assert path_or_url(None, None, "file:///abs/x/") == "/abs/x" and local_place("file://rel/x") == Path("rel/x")
    assert LocalPath(exists=False).convert("file://rel/x", None, None) == "rel/x"
    assert as_path("file://rel/x").key == str(Path("rel/x").resolve())  # (the key of a file:// RemotePath)
    labels = tmp_path / "labels"
    assert as_places({"labels": [f"file://{labels}"], "gt_maps": f"file://{labels}"}) == \
        as_places({"labels": [str(labels)], "gt_maps": str(labels)})
