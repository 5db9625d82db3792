"""Weights, all at once: errors name every file a teacher needs, `pipeline weights fetch TEACHER` gets them
all, `pipeline teachers` / `weights list` tell intact from corrupt or unverified files, and `pipeline run
--dry-run` lists each step's missing weights with the command that gets them. Never touches the network."""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import teachers
from pipeline.cli.main import cli
from teachers import weights as W
from teachers.fetch import weights_status
from teachers.weights import WeightsError

RELEASE = "https://github.com/matthias-k/DeepGaze/releases/download/v1.0.0/"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """A private torch hub dir; the network is off (a download raises URLError, as offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return W.checkpoint_dir()


def pin(monkeypatch, name: str, payload: bytes | None) -> None:
    """Pin known weights ``name`` to the sha256 of ``payload`` (None: no digest pinned)."""
    digest = hashlib.sha256(payload).hexdigest() if payload is not None else None
    monkeypatch.setitem(W.KNOWN_WEIGHTS, name, dataclasses.replace(W.KNOWN_WEIGHTS[name], sha256=digest))


def fake_downloads(monkeypatch, payloads: dict[str, bytes]) -> list[str]:
    calls: list[str] = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        Path(dst).write_bytes(payloads[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_a_teacher_missing_two_files_names_both_with_urls_and_places(hub):
    with pytest.raises(WeightsError) as e:
        teachers.build_teacher("deepgaze")
    msg = str(e.value)
    assert "\n" not in msg
    for name in ("deepgaze2e.pth", "centerbias_mit1003.npy"):
        assert RELEASE + name in msg and str(hub / name) in msg
    assert "`pipeline weights fetch deepgaze`" in msg


def test_with_the_weights_cached_the_error_names_the_missing_centre_bias(hub, monkeypatch):
    hub.mkdir(parents=True)
    (hub / "deepgaze2e.pth").write_bytes(b"stand-in")
    pin(monkeypatch, "deepgaze2e", b"stand-in")
    with pytest.raises(WeightsError) as e:
        teachers.build_teacher("deepgaze2e")
    msg = str(e.value)
    assert "needs deepgaze2e.pth and centerbias_mit1003.npy; 1 of them cannot be had here" in msg
    assert RELEASE + "centerbias_mit1003.npy" in msg and str(hub / "centerbias_mit1003.npy") in msg
    assert RELEASE + "deepgaze2e.pth" not in msg  # that one is here


def test_weights_fetch_teacher_gets_everything_it_needs_once(hub, monkeypatch):
    payloads = {"deepgaze2e.pth": b"weights", "centerbias_mit1003.npy": b"centre bias"}
    pin(monkeypatch, "deepgaze2e", payloads["deepgaze2e.pth"])
    pin(monkeypatch, "centerbias_mit1003", payloads["centerbias_mit1003.npy"])
    calls = fake_downloads(monkeypatch, payloads)
    r = invoke("weights", "fetch", "deepgaze")
    assert r.exit_code == 0, r.output
    assert calls == [RELEASE + "deepgaze2e.pth", RELEASE + "centerbias_mit1003.npy"]
    assert f"{hub / 'deepgaze2e.pth'}  sha256 {hashlib.sha256(b'weights').hexdigest()}  (verified)" in r.output
    assert (hub / "centerbias_mit1003.npy").read_bytes() == b"centre bias"
    r = invoke("weights", "fetch", "deepgaze")  # cached and intact: nothing downloaded again
    assert r.exit_code == 0 and len(calls) == 2
    assert weights_status("deepgaze") == "cached, sha256 verified"


def test_weights_fetch_offline_names_every_file_in_one_error_line(hub):
    r = invoke("weights", "fetch", "deepgaze2e")
    assert r.exit_code == 1
    line = r.output.strip()
    assert line.startswith("Error:") and "\n" not in line
    for name in ("deepgaze2e.pth", "centerbias_mit1003.npy"):
        assert RELEASE + name in line and str(hub / name) in line


def test_weights_fetch_of_an_unknown_name_lists_what_it_can_fetch(hub):
    r = invoke("weights", "fetch", "deepgaze3")
    assert r.exit_code == 1 and r.output.startswith("Error: nothing to fetch by the name 'deepgaze3': give a "
                                                    "teacher (classic, deepgaze, "), r.output
    assert "a known name (centerbias_mit1003, deepgaze2e, " in r.output and r.output.endswith("or an http(s) URL\n")


def test_weights_fetch_salgan_gets_the_release_and_says_how_to_convert_it(hub, monkeypatch):
    calls = fake_downloads(monkeypatch, {"gen_modelWeights0090.npz": b"lasagne arrays"})
    r = invoke("weights", "fetch", "salgan")
    assert r.exit_code == 0, r.output
    assert calls == [W.KNOWN_WEIGHTS["salgan_lasagne"].url]
    npz = hub / "gen_modelWeights0090.npz"
    assert f"{npz}  sha256" in r.output and "(unverified: no sha256 pinned)" in r.output
    assert f"pipeline weights convert {npz} data/weights/salgan_generator.pt" in r.output
    assert invoke("weights", "fetch", "classic").output.strip() == "teacher classic needs no weights"


def test_a_corrupt_cached_file_is_called_corrupt_not_cached(hub, monkeypatch):
    hub.mkdir(parents=True)
    (hub / "deepgaze2e.pth").write_bytes(b"truncated download")
    (hub / "centerbias_mit1003.npy").write_bytes(b"centre bias")
    pin(monkeypatch, "deepgaze2e", b"the real file")
    pin(monkeypatch, "centerbias_mit1003", b"centre bias")
    status = weights_status("deepgaze")
    assert status.startswith("CORRUPT: deepgaze2e.pth sha256 ") and "cached," not in status
    assert f"delete {hub / 'deepgaze2e.pth'}" in status and "pipeline weights fetch deepgaze" in status
    listed = {line.split("\t")[0]: line for line in invoke("weights", "list").output.splitlines()}
    assert "CORRUPT" in listed["deepgaze2e"] and "(cached, sha256 verified)" in listed["centerbias_mit1003"]
    assert listed["fastsal_coco_a"].endswith("(not cached)")

    pin(monkeypatch, "deepgaze2e", None)  # no digest pinned: here, but nothing to check it against
    assert weights_status("deepgaze") == "cached, unverified (no sha256 pinned for deepgaze2e.pth)"
    pin(monkeypatch, "deepgaze2e", b"truncated download")
    assert weights_status("deepgaze") == "cached, sha256 verified"
    assert weights_status("classic") == "none needed"
    assert weights_status("salgan").startswith("needs --weights PATH")


def test_a_download_cut_short_is_deleted_and_fetched_again_rather_than_kept(hub, monkeypatch):
    """HTTP reports a short read as no error, and a file without a pinned sha256 has nothing to check it
    against: a zip archive (a torch checkpoint, an npz) without its end is a download cut short. It is
    deleted with one line saying so, and a cut-short file already in the cache is fetched again."""
    import io

    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buffer)
    whole = buffer.getvalue()
    url = "https://example.org/v2/model.pt"
    fake_downloads(monkeypatch, {"model.pt": whole[: len(whole) // 2]})
    with pytest.raises(WeightsError, match=r"the download of model.pt from https://example.org/v2/model.pt was "
                                           r"cut short \([\d,]+ bytes, a zip archive without its end\); it was "
                                           r"deleted: run the command again"):
        W.resolve(url, progress=False)
    assert not (hub / "model.pt").exists()
    (hub / "model.pt").write_bytes(whole[:100])  # left by an older version of this code
    again = fake_downloads(monkeypatch, {"model.pt": whole})
    assert W.resolve(url, progress=False).read_bytes() == whole and again == [url]
    assert W.resolve(url, progress=False).read_bytes() == whole and again == [url]  # whole: kept


MANIFEST = """\
    workdir: {workdir}
    steps:
      label_dg:
        run: label
        with: {{source: coco, teacher: deepgaze}}
      label_sg:
        run: label
        with: {{source: coco, teacher: salgan, weights: data/weights/salgan_generator.pt}}
      train:
        run: train
        with: {{labels: "${{steps.label_dg.out}}", student: fastsal_a}}
      label_classic:
        run: label
        with: {{source: coco, teacher: classic}}
      ponder:
        run: eval
        with: {{student: sact, weights: imagenet, labels: "${{steps.label_dg.out}}"}}
    """


def test_dry_run_lists_each_steps_missing_weights_and_how_to_get_them(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("m.yaml").write_text(textwrap.dedent(MANIFEST.format(workdir=tmp_path / "w")))
    r = invoke("run", "m.yaml", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = {line.split(":")[0].strip(): line for line in r.output.split("weights missing")[1].splitlines()[1:]}
    assert "deepgaze2e.pth (not cached), centerbias_mit1003.npy (not cached) -> pipeline weights fetch deepgaze" \
        in lines["label_dg"]
    npz = hub / "gen_modelWeights0090.npz"
    assert lines["label_sg"].endswith("data/weights/salgan_generator.pt (not found) -> pipeline weights fetch salgan "
                                      f"&& pipeline weights convert {npz} data/weights/salgan_generator.pt")
    assert "mobilenet_v2-b0353104.pth (not cached) -> pipeline weights fetch https://" in lines["train"]
    assert "label_classic" not in lines  # the classic teacher loads nothing
    # a student's `weights: imagenet` is its ImageNet backbone alone, not a file named "imagenet"
    assert lines["ponder"].endswith("resnet50-0676ba61.pth (not cached) -> pipeline weights fetch "
                                    "https://download.pytorch.org/models/resnet50-0676ba61.pth")
    for name in ("deepgaze2e.pth", "centerbias_mit1003.npy"):
        assert f"  {name}: {RELEASE}{name} -> {hub / name}" in r.output
    assert not (tmp_path / "w").exists() and not hub.exists()  # a dry run writes and downloads nothing

    hub.mkdir(parents=True)
    for name in ("deepgaze2e.pth", "centerbias_mit1003.npy", "mobilenet_v2-b0353104.pth"):
        (hub / name).write_bytes(name.encode())
    pin(monkeypatch, "deepgaze2e", b"deepgaze2e.pth")
    pin(monkeypatch, "centerbias_mit1003", b"not what is cached")
    Path("data/weights").mkdir(parents=True)
    Path("data/weights/salgan_generator.pt").write_bytes(b"converted")
    r = invoke("run", "m.yaml", "--dry-run")
    assert r.exit_code == 0, r.output
    tail = r.output.split("weights missing")[1]
    assert "label_dg: centerbias_mit1003.npy (CORRUPT: sha256 " in tail and "pipeline weights fetch deepgaze" in tail
    assert "label_sg" not in tail and "train:" not in tail
