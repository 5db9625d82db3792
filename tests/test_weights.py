"""Weights resolution (local path, URL, known name), digests and strict loading. Never touches the network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from teachers import weights as W
from teachers.weights import WeightsError, file_digest, load_numpy, load_state_dict, load_strict, resolve

URL = "https://example.invalid/models/tiny-net.pth"
_real_download = torch.hub.download_url_to_file  # (before any test replaces it)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def hub(tmp_path, monkeypatch) -> Path:
    """A private torch hub dir under tmp_path, and no network: any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)  # undo any earlier set_dir

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    ckpt = W.checkpoint_dir()
    assert tmp_path in ckpt.parents, ckpt  # never the user's real cache
    return ckpt


def _fake_download(payload: bytes, calls: list):
    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        Path(dst).write_bytes(payload)

    return download


# --- the table of known weights ---------------------------------------------------------------


def test_known_table():
    assert {"deepgaze2e", "centerbias_mit1003"} <= set(W.KNOWN_WEIGHTS)
    release = "https://github.com/matthias-k/DeepGaze/releases/download/v1.0.0/"
    assert W.KNOWN_WEIGHTS["deepgaze2e"].url == release + "deepgaze2e.pth"
    assert W.KNOWN_WEIGHTS["centerbias_mit1003"].url == release + "centerbias_mit1003.npy"
    for name, k in W.KNOWN_WEIGHTS.items():
        assert k.name == name and k.description and "\n" not in k.description
        assert k.url.rsplit("/", 1)[1] == k.filename
        assert k.sha256 is None or (len(k.sha256) == 64 and int(k.sha256, 16) >= 0 and k.sha256 == k.sha256.lower())
    with pytest.raises(dataclasses.FrozenInstanceError):
        W.KNOWN_WEIGHTS["deepgaze2e"].sha256 = None  # type: ignore[misc]


def test_file_digest(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    assert file_digest(p) == _sha(b"abc" * 1000)


# --- local paths ------------------------------------------------------------------------------


def test_local_path(tmp_path):
    p = tmp_path / "w.pth"
    p.write_bytes(b"x")
    assert resolve(str(p)) == p
    assert resolve(p) == p


def test_local_path_missing(tmp_path):
    p = tmp_path / "nope" / "w.pth"
    with pytest.raises(WeightsError, match="not found") as e:
        resolve(str(p))
    assert str(p) in str(e.value)


def test_local_path_directory(tmp_path):
    with pytest.raises(WeightsError, match="not a file"):
        resolve(str(tmp_path))


@pytest.mark.parametrize("spec", ["", None, 3])
def test_invalid_spec(spec):
    with pytest.raises(WeightsError):
        resolve(spec)  # type: ignore[arg-type]


# --- known names ------------------------------------------------------------------------------


def test_known_name_cached_resolves_offline(hub, monkeypatch):
    payload = b"pretend deepgaze weights"
    entry = dataclasses.replace(W.KNOWN_WEIGHTS["deepgaze2e"], sha256=_sha(payload))
    monkeypatch.setitem(W.KNOWN_WEIGHTS, "deepgaze2e", entry)
    hub.mkdir(parents=True)
    (hub / "deepgaze2e.pth").write_bytes(payload)
    assert resolve("deepgaze2e") == hub / "deepgaze2e.pth"  # the autouse fixture fails any download


def test_known_name_unpinned_is_not_checked(hub, monkeypatch):
    entry = dataclasses.replace(W.KNOWN_WEIGHTS["centerbias_mit1003"], sha256=None)
    monkeypatch.setitem(W.KNOWN_WEIGHTS, "centerbias_mit1003", entry)
    hub.mkdir(parents=True)
    (hub / "centerbias_mit1003.npy").write_bytes(b"anything")
    assert resolve("centerbias_mit1003") == hub / "centerbias_mit1003.npy"


def test_known_name_cached_digest_mismatch(hub, monkeypatch):
    payload = b"not the real file"
    entry = dataclasses.replace(W.KNOWN_WEIGHTS["deepgaze2e"], sha256="ab" * 32)
    monkeypatch.setitem(W.KNOWN_WEIGHTS, "deepgaze2e", entry)
    hub.mkdir(parents=True)
    cached = hub / "deepgaze2e.pth"
    cached.write_bytes(payload)
    with pytest.raises(WeightsError) as e:
        resolve("deepgaze2e")
    msg = str(e.value)
    assert "ab" * 32 in msg and _sha(payload) in msg and "delete" in msg and str(cached) in msg
    assert cached.read_bytes() == payload  # left for the user to inspect / delete, never overwritten


def test_known_name_download_verified(hub, monkeypatch):
    payload = b"good bytes"
    entry = dataclasses.replace(W.KNOWN_WEIGHTS["deepgaze2e"], sha256=_sha(payload))
    monkeypatch.setitem(W.KNOWN_WEIGHTS, "deepgaze2e", entry)
    calls: list = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(payload, calls))
    path = resolve("deepgaze2e", progress=False)
    assert path == hub / "deepgaze2e.pth" and path.read_bytes() == payload
    assert calls == [entry.url]
    assert resolve("deepgaze2e") == path and len(calls) == 1  # now cached


def test_known_name_download_digest_mismatch(hub, monkeypatch):
    entry = dataclasses.replace(W.KNOWN_WEIGHTS["deepgaze2e"], sha256=_sha(b"expected"))
    monkeypatch.setitem(W.KNOWN_WEIGHTS, "deepgaze2e", entry)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(b"tampered", []))
    with pytest.raises(WeightsError) as e:
        resolve("deepgaze2e")
    assert _sha(b"expected") in str(e.value) and _sha(b"tampered") in str(e.value)
    assert not (hub / "deepgaze2e.pth").exists()  # the bad download was deleted


def test_known_name_offline(hub, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        resolve("centerbias_mit1003")
    msg = str(e.value)
    k = W.KNOWN_WEIGHTS["centerbias_mit1003"]
    assert "\n" not in msg and k.filename in msg and k.url in msg and str(hub / k.filename) in msg


# --- URLs -------------------------------------------------------------------------------------


def _url_dir(hub: Path, url: str) -> Path:
    return hub / "url" / hashlib.sha256(url.encode()).hexdigest()[:16]


def _checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    return buffer.getvalue()


def test_url_offline_clear_error(hub, monkeypatch):
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as e:
        resolve(URL)
    msg = str(e.value)
    assert calls == [URL]
    assert "\n" not in msg
    assert "tiny-net.pth" in msg and URL in msg and str(_url_dir(hub, URL) / "tiny-net.pth") in msg
    assert not (_url_dir(hub, URL) / "tiny-net.pth").exists()


def test_url_no_download(hub, monkeypatch):
    with pytest.raises(WeightsError) as e:
        resolve(URL, download=False)  # the autouse fixture would fail any download attempt
    assert str(_url_dir(hub, URL) / "tiny-net.pth") in str(e.value)


def test_url_cached_resolves_offline(hub):
    cached = _url_dir(hub, URL) / "tiny-net.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    assert resolve(URL) == cached
    assert W.cache_path(URL) == cached and W.cached_state(URL).path == cached


def test_url_download(hub, monkeypatch):
    calls: list = []
    payload = _checkpoint_bytes()
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(payload, calls))
    got = resolve(URL + "?raw=1")
    assert got.read_bytes() == payload and got == _url_dir(hub, URL + "?raw=1") / "tiny-net.pth"
    assert W.cache_path(URL + "?raw=1") == got and W.cached_state(URL + "?raw=1").state == "unverified"


def test_url_without_file_name():
    with pytest.raises(WeightsError, match="file name"):
        resolve("https://example.invalid/")


def test_urls_ending_in_one_file_name_are_cached_apart_and_apart_from_the_known_name(hub, monkeypatch):
    """`http://a/x.pth` and `http://b/x.pth` were one cache file (the first downloaded served both), every
    `…/uc?id=…` was `checkpoints/uc`, and a URL ending in `deepgaze2e.pth` took the known name's place (listed
    as it, cached and unverified, and loaded by the teacher)."""
    known = W.KNOWN_WEIGHTS["deepgaze2e"]
    urls = ["http://a.invalid/x.pth", "http://b.invalid/x.pth", "https://d.invalid/uc?id=1",
            "https://d.invalid/uc?id=2", f"https://mirror.invalid/{known.filename}"]
    payloads = {url: _checkpoint_bytes() + url.encode() for url in urls}
    calls: list = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        Path(dst).write_bytes(payloads[url])

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    paths = [resolve(url, progress=False) for url in urls]
    assert calls == urls and len(set(paths)) == len(urls)
    assert all(path.read_bytes() == payloads[url] for url, path in zip(urls, paths))
    assert [p.name for p in paths] == ["x.pth", "x.pth", "uc", "uc", known.filename]  # the name stays readable
    assert all(W.cache_path(url) == path for url, path in zip(urls, paths))
    assert not (hub / known.filename).exists() and W.cached_state("deepgaze2e").state == "missing"
    assert W.cache_path("deepgaze2e") == hub / known.filename  # known names keep their place


def test_torchvision_urls_share_torchvisions_cache_file(hub):
    """torchvision keeps `download.pytorch.org` files under their bare names (which carry their sha256's
    start): a student's `imagenet` backbone is found where torchvision put it, not downloaded again."""
    url = "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth"
    hub.mkdir(parents=True)
    (hub / "mobilenet_v2-b0353104.pth").write_bytes(b"torchvision's")
    assert resolve(url) == W.cache_path(url) == hub / "mobilenet_v2-b0353104.pth"


@pytest.mark.parametrize("payload, looks", [
    (b"\n  <!DOCTYPE html><html><body>Sign in to continue</body></html>", "it starts like an HTML page: a login or error page?"),
    (b'{"error": "quota exceeded"}', "it starts like JSON text"),
    (b"Access denied\n", "it starts with the text 'Access denied\\n'"),
    (b"", "it is empty"),
], ids=["html", "json", "text", "empty"])
def test_a_url_download_that_is_not_a_weights_file_is_not_kept(hub, monkeypatch, payload, looks):
    """A login page saved as x.pth (HTTP 200) stayed cached for good: loading it failed with "not a torch
    checkpoint" and fetching again said it was there."""
    calls: list = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(payload, calls))
    dst = _url_dir(hub, URL) / "tiny-net.pth"
    with pytest.raises(WeightsError) as e:
        resolve(URL, progress=False)
    assert str(e.value) == (f"the download of tiny-net.pth from {URL} is not a weights file ({looks}); "
                            f"nothing was kept: check the URL, or download {URL} by hand and put it at {dst}")
    assert not dst.exists() and list(dst.parent.iterdir()) == []
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(_checkpoint_bytes(), calls))
    assert resolve(URL, progress=False) == dst and len(calls) == 2  # not cached: fetched again


@pytest.mark.parametrize("write", [
    lambda f: torch.save({"w": torch.zeros(2)}, f),
    lambda f: torch.save({"w": torch.zeros(2)}, f, _use_new_zipfile_serialization=False),
    lambda f: np.save(f, np.zeros(2)),
    lambda f: np.savez(f, a=np.zeros(2)),
    lambda f: f.write(b"\x89HDF\r\n\x1a\n" + bytes(8)),
], ids=["torch", "torch-legacy", "npy", "npz", "hdf5"])
def test_every_kind_of_weights_file_this_project_reads_is_kept(hub, monkeypatch, write):
    buffer = io.BytesIO()
    write(buffer)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _fake_download(buffer.getvalue(), []))
    assert resolve(URL, progress=False).read_bytes() == buffer.getvalue()


def test_a_stalled_download_times_out_into_the_usual_error(hub, monkeypatch):
    """A server that accepts and never answers hung `weights fetch` (urlopen has no timeout of its own)."""
    import socket
    import threading
    import time

    monkeypatch.setattr(torch.hub, "download_url_to_file", _real_download)
    monkeypatch.setattr(W, "DOWNLOAD_TIMEOUT_S", 0.5)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "*")  # straight to the loopback server whatever proxy is set
    with socket.socket() as server:  # listens, never accepts: the connection is made, nothing ever comes back
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/stalled.pth"
        guard = threading.Timer(10, server.close)  # without the timeout: refused after 10 s, not a hung test
        guard.start()
        start = time.monotonic()
        try:
            with pytest.raises(WeightsError) as e:
                resolve(url, progress=False)
        finally:
            guard.cancel()
    dst = _url_dir(hub, url) / "stalled.pth"
    assert time.monotonic() - start < 5
    assert str(e.value) == (f"cannot download stalled.pth (the server sent nothing for 0.5 s) and it is not "
                            f"cached: download {url} by hand and put it at {dst}")
    assert list(dst.parent.iterdir()) == []  # torch.hub deleted its .partial file
    assert socket.getdefaulttimeout() is None  # the process's default is restored


def test_a_cut_short_cached_file_that_cannot_be_deleted_is_one_error(hub, monkeypatch):
    """On a read-only cache the deletion of an earlier download cut short was a PermissionError traceback."""
    whole = _checkpoint_bytes()
    dst = _url_dir(hub, URL) / "tiny-net.pth"
    dst.parent.mkdir(parents=True)
    dst.write_bytes(whole[: len(whole) // 2])
    real_unlink = Path.unlink

    def read_only(self, *args, **kwargs):
        if self == dst:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(WeightsError) as e:
        resolve(URL, progress=False)
    assert str(e.value) == (f"cached tiny-net.pth at {dst} is cut short (a zip archive without its end) and cannot "
                            "be deleted (Permission denied): delete it, or point TORCH_HOME at a writable folder, "
                            f"to download it again from {URL}")


def test_a_cached_download_that_does_not_load_says_how_to_download_it_again(hub, monkeypatch):
    hub.mkdir(parents=True)
    known = W.KNOWN_WEIGHTS["deepgaze2e"]
    (hub / known.filename).write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(WeightsError) as e:
        load_state_dict(hub / known.filename)
    assert str(e.value).endswith(f"; delete {hub / known.filename} to download it again from {known.url}")
    np.save(hub / "centerbias_mit1003.npy", np.zeros(3))
    (hub / "centerbias_mit1003.npy").write_bytes((hub / "centerbias_mit1003.npy").read_bytes()[:40])
    with pytest.raises(WeightsError) as e:
        load_numpy(hub / "centerbias_mit1003.npy")
    assert str(e.value).endswith(f"to download it again from {W.KNOWN_WEIGHTS['centerbias_mit1003'].url}")
    cached = _url_dir(hub, URL) / "tiny-net.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(WeightsError) as e:
        load_state_dict(cached)
    assert str(e.value).endswith(f"; delete {cached} to download it again")


# --- reading files ----------------------------------------------------------------------------


def _save_small(path: Path) -> dict:
    sd = {"w": torch.arange(600, dtype=torch.float32).reshape(20, 30), "b": torch.ones(3)}
    torch.save(sd, path)
    return sd


def test_load_state_dict_roundtrip(tmp_path):
    sd = _save_small(tmp_path / "w.pth")
    got = load_state_dict(tmp_path / "w.pth")
    assert set(got) == set(sd) and torch.equal(got["w"], sd["w"])


def test_load_state_dict_truncated(tmp_path):
    p = tmp_path / "w.pth"
    _save_small(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cannot read weights file") as e:
        load_state_dict(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("content, why", [
    (b"", "(truncated or not a torch checkpoint?): EOFError"),
    (b"garbage, not a checkpoint", "(not a torch checkpoint: its pickle does not load as tensors: Unsupported operand "),
])
def test_load_state_dict_garbage(tmp_path, content, why):
    p = tmp_path / "w.pth"
    p.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        load_state_dict(p)
    assert str(e.value).startswith(f"cannot read weights file {p} {why}"), str(e.value)
    assert "weights_only" not in str(e.value) and len(str(e.value)) < 200  # not torch's paragraph


def test_a_pickled_model_is_refused_unrun_with_what_to_save_instead(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")  # the whole module: loading it would run pickled code
    with pytest.raises(WeightsError) as e:
        load_state_dict(tmp_path / "model.pt")
    assert str(e.value) == (f"cannot read weights file {tmp_path / 'model.pt'} (it holds a pickled "
                            "torch.nn.modules.linear.Linear, not just tensors; it is not loaded, which would run its "
                            "code: save the model's state_dict() instead)")


def test_an_onnx_model_given_as_a_checkpoint_says_what_it_is(tmp_path):
    """`predict --checkpoint serving/a.onnx` said "not a torch checkpoint: … Unsupported operand 8"."""
    import onnx

    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), tmp_path / "a.onnx")
    with pytest.raises(WeightsError) as e:
        load_state_dict(tmp_path / "a.onnx")
    assert str(e.value) == (
        f"{tmp_path / 'a.onnx'} is an ONNX model (what `pipeline export` writes), not a torch checkpoint: give "
        "the run folder or checkpoint it was exported from, or run it with ONNX Runtime (CLI.md, `pipeline export`)")


def test_load_state_dict_not_a_dict(tmp_path):
    torch.save(torch.zeros(2), tmp_path / "t.pth")
    with pytest.raises(WeightsError, match="not a state dict"):
        load_state_dict(tmp_path / "t.pth")


def test_load_state_dict_refuses_npy_and_missing(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(WeightsError, match="load_numpy"):
        load_state_dict(tmp_path / "a.npy")
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


def test_load_numpy(tmp_path):
    arr = np.arange(64, dtype=np.float64).reshape(8, 8)
    np.save(tmp_path / "cb.npy", arr)
    np.testing.assert_array_equal(load_numpy(tmp_path / "cb.npy"), arr)


@pytest.mark.parametrize("keep", [0, 40, 200])
def test_load_numpy_truncated(tmp_path, keep):
    p = tmp_path / "cb.npy"
    np.save(p, np.zeros((16, 16)))
    p.write_bytes(p.read_bytes()[:keep])
    with pytest.raises(WeightsError) as e:
        load_numpy(p)
    assert str(p) in str(e.value)


def test_load_numpy_bad_inputs(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_numpy(tmp_path / "missing.npy")
    torch.save({"a": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="not a .npy"):
        load_numpy(tmp_path / "w.pth")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(WeightsError):
        load_numpy(tmp_path / "obj.npy")  # pickles are never loaded


# --- strict loading ---------------------------------------------------------------------------


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def test_load_strict_ok():
    src, dst = _net(), _net()
    with torch.no_grad():
        src[0].weight.add_(1)
    load_strict(dst, src.state_dict(), what="tiny")
    assert torch.equal(dst[0].weight, src[0].weight)


def test_load_strict_missing_unexpected_shape():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sd = dict(net.state_dict())
    del sd["1.running_mean"]
    sd["extra.weight"] = torch.zeros(2)
    sd["0.bias"] = torch.zeros(5)
    with pytest.raises(WeightsError) as e:
        load_strict(net, sd, what="tiny net")
    msg = str(e.value)
    assert "tiny net" in msg
    assert "missing" in msg and "1.running_mean" in msg
    assert "unexpected" in msg and "extra.weight" in msg
    assert "shape" in msg and "0.bias" in msg and "(5,)" in msg and "(4,)" in msg
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_load_strict_each_kind(case):
    net = _net()
    sd = dict(net.state_dict())
    if case == "missing":
        sd.pop("0.weight")
        key = "0.weight"
    elif case == "unexpected":
        sd["head.bias"] = torch.zeros(1)
        key = "head.bias"
    else:
        sd["0.weight"] = torch.zeros(4, 3, 5, 5)
        key = "0.weight"
    with pytest.raises(WeightsError, match=case) as e:
        load_strict(net, sd, what="tiny")
    assert key in str(e.value)


@pytest.mark.parametrize("name", ["salgan", "deepgaze2"])
def test_random_weights_are_the_same_network_in_every_worker_and_leave_the_callers_rng_alone(name):
    """``--weights random`` labels a dataset with one network: each Ray worker (each process) builds its own
    teacher, so the initialisation comes from a fixed seed, not from whatever state the process's RNG is in."""
    from teachers import build_teacher

    torch.manual_seed(123)
    a = build_teacher(name, weights="random").state_dict()
    after = torch.rand(1)
    torch.manual_seed(456)
    b = build_teacher(name, weights="random").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # building the teacher drew nothing from the caller's generator
