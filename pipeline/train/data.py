"""Reading labelled shards for training and evaluation, with webdataset.

Shard order and the sample shuffle buffer are seeded by (seed, epoch), so an epoch sees the
same batches in the same order whether or not the run was interrupted before it.

What is read is checked: a label folder's ``labels.json`` lists its shards, each must be there with its
marker and size (:func:`open_label_set`) and, once per run, its sha256 (:func:`verify_shards`). While
reading, a sample whose image or label does not decode, or a tar that ends early (a damaged header),
becomes a :class:`BadSample` that travels with the batches from the DataLoader workers to the training
process, where :class:`BadSamples` logs and counts it (and stops the run beyond its limit); a shard that
cannot be opened, or whose samples carry another label field, stops the run with one sentence.

A label folder may be a URL (``s3://bucket/labels/deepgaze/train2017``): its index, markers and tars are read
through fsspec (:mod:`pipeline.common.storage`), the tars streamed by webdataset, for which this module
registers fsspec as the opener of the object-storage schemes (:data:`REMOTE_SCHEMES`).
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import cv2
import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import gopen as _gopen  # the module (``wds.gopen`` is its function)

from pipeline.common.errors import error_message, storage_error
from pipeline.common.images import opencv, resize, stated_size
from pipeline.common.storage import as_path, is_url
from pipeline.label.shards import digest, folders_below, index_problem, marker_path, tar_path, verify_shard

#: URL schemes whose tars webdataset opens through fsspec rather than its own way (``gs``: gsutil), as every
#: other scheme fsspec knows and webdataset does not; set at import, so DataLoader workers have it too
REMOTE_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _fsspec_open(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    return as_path(url).open(mode)


def _fsspec_or_webdataset(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    from fsspec.registry import known_implementations, registry

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in registry or scheme in known_implementations:
        return _fsspec_open(url, mode, bufsize, **kw)
    return _WEBDATASET_DEFAULT(url, mode, bufsize, **kw)


_WEBDATASET_DEFAULT = _gopen.gopen_schemes["__default__"]
for _scheme in REMOTE_SCHEMES:
    _gopen.gopen_schemes[_scheme] = _fsspec_open
_gopen.gopen_schemes["__default__"] = _fsspec_or_webdataset


class DataError(Exception):
    """The labelled shards cannot be used for training (missing, unfinished, mixed, damaged)."""


#: how to repair a label folder, in messages: `pipeline label` redoes a shard whose tar does not match its marker
RELABEL = "re-run `pipeline label` with the same options, which redoes it"


@dataclass(frozen=True)
class LabelSet:
    """A finished label folder: its shards and what their labels are."""

    folder: Path
    tars: tuple[str, ...]
    label_key: str  # e.g. "deepgaze.npy" or "salgan.png"
    label_kind: str  # log_density | probability_map
    teacher: str
    count: int
    image_size: tuple[int, int]  # (H, W) of the stored images and labels
    counts: tuple[int, ...] = ()  # images in each tar of ``tars``
    digests: tuple[str, ...] = ()  # sha256 of each tar of ``tars`` (as labels.json and the markers record it)
    #: what the labels were made with beyond the teacher's name (labels.json): its weights' digest, whether they
    #: were random, the teacher's label version (None where an older labels.json does not say)
    weights_digest: str | None = None
    weights_random: bool = False
    label_version: int | None = None

    def made_with(self) -> dict:
        """What a checkpoint records of its labels, and a resume compares."""
        return {"teacher": self.teacher, "kind": self.label_kind, "image_size": list(self.image_size),
                "weights_digest": self.weights_digest, "label_version": self.label_version}

    def images_in(self, tars) -> int:
        per_tar = dict(zip(self.tars, self.counts))
        return sum(per_tar[t] for t in tars)

    def shards(self) -> dict[str, tuple[str, int]]:
        """tar -> (sha256, images) for every shard of the set."""
        return {t: (d, c) for t, d, c in zip(self.tars, self.digests, self.counts)}


def _index(folder) -> dict:
    path = folder / "labels.json"
    if folder.is_file():
        raise DataError(f"{folder} is a file, not a label folder (the folder holding labels.json)")
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        below = folders_below(folder) if folder.is_dir() else ""
        if below and not list(folder.glob("shard-*")):
            raise DataError(f"{folder} is not a label folder{below}") from None
        raise DataError(f"not a finished label folder: {path} missing (labelling not finished; run "
                        "`pipeline label` first)") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        if isinstance(e, OSError) and storage_error(e):  # the store refused (credentials…): the folder may be fine
            raise DataError(f"cannot read {path}: {storage_error(e)}") from None
        raise DataError(f"not a finished label folder: {path} is unreadable ({type(e).__name__}); {RELABEL}") from None
    need = ("label_extension", "label_kind", "teacher", "count", "image_size", "shards")
    lacking = [k for k in need if k not in index] if isinstance(index, dict) else list(need)
    if lacking:
        raise DataError(f"{path} is not the index `pipeline label` writes (no {', '.join(lacking)})")
    if index_problem(index):
        raise DataError(f"{path} is not the index `pipeline label` writes ({index_problem(index)})")
    return index


def open_label_set(folder: str | Path) -> LabelSet:
    """The label folder's shards as its ``labels.json`` lists them, each checked to be there with its marker
    and size (not its checksum: :func:`verify_shards` reads them). ``folder`` may be a URL."""
    folder = as_path(folder)
    index = _index(folder)
    tars, counts, digests = [], [], []
    for shard in index["shards"]:
        name = Path(shard["tar"]).stem
        tar = tar_path(folder, name)
        marker, reason = verify_shard(folder, name, {"sha256": shard["sha256"]}, check_digest=False)
        if not tar.is_file():
            raise DataError(f"shard {tar} is missing (labels.json lists it); {RELABEL}")
        if marker is None:
            raise DataError(f"shard {tar} has no marker {marker_path(folder, name).name} (it was never finished, or "
                            f"the marker was removed or is not in the shape `pipeline label` writes); {RELABEL}")
        if reason:
            raise DataError(f"shard {tar} does not match labels.json ({reason}); {RELABEL}")
        tars.append(str(tar))
        counts.append(int(shard["count"]))
        digests.append(str(shard["sha256"]))
    return LabelSet(folder, tuple(tars), index["label_extension"], index["label_kind"], index["teacher"],
                    index["count"], tuple(index["image_size"]), tuple(counts), tuple(digests),
                    index.get("weights_digest"), bool(index.get("weights_random")), index.get("label_version"))


def verify_shards(shards: Mapping[str, tuple[str, int]], threads: int = 4) -> None:
    """Check each shard's sha256 against the one its marker and labels.json record (``shards``: tar -> (sha256,
    images)); raise :class:`DataError` naming the first that differs. The tars are read in a few threads."""
    from concurrent.futures import ThreadPoolExecutor

    tars = list(shards)
    with ThreadPoolExecutor(max(1, min(threads, len(tars)))) as pool:
        for tar, got in zip(tars, pool.map(_digest_or_none, tars)):
            if got is None:
                raise DataError(f"shard {tar} cannot be read (it is missing or unreadable); {RELABEL}")
            if got != shards[tar][0]:
                raise DataError(f"shard {tar} is corrupt: its sha256 is not the one its marker and labels.json record "
                                f"(the file changed after labelling); {RELABEL}")


def _digest_or_none(path: str) -> str | None:
    try:
        return digest(path)  # local or on object storage
    except OSError:
        return None


def check_same_labels(first: LabelSet, other: LabelSet) -> None:
    """Two label sets a run may mix (or train on one, validate on the other): one teacher with one set of weights
    (and label version), one size. (Labels of one teacher in fp32 and in bf16 may mix: they agree to the
    tolerance their markers record.)"""
    if (first.label_key, first.image_size) != (other.label_key, other.image_size):
        (h1, w1), (h2, w2) = first.image_size, other.image_size
        raise DataError(f"{other.folder} holds {other.label_key} labels at {h2}x{w2}, but {first.folder} holds "
                        f"{first.label_key} at {h1}x{w1}: one teacher and one size per run")
    for what, a, b in (("weights", first.weights_digest, other.weights_digest),
                       ("label version", first.label_version, other.label_version)):
        if a is not None and b is not None and a != b:
            raise DataError(f"{other.folder} holds {other.teacher} labels made with other {what} than {first.folder}'s "
                            f"({_short(b)} there, {_short(a)} here): one teacher's labels per run, made alike")


def _short(value) -> str:
    text = str(value)
    return text[:12] + "…" if len(text) > 13 else text


def _place(folder) -> str:
    return str(folder) if is_url(str(folder)) else os.path.realpath(folder)


def open_label_sets(folders) -> LabelSet:
    """Several finished label folders of one teacher, read as one set (their shards in order); a folder named
    twice is refused (its shards would be trained on twice, and the held-out ones trained on)."""
    places = [_place(f) for f in folders]
    twice = [f for f, p in zip(folders, places) if places.count(p) > 1]
    if twice:
        raise DataError(f"--labels names {twice[0]} more than once (by this or another path): each folder once")
    sets = [open_label_set(f) for f in folders]
    if not sets:
        raise DataError("no label folder given")
    first = sets[0]
    for other in sets[1:]:
        check_same_labels(first, other)
    return LabelSet(first.folder, tuple(t for s in sets for t in s.tars), first.label_key, first.label_kind,
                    first.teacher, sum(s.count for s in sets), first.image_size,
                    tuple(c for s in sets for c in s.counts), tuple(d for s in sets for d in s.digests),
                    first.weights_digest, any(s.weights_random for s in sets), first.label_version)


def split_shards(tars: tuple[str, ...], val_shards: int) -> tuple[list[str], list[str]]:
    """The last ``val_shards`` shards are held out for validation."""
    if val_shards >= len(tars):
        raise DataError(f"--val-shards {val_shards} leaves no training shard (there are {len(tars)}): label the "
                        "images into more shards (`pipeline label … --shard-size N --overwrite`), or hold out a "
                        "label folder of its own with --val-labels")
    cut = len(tars) - val_shards
    return list(tars[:cut]), list(tars[cut:])


def _all_shards(src):
    return src


class SampleError(Exception):
    """One sample cannot be used (its image or label does not decode, or is of another size)."""


class ForeignLabels(Exception):
    """The shard's samples carry another label field than its label folder says: not one sample's problem."""


def _npy_shape(raw: bytes) -> tuple[int, ...] | None:
    """The shape a ``.npy`` member's header states, or None where its header does not read."""
    f = io.BytesIO(raw)
    try:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return tuple(int(n) for n in read(f)[0])
    except Exception:  # noqa: BLE001 - np.load said what is wrong with it
        return None


def decode(sample: dict, label_key: str, label_kind: str,
           image_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A raw tar sample → (uint8 image [3,H,W], float label [1,H,W], key); :class:`SampleError` when its image or
    label does not decode (or is not ``image_size``), :class:`ForeignLabels` when it has another label field."""
    if label_key not in sample:
        others = sorted(k for k in sample if not k.startswith("__") and k not in ("jpg", "json"))
        if others:
            raise ForeignLabels(f"its samples hold {', '.join(others)} labels, not the {label_key} its labels.json "
                                "names (a shard of another labelling run)")
        raise SampleError(f"no {label_key} label in the sample")
    if "jpg" not in sample:
        raise SampleError("no jpg image in the sample")
    if image_size is not None:  # sizes checked from the JPEG/PNG headers first: a tiny member may state a huge image
        for what, data in (("image", sample["jpg"]), ("label", sample[label_key])):
            stated = stated_size(data) if isinstance(data, bytes) else None
            if stated is not None and stated != tuple(image_size):
                raise SampleError(f"its {what} is {'x'.join(map(str, stated))}, not the "
                                  f"{image_size[0]}x{image_size[1]} of its label folder")
    bgr = opencv().imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SampleError("its JPEG image does not decode")
    image = torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()
    raw = sample[label_key]
    if label_kind == "log_density":
        try:
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any damage: a truncated header, a bad dtype…
            shape = _npy_shape(raw)  # (read here, off the hot path: a header stating more than its bytes fails)
            if image_size is not None and shape is not None and shape != tuple(image_size):
                raise SampleError(f"its label is {'x'.join(map(str, shape))}, not the {image_size[0]}x{image_size[1]} "
                                  "of its label folder") from None
            raise SampleError(f"its {label_key} label does not decode ({type(e).__name__})") from None
        target = torch.from_numpy(np.asarray(array, np.float32))
    else:
        gray = opencv().imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise SampleError(f"its {label_key} label does not decode")
        target = torch.from_numpy(gray).float() / 255.0
    h, w = image.shape[1:]
    if image_size is not None and (h, w) != tuple(image_size):
        raise SampleError(f"its image is {h}x{w}, not the {image_size[0]}x{image_size[1]} of its label folder")
    if tuple(target.shape) != (h, w):
        raise SampleError(f"its label is {'x'.join(map(str, target.shape))}, not {h}x{w} as its image")
    if not torch.isfinite(target).all():
        raise SampleError("its label holds values that are not finite")
    return image, target[None], sample["__key__"]


#: the file types a ground-truth map may have, tried in this order
GT_SUFFIXES = (".png", ".jpg", ".jpeg")
#: what every reason of a sample skipped for its ground-truth map says (told from damaged labels by it)
GT_WORDS = "ground-truth map"


def ground_truth(sample: dict, folder, size: tuple[int, int]) -> torch.Tensor:
    """The human saliency map of ``sample`` in ``folder`` (a path or URL), as a float map ``[1, H, W]`` in [0, 1]
    at ``size``: the grayscale image named as the sample's source image (as its ``json`` records it: a folder
    source's ``id``, its path relative to the images folder; a COCO image's ``file``) with the suffix ``.png``,
    else ``.jpg`` / ``.jpeg`` (SALICON's ``maps/train/X.png`` for ``X.jpg``), resized as ``pipeline label``
    resized the image. :class:`SampleError` when there is none, or it cannot be read or decoded."""
    try:
        meta = json.loads(sample["json"])
        source = meta["id"] if isinstance(meta["id"], str) else meta["file"]
    except (KeyError, TypeError, ValueError):
        raise SampleError("its json names no source file, so its ground-truth map cannot be found") from None
    stem = Path(source).with_suffix("")
    data, refused = None, None
    for suffix in GT_SUFFIXES:
        try:
            data = (as_path(folder) / f"{stem}{suffix}").read_bytes()
            break
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            continue
        except OSError as e:  # unreadable (permissions; a store's 403, which may also mean "no such key")
            refused = refused or e
    if data is None and refused is not None:
        raise SampleError(f"the ground-truth map of {source} in {folder} cannot be read ({error_message(refused)})")
    if data is None:
        raise SampleError(f"no {GT_WORDS} for {source} in {folder} ({stem}.png, .jpg or .jpeg)")
    gray = opencv().imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)  # as
    # the photo was labelled: a map's EXIF orientation turned it 90° from the image it pairs with
    if gray is None:
        raise SampleError(f"the ground-truth map of {source} in {folder} does not decode")
    return torch.from_numpy(resize(gray, size)).float()[None] / 255.0


def first_ground_truth(labels: "LabelSet", gt_maps: str) -> None:
    """The first sample's map is in ``gt_maps``, or :class:`SampleError` saying so (one sentence, before any
    training): a folder of maps named otherwise (COCO 2017's names against SALICON's 2014 ones, a level off) is
    found at once, not one skipped sample at a time. (Read in any process: a Ray Train worker's too.)"""
    first = wds.WebDataset(labels.tars[0], shardshuffle=False, nodesplitter=_all_shards, empty_check=False)
    sample = next(iter(first), None)
    if sample is None:
        return
    try:
        ground_truth(sample, gt_maps, labels.image_size)
    except SampleError as e:
        raise SampleError(f"--gt-maps {gt_maps}: {e}, for the first sample of {labels.tars[0]}; each map is the "
                          "grayscale image named as the image with .png, .jpg or .jpeg, below the folder as the image "
                          "is below its images folder (a COCO image: its file name)") from None


@dataclass(frozen=True)
class BadSample:
    """A sample (or ``count`` samples) of ``shard`` that could not be read, passed along the batches to the
    training process, which counts and logs it; ``fatal``: the shard cannot be read at all."""

    shard: str
    key: str
    reason: str
    count: int = 1
    fatal: bool = False


class BadSamples:
    """Counts and logs the unreadable samples of a run, each once (by shard and key), and stops the run with
    :class:`DataError` beyond ``limit`` of them or at a fatal one."""

    def __init__(self, limit: int = 10, echo: Callable[[str], None] | None = None):
        self.limit = limit
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.seen: dict[tuple[str, str], int] = {}
        self.reasons: dict[tuple[str, str], str] = {}  # why each was skipped

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def add(self, bad: BadSample) -> None:
        if bad.fatal:
            raise DataError(bad.reason)
        if (bad.shard, bad.key) in self.seen:
            return
        self.seen[bad.shard, bad.key] = bad.count
        self.reasons[bad.shard, bad.key] = bad.reason
        if bad.count == 0:
            self.echo(f"warning: {bad.shard}: {bad.reason}; no sample lost")
            return
        lost = bad.count != 1 or bad.key.startswith(("after ", "all "))  # a tar that ended early: keys unknown
        what = f"{bad.count} sample{'s' if bad.count != 1 else ''} ({bad.key})" if lost else f"sample {bad.key}"
        self.echo(f"warning: skipped {what} of {bad.shard}: {bad.reason}")
        if self.total > self.limit:
            n = self.total
            said = f"{n} sample{'s' if n != 1 else ''} could not be read, more than --max-bad-samples {self.limit} " \
                   f"allows (the last: {bad.key} of {bad.shard}"
            if GT_WORDS in bad.reason:  # the labels are fine: the maps are missing or broken
                raise DataError(f"{said}: {bad.reason}): --gt-maps lacks usable maps of these images (each is the "
                                "image's name with .png, .jpg or .jpeg, below the folder as the image is below its "
                                "images folder)")
            raise DataError(f"{said}): the labels are damaged; re-run `pipeline label` with the same options, which "
                            "redoes every shard whose tar no longer matches its marker")


class _Reader:
    """The reading side of a shard loader, in each process that reads tars (the DataLoader workers).

    webdataset's ``handler`` records a tar that cannot be opened or read on; the sample count of each shard is
    compared with its marker's (a damaged tar header ends the tar early); a sample that does not decode becomes
    a :class:`BadSample`. All of them travel with the batches, in order, to the training process.
    """

    def __init__(self, labels: LabelSet, counts: Mapping[str, int], batch_size: int, partial: bool,
                 gt_maps: str | None = None):
        self.label_key, self.label_kind, self.image_size = labels.label_key, labels.label_kind, labels.image_size
        self.gt_maps = gt_maps
        self.counts, self.batch_size, self.partial = dict(counts), batch_size, partial
        self.pending: list[BadSample] = []
        self.errors: dict[str, str] = {}  # tar -> why it stopped early
        self.seen: dict[str, int] = {}
        self.closed: set[str] = set()

    def _url(self, exn: BaseException) -> str:
        for arg in [*reversed(exn.args), getattr(exn, "filename", None)]:
            if isinstance(arg, str) and arg in self.counts:
                return arg
        return "?"

    def handler(self, exn: BaseException) -> bool:
        url = self._url(exn)
        first = str(exn.args[0]).split(" @ ")[0] if exn.args else ""
        why = f"{type(exn).__name__}{': ' + first if first and not first.startswith('<') else ''}"
        if isinstance(exn, OSError) and not isinstance(exn, tarfile.TarError):
            self.pending.append(BadSample(url, "", f"shard {url} cannot be read ({why}): it is missing or "
                                                   f"unreadable; {RELABEL}", fatal=True))
        else:
            self.errors.setdefault(url, why)
        return True  # go on with the next shard

    def _close(self, url: str, last: str | None) -> None:
        self.closed.add(url)
        short = self.counts.get(url, 0) - self.seen.get(url, 0)
        if short > 0:
            why = self.errors.get(url, "fewer samples than its marker records")
            self.pending.append(BadSample(url, f"after {last}" if last else "all of them",
                                          f"the tar ends early ({why})", count=short))
        elif url in self.errors:
            self.pending.append(BadSample(url, "tar", f"the tar is damaged ({self.errors[url]})", count=0))

    def count(self, src: Iterator[dict]) -> Iterator[dict]:
        """Pass samples on, counting them per shard; report a shard that ended early."""
        url, last = None, None
        for sample in src:
            u = sample.get("__url__")
            if u != url:
                if url is not None:
                    self._close(url, last)
                url, last = u, None
            for other in [e for e in self.errors if e != url and e not in self.closed]:
                self._close(other, None)
            self.seen[u] = self.seen.get(u, 0) + 1
            last = sample.get("__key__")
            yield sample
        if url is not None:
            self._close(url, last)
        for other in [e for e in self.errors if e not in self.closed]:
            self._close(other, None)

    def decode(self, sample: dict):
        try:
            image, target, key = decode(sample, self.label_key, self.label_kind, self.image_size)
            if self.gt_maps is not None:  # the human map as the target's second channel
                target = torch.cat([target, ground_truth(sample, self.gt_maps, tuple(image.shape[1:]))])
            return image, target, key
        except SampleError as e:
            return BadSample(sample.get("__url__", "?"), sample.get("__key__", "?"), str(e))
        except ForeignLabels as e:
            url = sample.get("__url__", "?")
            return BadSample(url, sample.get("__key__", "?"), f"shard {url} does not belong to its label folder: {e}; "
                             "label the folder again (`pipeline label` with --overwrite)", fatal=True)

    def batch(self, src: Iterator) -> Iterator:
        """Decoded samples → (images [B,3,H,W], labels [B,1,H,W], keys) batches, with every :class:`BadSample`
        passed on as it comes."""
        images, targets, keys = [], [], []
        for item in src:
            yield from self._drain()
            if isinstance(item, BadSample):
                yield item
                continue
            images.append(item[0])
            targets.append(item[1])
            keys.append(item[2])
            if len(keys) == self.batch_size:
                yield torch.stack(images), torch.stack(targets), keys
                images, targets, keys = [], [], []
        yield from self._drain()
        if keys and self.partial:
            yield torch.stack(images), torch.stack(targets), keys

    def _drain(self) -> Iterator[BadSample]:
        while self.pending:
            yield self.pending.pop(0)


class ShardLoader:
    """Batches of a :class:`torch.utils.data.DataLoader` over shards, the unreadable samples among them handed
    to ``bad`` (counted, logged, skipped; a :class:`DataError` beyond its limit)."""

    def __init__(self, loader: torch.utils.data.DataLoader, bad: BadSamples):
        self.loader, self.bad = loader, bad

    def __iter__(self) -> Iterator:
        """The batches; the DataLoader's worker processes start here, at once, not at the first batch (so a
        loader started ahead of its epoch decodes while the previous one ends)."""
        return self._batches(iter(self.loader))

    def _batches(self, items: Iterator) -> Iterator:
        for item in items:
            if isinstance(item, BadSample):
                self.bad.add(item)
                continue
            yield item


def epoch_order(tars, *, seed: int, epoch: int, shuffle: bool) -> list[str]:
    """The shard order of one epoch: a permutation seeded by (seed, epoch), or as given."""
    order = list(tars)
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def node_shards(order: list[str], rank: int, world: int) -> list[str]:
    """The shards node ``rank`` of ``world`` reads from ``order`` (as ``webdataset.split_by_node`` splits)."""
    return order[rank::world]


def shard_loader(labels: LabelSet, tars: list[str], *, batch_size: int, epoch: int = 0, seed: int = 0,
                 shuffle_buffer: int = 0, workers: int = 0, drop_last: bool = False, split_nodes: bool = True,
                 pin_memory: bool = False, counts: Mapping[str, int] | None = None,
                 bad: BadSamples | None = None, gt_maps: str | None = None) -> ShardLoader:
    """Batches over ``tars``: split by node (torch.distributed rank; unless ``split_nodes`` is off) and by
    DataLoader worker, decoded in the workers. ``counts`` (tar -> images, default: from ``labels``) tells a
    tar that ends early; unreadable samples go to ``bad`` (default: up to 10, logged on stderr). With
    ``gt_maps`` (a folder of human saliency maps, :func:`ground_truth`) each target has a second channel, the
    sample's map; a sample without one is a bad sample."""
    order = epoch_order(tars, seed=seed, epoch=epoch, shuffle=bool(shuffle_buffer))
    reader = _Reader(labels, counts if counts is not None else dict(zip(labels.tars, labels.counts)), batch_size,
                     partial=not drop_last, gt_maps=gt_maps)
    ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=wds.split_by_node if split_nodes else _all_shards,
                        workersplitter=wds.split_by_worker, empty_check=False, handler=reader.handler)
    ds = ds.compose(reader.count)
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed * 7_919 + epoch))
    ds = ds.map(reader.decode)
    ds = ds.compose(reader.batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(workers, len(order)),
                                         persistent_workers=False, pin_memory=pin_memory,
                                         # its workers' seeds from (seed, epoch), none drawn from the global RNG:
                                         # starting an epoch's loader early or late changes no result
                                         generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return ShardLoader(loader, bad if bad is not None else BadSamples())
