"""Shard files: one WebDataset tar per shard plus a ``shard-NNNNNN.json`` completion marker.

Protocol (a file format; bump :data:`ENCODING_VERSION` when it changes):

1. the tar is written by ``webdataset.TarWriter`` to a hidden temp name (its sha256 computed from the bytes
   as they are written), fsynced, renamed;
2. the marker json (count, keys, failures, the plan's keys in order, sha256 of the tar, teacher,
   weights digest, timings)
   is written last, atomically. A shard is finished only when its marker exists and the tar's
   sha256 matches it, so a SIGKILL at any moment leaves either nothing or a shard to redo.

Tar members are written with a fixed mtime, so the same samples always give the same bytes. It is the integer 0:
Python's tarfile gives a float mtime a pax header of its own, 1 KiB more per member and a third more time
writing it (tars written before stop 16 have them; readers take either).
:class:`ShardWriter` writes one tar; :class:`TarStream` drives it from a thread of its own (the worker's writer).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import re
import tarfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds
from webdataset.writer import make_encoder

from pipeline.common.atomic import atomic_open, write_json
from pipeline.common.storage import RemotePath, as_path, local_file, local_place
from pipeline.label.config import recorded_settings

#: version of the sample layout (keys, label encodings, sample json); recorded in every marker
ENCODING_VERSION = 1
MARKER_FORMAT = "saliency-pipeline shard"


#: the name of every tar a label folder holds (its index and markers name no other)
SHARD_TAR = re.compile(r"shard-\d{6}\.tar")


def tar_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.tar"


def marker_path(folder: Path, name: str) -> Path:
    return folder / f"{name}.json"


#: a sample as ``webdataset.TarWriter`` encodes it (bytes pass through unchanged, so encoding early and
#: writing later gives the same tar)
encode_sample = make_encoder(True)


class _Hashing:
    """A write-only file that hashes and counts what goes through it: the tar's sha256 and size are
    known when its last byte is written (and :meth:`flush` called), without reading it back.

    Writes are gathered up to :attr:`CHUNK` bytes and then hashed and written at once: the tar writer hands
    over a few kilobytes at a time, and each hash update and file write of that size lets go of the
    interpreter lock and must take it back, which the writing thread waits for behind the decode and encode
    threads (on 2 busy cores, labelling 1024 images in about 2 s spent 1.1–1.3 s writing their tars that way,
    0.4–0.5 s gathered)."""

    CHUNK = 1 << 20

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0
        self.pending = bytearray()

    def write(self, data) -> int:
        if self.f is None:  # discarded: the tar writer's last flush (on garbage collection) goes nowhere
            return len(data)
        self.pending += data
        self.size += len(data)
        if len(self.pending) >= self.CHUNK:
            self._write_pending()
        return len(data)

    def _write_pending(self) -> None:
        if self.pending:
            self.sha256.update(self.pending)
            self.f.write(self.pending)
            self.pending = bytearray()

    def flush(self) -> None:
        if self.f is not None:
            self._write_pending()
            self.f.flush()


class _Abort(Exception):
    pass


class ShardWriter:
    """``<name>.tar`` written sample by sample (temp name, hashed on the way), then renamed and its marker
    written by :meth:`finish`; :meth:`abort` leaves no trace of it. An older shard of ``name`` stays whole
    until the new tar is complete: its marker is removed just before the rename (it must not outlive its tar),
    so an interrupted rewrite (``--retry-failed``) keeps the finished shard it was rewriting."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name, self.final = folder, name, tar_path(folder, name)
        self._files = contextlib.ExitStack()
        self._file = _Hashing(None)
        self._file.f = self._files.enter_context(atomic_open(self.final, "wb"))
        try:
            self._tar = wds.TarWriter(self._file, mtime=0, user="", group="")
        except BaseException:
            self.abort()
            raise

    def write(self, sample: dict) -> None:
        self._tar.write(sample)

    def finish(self, marker: dict) -> dict:
        """Close the tar (fsync, rename), then write the marker; returns the marker as written."""
        try:
            self._tar.close()
            self._file.flush()  # the last gathered bytes: hashed and written
        except BaseException:
            self.abort()
            raise
        marker_path(self.folder, self.name).unlink(missing_ok=True)  # the old shard's, before its tar goes
        self._files.close()  # atomic_open: fsync, rename, fsync the folder
        stored = {}
        if isinstance(self.final, RemotePath):  # the version of the object the store now holds: a resume that
            _, tag = self.final.version()      # finds it unchanged need not download the tar to hash it again
            stored = {"store_tag": tag} if tag else {}
        marker = {
            "format": MARKER_FORMAT,
            "encoding_version": ENCODING_VERSION,
            "shard": self.name,
            "tar": self.final.name,
            **marker,
            "sha256": self._file.sha256.hexdigest(),
            "bytes": self._file.size,
            **stored,
        }
        write_json(marker_path(self.folder, self.name), marker)
        return marker

    def abort(self) -> None:
        """Remove the temp file (nothing is renamed, no marker written)."""
        with contextlib.suppress(_Abort):
            self._files.__exit__(_Abort, _Abort(), None)
        self._file.f = None


def write_shard(folder: Path, name: str, samples: Iterable[dict], marker: dict) -> dict:
    """Write ``samples`` as ``<name>.tar`` then the marker; returns the marker as written."""
    writer = ShardWriter(folder, name)
    try:
        for sample in samples:
            writer.write(sample)
    except BaseException:
        writer.abort()
        raise
    return writer.finish(marker)


#: a marker's record of each labelled image's source (key → value): its size in bytes, its modification time
#: (ns) and its content's digest (``images.content_digest``); markers before stop 24 hold sizes alone
SOURCE_FIELDS = ("sizes", "mtimes", "blake2b")


def digest(path) -> str:
    """sha256 (hex) of a local or remote file, streamed."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tar_samples(path: str | Path) -> Iterator[dict]:
    """The samples of a shard tar in file order, as written: ``{"__key__": key, ext: raw bytes, …}``.

    Members are grouped the way webdataset groups them (the key is the name up to its first dot);
    a key that comes back after other keys starts a new sample, so a mangled tar shows up as such.
    """
    sample: dict | None = None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"{path}: member {member.name!r} is not a regular file")
            key, dot, ext = member.name.partition(".")
            if not dot or not ext:
                raise ValueError(f"{path}: member {member.name!r} has no extension")
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if ext in sample:
                raise ValueError(f"{path}: member {member.name!r} appears twice")
            sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def read_samples(path: str | Path) -> dict[str, dict]:
    """Every sample of a shard tar by key, as :func:`tar_samples` reads them (written back by
    :func:`write_shard`, they give the same bytes)."""
    out: dict[str, dict] = {}
    with local_file(path) as local:
        for sample in tar_samples(local):
            if sample["__key__"] in out:
                raise ValueError(f"{path}: key {sample['__key__']!r} appears in two places")
            out[sample["__key__"]] = sample
    return out


def planned_keys(marker: dict) -> list[str]:
    """The keys a shard's plan held, in plan order; markers written before ``planned_keys`` was
    recorded give their labelled keys then their failed ones (the same set, maybe another order)."""
    if isinstance(marker.get("planned_keys"), list):
        return list(marker["planned_keys"])
    return list(marker.get("keys", [])) + [f["key"] for f in marker.get("failures", [])]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_keys(value) -> bool:
    return isinstance(value, list) and all(isinstance(k, str) for k in value)


def marker_problem(marker) -> str:
    """"" when ``marker`` has the shape :meth:`ShardWriter.finish` writes, in the fields resume, ``verify`` and
    training read; else what is wrong (a marker edited by hand is an unfinished shard, never a crash)."""
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return "not a shard marker"
    for key in ("index", "planned", "count", "bytes"):
        if not _is_count(marker.get(key)):
            return f"its {key} is {marker.get(key)!r}, not a count"
    for key in ("tar", "sha256"):
        if not isinstance(marker.get(key), str):
            return f"its {key} is {marker.get(key)!r}, not a string"
    if marker["tar"] != f"shard-{marker['index']:06d}.tar":  # (a path elsewhere would be read, and indexed, as its tar)
        return f"its tar is {marker['tar'][:60]!r}, not shard-{marker['index']:06d}.tar"
    if not _is_keys(marker.get("keys")) or not _is_keys(marker.get("planned_keys", [])):
        return "its keys are not a list of sample keys"
    failures = marker.get("failures")
    if not isinstance(failures, list) or not all(
            isinstance(f, dict) and all(isinstance(f.get(k), str) for k in ("key", "file", "reason"))
            for f in failures):
        return "its failures are not a list of {key, file, reason}"
    sizes = marker.get("sizes", {})  # (markers before stop 14 have none)
    if not isinstance(sizes, dict) or not all(isinstance(k, str) and _is_count(v) for k, v in sizes.items()):
        return "its sizes are not a map of sample key to bytes"
    mtimes = marker.get("mtimes", {})  # (nor these, before stop 24)
    if not isinstance(mtimes, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in mtimes.items()):
        return "its mtimes are not a map of sample key to nanoseconds"
    contents = marker.get("blake2b", {})
    if not isinstance(contents, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in contents.items()):
        return "its blake2b digests are not a map of sample key to hex"
    return ""


def index_problem(index) -> str:
    """"" when ``index`` has the shape of the ``labels.json`` :func:`pipeline label` writes, in its shard
    list (the part every reader walks), else what is wrong."""
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        return "not a labels.json index (no shard list)"
    size = index.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_count(v) and v > 0 for v in size)):
        return f"its image_size is {size!r}, not [height, width]"
    for entry in index["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("tar"), str) and isinstance(entry.get("sha256"), str)
                and _is_count(entry.get("count"))):
            return f"its shard list holds {str(entry)[:60]!r}, not a {{tar, count, sha256}} entry"
        if not SHARD_TAR.fullmatch(entry["tar"]):  # webdataset would run a name like `pipe:…` as a shell command
            return f"its shard list names {entry['tar'][:60]!r}, not a shard-NNNNNN.tar of the folder"
    if not _is_count(index.get("count")):
        return f"its count is {index.get('count')!r}, not a count"
    return ""


def read_marker(folder: Path, name: str) -> dict | None:
    """The shard's marker, or None when there is none or it is not a whole marker (see :func:`marker_problem`)."""
    try:
        with marker_path(folder, name).open() as f:
            marker = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return None if marker_problem(marker) else marker


def settings_difference(marker: dict, expect: dict) -> str:
    """"" when the marker records the settings in ``expect``; else which one differs, and how."""
    recorded = recorded_settings(marker)  # (older markers have their decode path from their settings)
    for key, want in expect.items():
        if key not in recorded:  # a marker written before this setting was recorded: made with unknown settings
            return f"{key} differs (the shard records none: it was written by an older version; this run {want!r})"
        if recorded[key] != want:
            return f"{key} differs (shard has {recorded[key]!r}, this run {want!r})"
    return ""


def verify_shard(folder: Path, name: str, expect: dict, check_digest: bool = True,
                 marker: dict | None = None, trust_store: bool = False,
                 listed: dict[str, tuple[int, str]] | None = None) -> tuple[dict | None, str]:
    """(marker, "") when the shard is finished with the settings in ``expect``; else (marker or None, reason).
    ``marker``: the shard's marker as the caller has just read it (else it is read here). ``trust_store``: a tar
    on object storage whose version (size and the store's checksum or modification time) is the one its
    marker recorded when it was uploaded is not downloaded and hashed again (a label run's resume; `pipeline
    verify` hashes every tar). ``listed``: the folder's tars on object storage as :func:`store_versions` has
    just listed them (else the store is asked for this one)."""
    marker = read_marker(folder, name) if marker is None else marker
    if marker is None:
        return None, "no marker (or one not in the shape `pipeline label` writes)"
    differs = settings_difference(marker, expect)
    if differs:
        return marker, differs
    tar = tar_path(folder, name)
    if isinstance(tar, RemotePath):
        if listed is not None:
            size, tag = listed.get(tar.name, (None, ""))
        else:
            try:
                size, tag = tar.version()
            except FileNotFoundError:
                size, tag = None, ""
        if size != marker.get("bytes"):
            return marker, "tar missing or of the wrong size"
        if trust_store and tag and tag == marker.get("store_tag"):
            return marker, ""
    elif not tar.is_file() or tar.stat().st_size != marker.get("bytes"):
        return marker, "tar missing or of the wrong size"
    if check_digest and digest(tar) != marker.get("sha256"):
        return marker, "tar checksum does not match its marker"
    return marker, ""


def store_versions(folder) -> dict[str, tuple[int, str]] | None:
    """The tars directly in a label folder on object storage, by name: (size, content tag), from one listing of
    the prefix (not one request per shard); None for a local folder."""
    if not isinstance(folder, RemotePath):
        return None
    return {rel: (size, tag) for rel, size, tag in folder.listing() or []
            if "/" not in rel and rel.endswith(".tar")}


def enclosing_label_folder(path) -> Path | None:
    """The label folder (one holding the ``labels.json`` index `pipeline label` writes, or the first shard's marker
    of one being written) that the local ``path`` (or ``file://`` URL) is or lies in, else None: no other
    command's files belong there. (A ``labels.json`` of another shape, e.g. a project's list of classes, makes no
    label folder.)"""
    def index(folder: Path):
        try:
            return json.loads((folder / "labels.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return None

    local = local_place(path)  # (a file:// URL is a local path too; object storage has no label folders above)
    if local is None:
        return None
    path = local.resolve()
    for folder in (path, *path.parents):
        if not folder.is_dir():  # (not there yet, or a file)
            continue
        if read_marker(folder, "shard-000000") is not None or (
                (folder / "labels.json").is_file() and not index_problem(index(folder))):
            return folder
    return None


def shard_tars(folder: str | Path) -> list[str]:
    """Finished shard tars of a labelled folder (marker present), sorted: input for a WebDataset reader."""
    folder = as_path(folder)
    return [str(tar_path(folder, p.stem)) for p in sorted(folder.glob("shard-*.json")) if read_marker(folder, p.stem)]


def folders_below(folder) -> str:
    """For a folder that is no label folder: the label folders one or two levels below it (``pipeline label``
    writes ``<out>/<teacher>/<split>``) as a clause to end a message with, or ""."""
    if isinstance(folder, RemotePath):  # the store lists the keys that match, level by level
        found = [RemotePath.of(folder.protocol, k) for pattern in ("*/labels.json", "*/*/labels.json")
                 for k in folder.fs.glob(f"{folder.key}/{pattern}")]
    else:
        found = [*folder.glob("*/labels.json"), *folder.glob("*/*/labels.json")]
    below = sorted(str(p.parent) for p in found)
    if not below:
        return ""
    return (f"; label folders below it: {', '.join(below[:3])}{' …' if len(below) > 3 else ''} (give one of "
            "those: `pipeline label` writes <out>/<teacher>/<split>)")


def verify_dataset(folder: str | Path, check_digest: bool = True) -> str:
    """"" when ``folder`` holds a finished labelled dataset (``labels.json`` and every shard intact), else why not."""
    folder = as_path(folder)
    try:
        index = json.loads((folder / "labels.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return f"{folder}/labels.json missing or unreadable (labelling not finished)"
    if index_problem(index):
        return f"{folder}/labels.json: {index_problem(index)}"
    for shard in index["shards"]:
        name = Path(shard["tar"]).stem
        _, reason = verify_shard(folder, name, {"sha256": shard["sha256"]}, check_digest=check_digest)
        if reason:
            return f"{folder / name}: {reason}"
    return ""


_END, _ABORT = object(), object()


class TarStream:
    """The shard's tar, written on its own thread as samples come, in the order they are put (a sample, a
    list of samples, or a :class:`Future` of either, waited for). Started by the first :meth:`put`, so a shard that writes nothing
    opens no file; at most ``depth`` samples wait in its queue (the producer blocks beyond that). ``writer``
    makes the :class:`ShardWriter` (a parameter so that tests can hand in a failing one)."""

    def __init__(self, folder: Path, name: str, depth: int, writer: Callable[[Path, str], ShardWriter] | None = None):
        self.folder, self.name = folder, name
        self.make_writer = writer or ShardWriter
        self.queue: queue.Queue = queue.Queue(max(1, depth))
        self.thread: threading.Thread | None = None
        self.writer: ShardWriter | None = None
        self.error: BaseException | None = None
        self._aborted = False  # the writer's temp file removed
        #: seconds: the producer blocked on a full queue; the writer thread waiting for encoded samples, writing
        self.seconds = {"wait_tar_queue_s": 0.0, "tar_wait_encoded_s": 0.0, "tar_write_s": 0.0}

    def _start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name=f"label-tar-{self.name}", daemon=True)
            self.thread.start()

    def put(self, sample: dict | Future) -> None:
        if self.error is not None:
            raise self.error
        self._start()
        t = time.perf_counter()
        self.queue.put(sample)
        self.seconds["wait_tar_queue_s"] += time.perf_counter() - t

    def _run(self) -> None:
        try:
            self.writer = self.make_writer(self.folder, self.name)
        except BaseException as e:  # noqa: BLE001 - handed to the producer
            self.error = e
        while True:
            entry = self.queue.get()
            if entry is _END or entry is _ABORT:
                break
            if self.error is not None:  # keep draining so the producer never blocks on a dead writer
                if isinstance(entry, Future):
                    entry.cancel()
                continue
            try:
                t = time.perf_counter()
                samples = entry.result() if isinstance(entry, Future) else entry
                t1 = time.perf_counter()
                for sample in samples if isinstance(samples, list) else (samples,):
                    self.writer.write(sample)
                self.seconds["tar_wait_encoded_s"] += t1 - t
                self.seconds["tar_write_s"] += time.perf_counter() - t1
            except BaseException as e:  # noqa: BLE001 - handed to the producer
                self.error = e
        if self.writer is not None and (entry is _ABORT or self.error is not None):
            self.writer.abort()
            self._aborted = True

    def drain(self) -> None:
        """Wait until every sample put is in the tar; raise what went wrong on the writer thread."""
        self._start()
        self.queue.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop, and leave no temp file behind (also when the writer thread has ended: interrupted in
        :meth:`drain`, after its end was queued, the temp tar was left for the next run to remove)."""
        if self.thread is not None and self.thread.is_alive():
            self.queue.put(_ABORT)
            self.thread.join()
        if self.writer is not None and not self._aborted:
            self._aborted = True
            self.writer.abort()
