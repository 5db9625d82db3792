"""Weights resolution and strict loading, shared by every teacher and student.

``resolve(spec)`` turns a ``--weights`` value into a local file:

* a local path: used as is (it must exist);
* an ``http(s)://`` URL: cached as ``<torch hub dir>/checkpoints/url/<16 hex of the URL's sha256>/<basename>``,
  so that two URLs ending in the same file name (or differing only in their query) are two files, and none
  takes a known name's place; torchvision's URLs (``download.pytorch.org``) excepted, which are cached as
  ``<torch hub dir>/checkpoints/<basename>``, where torchvision itself keeps them (their names carry the start
  of their sha256: one name, one file);
* a known name (see :data:`KNOWN_WEIGHTS`): cached as ``<torch hub dir>/checkpoints/<filename>``
  and, when the table pins a sha256, verified against it.

A cached file is used without touching the network. A missing one is downloaded with
:func:`torch.hub.download_url_to_file` (temporary file then rename, so an interrupted download
never leaves a half file in the cache; a server that stops sending for :data:`DOWNLOAD_TIMEOUT_S` is an
error, not a hang). A URL's download that does not start like a weights file (an HTML login page…) is
deleted, not cached. Offline, the error names the file, its URL and the exact path where to put it by hand.

``load_state_dict`` reads a torch checkpoint with clear errors; ``load_numpy`` does the same for
``.npy`` arrays (the DeepGaze centre bias); ``load_strict`` loads a state dict into a module key
for key, never partially.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from torch import nn


class WeightsError(Exception):
    """A weights file is missing, corrupt, of the wrong digest or does not fit the module."""


@dataclass(frozen=True)
class KnownWeights:
    """A weights file the pipeline knows by name."""

    name: str
    url: str
    #: expected sha256 (hex) of the file, or ``None`` when no digest is pinned (then not checked)
    sha256: str | None
    #: file name in the cache (``<torch hub dir>/checkpoints/<filename>``)
    filename: str
    description: str


_DEEPGAZE_RELEASE = "https://github.com/matthias-k/DeepGaze/releases/download/v1.0.0"
#: SalGAN's generator as its authors released it (Lasagne arrays), linked from the imatge-upc/salgan README
_SALGAN_RELEASE = "https://imatge.upc.edu/web/sites/default/files/resources/1720/saliency/2017-salgan"
#: the FastSal authors' student checkpoints live in their repository's weights/ folder (no digests published)
_FASTSAL_WEIGHTS = "https://github.com/feiyanhu/FastSal/raw/master/weights"

# The upstream release page publishes no digests. These are the sha256 values that independent
# public projects pinning the same v1.0.0 release assets record for them (two projects agree on
# both values and on the sizes, 419,676,716 and 8,388,688 bytes).
KNOWN_WEIGHTS: dict[str, KnownWeights] = {
    w.name: w
    for w in (
        KnownWeights(
            name="deepgaze2e",
            url=f"{_DEEPGAZE_RELEASE}/deepgaze2e.pth",
            sha256="49b65724184f43a2b60426c29c12fd2b743b47ad9eb3435d3dd28e50ea4e2585",
            filename="deepgaze2e.pth",
            description="DeepGaze IIE (Linardos et al. 2021) weights, DeepGaze release v1.0.0 (~400 MB)",
        ),
        KnownWeights(
            name="centerbias_mit1003",
            url=f"{_DEEPGAZE_RELEASE}/centerbias_mit1003.npy",
            sha256="051645b7da47884c138e81f28a4afbadd99b6c3262eaf086434a9626e3578be9",
            filename="centerbias_mit1003.npy",
            description="MIT1003 centre-bias log density, 1024x1024 float64, DeepGaze release v1.0.0",
        ),
        KnownWeights(
            name="salgan_lasagne",
            url=f"{_SALGAN_RELEASE}/gen_modelWeights0090.npz",
            sha256=None,
            filename="gen_modelWeights0090.npz",
            description="SalGAN generator, the authors' Lasagne release (127 MB; `pipeline weights convert` "
                        "makes a PyTorch checkpoint of it)",
        ),
        *(
            KnownWeights(
                name=f"fastsal_{data}_{variant.lower()}",
                url=f"{_FASTSAL_WEIGHTS}/{data}_{variant}.pth",
                sha256=None,
                filename=f"{data}_{variant}.pth",
                description=f"FastSal ({variant}) fine-tuned on {data.upper()} by the FastSal authors ("
                            + ("DeepGaze II pseudo-labels: --student-output softmax)" if data == "coco"
                               else "SalGAN teacher: --student-output sigmoid)"),
            )
            for data in ("coco", "salicon")
            for variant in ("A", "C")
        ),
    )
}


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: seconds a download may wait for the server (to connect, or for its next bytes) before it fails: urlopen has no
#: timeout of its own, so a server that accepts and never answers would hang ``weights fetch`` for ever
DOWNLOAD_TIMEOUT_S = 60.0

#: hosts whose URLs are cached under their bare file name, where torchvision and torch.hub keep them (shared with
#: them): their file names carry the start of the file's sha256, so one name is one file whatever the URL
SHARED_NAME_HOSTS = ("download.pytorch.org",)


def checkpoint_dir() -> Path:
    """Where downloaded weights are cached: ``<torch.hub.get_dir()>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def is_http_url(spec) -> bool:
    """Whether ``spec`` (a string or a path) is an http(s) URL (its scheme in any case)."""
    return str(spec).lower().startswith(("http://", "https://"))


def _url_filename(url: str) -> str:
    name = os.path.basename(unquote(urlparse(url).path))
    if not name or name in (".", ".."):
        raise WeightsError(f"cannot tell a file name from the weights URL {url} (it must end in a file name)")
    return name


def _url_cache_path(url: str) -> Path:
    """``checkpoints/url/<16 hex of sha256(url)>/<basename>``: a folder per URL (its query included), so that
    ``http://a/x.pth``, ``http://b/x.pth`` and a known name's ``x.pth`` are three files; the name stays readable."""
    name = _url_filename(url)
    if (urlparse(url).hostname or "").lower() in SHARED_NAME_HOSTS:
        return checkpoint_dir() / name
    return checkpoint_dir() / "url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def cache_path(spec: str) -> Path:
    """The cache path a known name or URL resolves to (whether or not it is there yet)."""
    if spec in KNOWN_WEIGHTS:
        return checkpoint_dir() / KNOWN_WEIGHTS[spec].filename
    if is_http_url(spec):
        return _url_cache_path(spec)
    raise WeightsError(f"{spec!r} is neither a known weights name nor an http(s) URL")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load_failure(e: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words. torch's own text runs to a
    paragraph and suggests ``weights_only=False``, which would run whatever code the file's pickle holds."""
    text = " ".join(str(e).split())
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if pickled:
        return (f"(it holds a pickled {pickled.group(1)}, not just tensors; it is not loaded, which would run its "
                "code: save the model's state_dict() instead)")
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if refused:
        return f"(not a torch checkpoint: its pickle does not load as tensors: {refused.group(1).strip()})"
    first = text.split(". ")[0].rstrip(".")  # e.g. "PytorchStreamReader failed reading zip archive: …"
    return f"(truncated or not a torch checkpoint?): {type(e).__name__}: {first}" if first else \
        f"(truncated or not a torch checkpoint?): {type(e).__name__}"


def _cut_short(path: Path) -> bool:
    """Whether ``path`` is the start of a zip archive without its end (a torch checkpoint and an npz are zip
    archives): a download cut short, which HTTP does not always report (a short read is not an error)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


#: how the weights files this project reads begin: a zip archive (torch's checkpoints, npz), a legacy torch
#: pickle (protocol 2+), a .npy array, an HDF5 file
_WEIGHTS_MAGIC = (b"PK\x03\x04", b"\x80", b"\x93NUMPY", b"\x89HDF\r\n\x1a\n")


def _not_weights(path: Path) -> str | None:
    """What ``path`` starts like when that is not a weights file (a server's HTML login or error page saved
    under the file's name, HTTP status 200), else None."""
    head = _head(path, 64)
    if head.startswith(_WEIGHTS_MAGIC):
        return None
    text = head.lstrip()
    if not head:
        return "it is empty"
    if text.startswith(b"<"):
        return "it starts like an HTML page: a login or error page?"
    if text.startswith((b"{", b"[")):
        return "it starts like JSON text"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"it starts with the text {head[:24].decode()!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _download(url: str, dst: Path, progress: bool) -> None:
    """torch.hub's download, with a socket timeout (process-wide while it runs: urlopen takes the default)."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # looked up at call time so that tests can replace it
        torch.hub.download_url_to_file(url, str(dst), progress=progress)
    finally:
        socket.setdefaulttimeout(before)


def _fetch(url: str, dst: Path, sha256: str | None, *, what: str, download: bool, progress: bool,
           sniff: bool = False) -> Path:
    """``sniff``: delete a fresh download that does not start like a weights file (a URL's: no digest to check)."""
    if download and dst.is_file() and sha256 is None and _cut_short(dst):  # an earlier download cut short: again
        try:
            dst.unlink()
        except OSError as e:
            raise WeightsError(f"cached {what} at {dst} is cut short (a zip archive without its end) and cannot be "
                               f"deleted ({e.strerror or _one_line(e)}): delete it, or point TORCH_HOME at a "
                               f"writable folder, to download it again from {url}") from None
    if dst.is_file():
        if sha256 is not None:
            got = file_digest(dst)
            if got != sha256:
                raise WeightsError(
                    f"cached {what} at {dst} has sha256 {got}, expected {sha256}: it is corrupt or another "
                    f"version; delete it to download it again from {url}"
                )
        return dst
    hint = f"download {url} by hand and put it at {dst}"
    if not download:
        raise WeightsError(f"{what} is not cached and downloading is off: {hint}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _download(url, dst, progress)
    except Exception as e:  # offline, HTTP error, no answer, unwritable cache… (torch.hub deletes its .partial)
        stalled = isinstance(getattr(e, "reason", e), TimeoutError)
        why = f"the server sent nothing for {DOWNLOAD_TIMEOUT_S:g} s" if stalled else _one_line(e)
        raise WeightsError(f"cannot download {what} ({why}) and it is not cached: {hint}") from e
    if not dst.is_file():
        raise WeightsError(f"downloading {what} left no file at {dst}: {hint}")
    looks = _not_weights(dst) if sniff and sha256 is None else None
    if looks:
        dst.unlink(missing_ok=True)
        raise WeightsError(f"the download of {what} from {url} is not a weights file ({looks}); nothing was kept: "
                           f"check the URL, or {hint}")
    if _cut_short(dst):
        size = dst.stat().st_size
        dst.unlink(missing_ok=True)
        raise WeightsError(f"the download of {what} from {url} was cut short ({size:,} bytes, a zip archive without "
                           f"its end); it was deleted: run the command again, or {hint}")
    if sha256 is not None:
        got = file_digest(dst)
        if got != sha256:
            dst.unlink(missing_ok=True)
            raise WeightsError(
                f"downloaded {what} from {url} has sha256 {got}, expected {sha256}; the download was deleted"
            )
    return dst


def resolve(spec: str | os.PathLike, *, download: bool = True, progress: bool = True) -> Path:
    """A local path, an http(s) URL or a known name → a local file (see the module docstring).

    ``download=False`` never touches the network: a spec that is not cached is an error.
    """
    text = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise WeightsError(f"empty or invalid weights spec: {spec!r}")
    if text in KNOWN_WEIGHTS:
        known = KNOWN_WEIGHTS[text]
        what = f"{known.filename} ({known.description})"
        return _fetch(known.url, checkpoint_dir() / known.filename, known.sha256,
                      what=what, download=download, progress=progress)
    if is_http_url(text):
        dst = _url_cache_path(text)
        return _fetch(text, dst, None, what=dst.name, download=download, progress=progress, sniff=True)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise WeightsError(f"weights path is not a file: {path}")
    raise WeightsError(
        f"weights file not found: {path} (nor is {text!r} a URL or a known name: {', '.join(sorted(KNOWN_WEIGHTS))})"
    )


def resolve_all(specs, *, who: str, fetch_hint: str = "", resolver=None, download: bool = True,
                progress: bool = True) -> list[Path]:
    """Every spec of ``specs`` (what ``who`` needs) → local files, or one WeightsError naming *every*
    file that cannot be had (each with its URL and the place to put it), not only the first.

    ``resolver`` replaces :func:`resolve` (a module that looks its ``resolve`` up at call time passes it).
    ``fetch_hint`` (e.g. ``pipeline weights fetch deepgaze``) ends the message.
    """
    resolver = resolver or (lambda s: resolve(s, download=download, progress=progress))
    specs = list(specs)
    paths, errors = [], []
    for spec in specs:
        try:
            paths.append(resolver(spec))
        except WeightsError as e:
            errors.append(str(e).rstrip("."))
    if errors:
        names = " and ".join(describe(s) for s in specs)
        numbered = "; ".join(f"({i}) {e}" for i, e in enumerate(errors, 1))
        count = "it" if len(specs) == 1 else f"{len(errors)} of them" if len(errors) < len(specs) else "none of them"
        verb = "cannot be had here" if len(specs) == 1 or len(errors) < len(specs) else "can be had here"
        raise WeightsError(f"{who} needs {names}; {count} {verb}: {numbered}"
                           + (f"; with network, `{fetch_hint}` fetches everything {who} needs" if fetch_hint else ""))
    return paths


def describe(spec: str) -> str:
    """A spec as a person reads it: a known name's or URL's file name, else the path as given."""
    text = os.fspath(spec)
    if text in KNOWN_WEIGHTS:
        return KNOWN_WEIGHTS[text].filename
    if is_http_url(text):
        try:
            return _url_filename(text)
        except WeightsError:
            return text
    return text


@dataclass(frozen=True)
class CachedState:
    """Where a weights spec stands on this machine, without touching the network."""

    spec: str
    path: Path | None  # where the file is or goes (None: a bare local path that names nothing)
    #: ``verified`` (sha256 matches the pinned one), ``unverified`` (here; no digest pinned), ``missing``,
    #: ``corrupt`` (sha256 differs from the pinned one), ``here`` (a local file: nothing to verify against)
    state: str
    url: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("verified", "unverified", "here")

    @property
    def summary(self) -> str:
        """``cached, sha256 verified`` / ``cached, unverified: no sha256 pinned`` / ``CORRUPT: …`` / ``not cached``."""
        return {"verified": "cached, sha256 verified", "unverified": "cached, unverified: no sha256 pinned",
                "here": "here", "missing": "not cached" if self.url else "not found",
                "corrupt": f"CORRUPT: {self.detail}"}[self.state]


def cached_state(spec: str, *, verify: bool = True) -> CachedState:
    """Whether ``spec`` (known name, URL or path) is here, and for known names with a pinned digest
    whether the file is intact (``verify``: hash it; else a present file counts as ``unverified``)."""
    text = os.fspath(spec)
    if text in KNOWN_WEIGHTS or is_http_url(text):
        known = KNOWN_WEIGHTS.get(text)
        path, url = cache_path(text), (known.url if known else text)
        if not path.is_file():
            return CachedState(text, path, "missing", url, f"not cached at {path}")
        pinned = known.sha256 if known else None
        if pinned is None or not verify:
            return CachedState(text, path, "unverified", url, "cached; no sha256 pinned to check it against"
                               if pinned is None else "cached; not checked")
        got = file_digest(path)
        if got != pinned:
            return CachedState(text, path, "corrupt", url, f"sha256 {got}, expected {pinned}: delete {path} "
                                                          f"and fetch it again")
        return CachedState(text, path, "verified", url, "cached; sha256 verified")
    path = Path(text).expanduser()
    if path.is_file():
        return CachedState(text, path, "here", None, "a local file")
    return CachedState(text, path, "missing", None, f"{path} not found")


def _head(path: Path, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _download_hint(path: Path) -> str:
    """For a file of the weights cache that does not load, how to get it again (else "")."""
    try:
        here, cache = path.resolve(), checkpoint_dir().resolve()
    except OSError:
        return ""
    if not here.is_relative_to(cache):
        return ""
    url = next((k.url for k in KNOWN_WEIGHTS.values() if cache / k.filename == here), None)
    return f"; delete {path} to download it again" + (f" from {url}" if url else "")


def load_state_dict(path: str | Path) -> dict:
    """Read a torch checkpoint (``weights_only``) with one clear error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if _head(path, 6) == b"\x93NUMPY":
        raise WeightsError(f"{path} is a numpy .npy array, not a torch checkpoint (read it with load_numpy)")
    if path.suffix.lower() == ".onnx":  # (its protobuf failed as "Unsupported operand 8" of a pickle)
        raise WeightsError(f"{path} is an ONNX model (what `pipeline export` writes), not a torch checkpoint: give "
                           "the run folder or checkpoint it was exported from, or run it with ONNX Runtime (CLI.md, "
                           "`pipeline export`)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of arbitrary objects, not a torch file…
        raise WeightsError(f"cannot read weights file {path} {_load_failure(e)}{_download_hint(path)}") from e
    if not isinstance(sd, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def load_numpy(path: str | Path) -> np.ndarray:
    """Read a ``.npy`` array (no pickles) with one clear error if it is missing, truncated or not one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"numpy file not found: {path}")
    if _head(path, 6) != b"\x93NUMPY":
        raise WeightsError(f"{path} is not a .npy file (no numpy header)")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # EOFError / ValueError for truncated files, pickled object arrays…
        raise WeightsError(f"cannot read numpy file {path} (truncated or corrupt?): {_one_line(e)}"
                           f"{_download_hint(path)}") from e
    if not isinstance(arr, np.ndarray):
        raise WeightsError(f"{path} does not hold a single array")
    return arr


def load_strict(module: nn.Module, state_dict: dict, *, what: str) -> None:
    """Load ``state_dict`` into ``module`` key for key and shape for shape, or raise WeightsError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(getattr(state_dict[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of the wrong shape (e.g. {shapes[0]})")
        raise WeightsError(f"{what}: state dict does not fit: " + "; ".join(parts))
    try:
        module.load_state_dict(state_dict, strict=True)
    except Exception as e:  # e.g. a value that is not a tensor
        raise WeightsError(f"{what}: cannot load state dict: {_one_line(e)}") from e


def states_summary(states: list[CachedState], fetch_hint: str) -> str:
    """One phrase for the files of one model: ``cached, sha256 verified``, ``cached, unverified (no
    sha256 pinned for X)``, ``CORRUPT: X …``, ``not cached: X (fetch hint)``."""
    bad = [s for s in states if s.state == "corrupt"]
    missing = [s for s in states if s.state == "missing"]
    if bad:
        return "CORRUPT: " + "; ".join(f"{describe(s.spec)} {s.detail}" for s in bad) + (
            f" ({fetch_hint})" if fetch_hint else "")
    if missing:
        return f"not cached: {', '.join(describe(s.spec) for s in missing)}" + (f" ({fetch_hint})" if fetch_hint else "")
    unverified = [describe(s.spec) for s in states if s.state == "unverified"]
    if unverified:
        return f"cached, unverified (no sha256 pinned for {', '.join(unverified)})"
    return "cached, sha256 verified"
