"""Output folders on object storage (``s3://bucket/prefix`` and any other fsspec URL) next to local ones.

:func:`as_path` gives a :class:`pathlib.Path` for a local folder and a :class:`RemotePath` for a URL; a
``RemotePath`` has the few ``Path`` methods the label driver, its workers and ``verify`` use, read and written
through fsspec. Writes are whole files: a file is written locally first, then uploaded under its final name
(an object store has no rename; an object appears whole or not at all), so the shard protocol holds as it is:
the tar is uploaded, then its marker, last. S3 endpoints and credentials come from the usual variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``…), which Ray's workers inherit (on a cluster
:func:`pipeline.common.ray_cluster.connect` forwards them).

A training run folder on object storage is a local folder mirrored there (:class:`Mirror`): its files are
downloaded before the run, and after every epoch the files that changed are uploaded, the pointer
(``checkpoints/latest.json``) last, so a reader (or a resume) never sees a pointer to a checkpoint that is not
there yet. A protocol whose fsspec implementation is not installed is one sentence naming the extra to install
(:class:`StorageError`). ``file:///abs/path`` is the local path ``/abs/path`` (its key keeps the leading slash).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterable, Iterator, Mapping

from pipeline.common.files import fsync_dir, temp_name

#: the package each protocol needs, and the extra of this project that installs it
EXTRAS = {"s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


class StorageError(RuntimeError):
    """Object storage cannot be used as asked (its fsspec implementation is not installed…): one sentence."""


#: the storage clients' loggers, kept to warnings (where Ray or Ray Train log at INFO, botocore would say where it
#: found the credentials on every connection)
QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth")


def filesystem(protocol: str):
    """fsspec's filesystem for ``protocol``; :class:`StorageError` naming what to install when it is missing."""
    import logging

    import fsspec

    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)

    try:
        return fsspec.filesystem(protocol)
    except ImportError as e:
        package, extra = EXTRAS.get(protocol, (None, None))
        if extra:
            raise StorageError(f"{protocol}:// paths need the {package} package: pip install "
                               f"'saliency-pipeline[{extra}]' (or pip install {package})") from None
        raise StorageError(f"{protocol}:// paths need fsspec's implementation of {protocol!r}, which is not "
                           f"installed ({e})") from None
    except ValueError as e:  # fsspec knows no such protocol
        raise StorageError(f"{protocol}:// is not a storage protocol fsspec knows ({e})") from None


def check_bucket(path) -> None:
    """An S3 URL's bucket (the first part of its key) exists, or :class:`StorageError`: a misspelt bucket is found
    before any work, not when the first result is uploaded. Only the store's "no such bucket" says so: a refusal
    to say (403: credentials that may write but not list) lets the work go on, and any other error of the store
    (credentials, endpoint) is raised as it is, for its own one line. Local paths, ``file://`` and other stores
    (whose clients turn every error into "not there"): the protocol's package is checked, nothing else."""
    if not is_url(path):
        return
    path = as_path(path)
    fs = path.fs  # (a missing package: its StorageError sentence)
    if path.protocol not in ("s3", "s3a") or not hasattr(fs, "call_s3"):
        return
    bucket = path.key.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:  # s3fs's translation of 404 / NoSuchBucket
        raise StorageError(f"{path}: its bucket {path.protocol}://{bucket} does not exist; create it, or check "
                           "the name") from None
    except PermissionError:  # 403: the write itself will tell
        return


def is_url(path) -> bool:
    return isinstance(path, RemotePath) or "://" in str(path)


def as_path(path) -> "Path | RemotePath":
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path) if not isinstance(path, str) else path
    return RemotePath.parse(text) if "://" in text else Path(text)


def file_path(url: str) -> str | None:
    """The local path a ``file://`` URL names (``file:///abs/x``, and ``file://localhost/abs/x`` as RFC 8089
    has it: ``/abs/x``; ``file://rel/x``: ``rel/x``, as fsspec reads it), or None for any other text. The one
    reading of a ``file://`` URL: every option, a manifest's workdir and a resumed run's recorded settings use it."""
    protocol, sep, rest = str(url).partition("://")
    if not sep or protocol not in LOCAL_PROTOCOLS:
        return None
    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    return str(PurePosixPath(rest)) if rest else "."


def local_place(path) -> Path | None:
    """The local filesystem path that ``path`` names (a plain path, or a ``file://`` URL: :func:`file_path`), or
    None for a place on object storage."""
    if isinstance(path, RemotePath):
        return Path(path.key) if path.protocol in LOCAL_PROTOCOLS else None
    text = os.fspath(path) if not isinstance(path, str) else path
    if "://" not in text:
        return Path(text)
    local = file_path(text)
    return None if local is None else Path(local)


#: what object stores report about an object's content, most specific first (S3, GCS, Azure, others)
CONTENT_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5", "checksum")
MODIFIED = ("LastModified", "last_modified", "updated", "mtime", "modified", "created")


def content_tag(info: Mapping) -> str:
    """An object's checksum as its store reports it (``ETag=…``), else its modification time; "" if neither."""
    for key in (*CONTENT_TAGS, *MODIFIED):
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}={str(value).strip(chr(34))}"
    return ""


@dataclass(frozen=True)
class _Stat:
    st_size: int


#: protocols whose keys are absolute local paths (``file:///data/x``: the key keeps its leading slash)
LOCAL_PROTOCOLS = ("file", "local")


@dataclass(frozen=True, order=True)
class RemotePath:
    protocol: str
    key: str  # bucket/prefix/…, no trailing slash, no leading one but for a local path (file:///data/x)

    @classmethod
    def parse(cls, url: str) -> "RemotePath":
        """``protocol://key``; for an object store (s3, gs), a ``?`` (its client cuts the key there: every file
        would be written over one object) or credentials before the bucket (``key:secret@bucket``, never read
        from a URL) are a :class:`StorageError`, which does not repeat the URL."""
        protocol, _, rest = url.partition("://")
        if protocol in EXTRAS:
            if "@" in rest.split("/", 1)[0]:
                raise StorageError(f"a {protocol}:// URL with credentials before its bucket (user:secret@bucket): "
                                   "they are not read from a URL; give the bucket alone and set AWS_ACCESS_KEY_ID "
                                   "and AWS_SECRET_ACCESS_KEY (or GOOGLE_APPLICATION_CREDENTIALS), or the "
                                   "provider's config files")
            if "?" in rest:
                raise StorageError(f"{protocol}://{rest.split('?', 1)[0]}?…: a '?' in an object-storage URL may "
                                   "be read as the start of a query, not part of a name (s3fs reads '?versionId=' "
                                   "so: every file would be written over one object); name the prefix without it")
        if protocol in LOCAL_PROTOCOLS:  # (file://rel/x: relative, as fsspec reads it; the key is absolute)
            rest = os.path.abspath(file_path(url))
        return cls.of(protocol, rest)

    @classmethod
    def of(cls, protocol: str, key: str) -> "RemotePath":
        """``key`` as fsspec lists it (``bucket/a/``, ``/data/x``) normalised: ``a//b/`` → ``a/b``."""
        key = str(PurePosixPath("/" + key.strip("/")))
        return cls(protocol, key if protocol in LOCAL_PROTOCOLS else key[1:])

    @property
    def fs(self):
        return filesystem(self.protocol)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __truediv__(self, other) -> "RemotePath":
        return RemotePath(self.protocol, f"{self.key}/{str(other).strip('/')}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.protocol, str(PurePosixPath(self.key).parent))

    @property
    def parents(self) -> list:
        return []  # an object store has no files in the way of a folder

    def _invalidate(self) -> None:
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.key)
            self.fs.invalidate_cache(str(PurePosixPath(self.key).parent))

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def forget_listings(self) -> "RemotePath":
        """This path, with every listing fsspec cached dropped: what another process wrote since is seen."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()
        return self

    def is_dir(self) -> bool:
        return not self.fs.isfile(self.key)  # a prefix is a folder, whether or not objects are under it yet

    def stat(self) -> _Stat:
        return _Stat(int(self.fs.size(self.key)))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass  # prefixes need no creating

    def glob(self, pattern: str) -> Iterator["RemotePath"]:
        self._invalidate()
        try:
            names = self.fs.ls(self.key, detail=False, refresh=True)
        except FileNotFoundError:
            return iter([])
        found = [RemotePath.of(self.protocol, n) for n in names]
        return iter(sorted((p for p in found if fnmatch.fnmatchcase(p.name, pattern)), key=lambda p: p.key))

    def versions(self, pattern: str) -> dict[str, str]:
        """The objects directly under this prefix whose names match ``pattern``: name → what the store says of
        that version of it (its checksum and modification time, the store's own clock): a rewrite changes it."""
        self._invalidate()
        try:
            found = self.fs.ls(self.key, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in found:
            name = PurePosixPath(str(info.get("name", ""))).name
            if info.get("type", "file") == "file" and fnmatch.fnmatchcase(name, pattern):
                out[name] = " ".join(str(info.get(k)) for k in (*CONTENT_TAGS, *MODIFIED) if info.get(k) is not None)
        return out

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._invalidate()

    def open(self, mode: str = "r", **kwargs) -> IO:
        if any(c in mode for c in "wax+"):
            raise ValueError("write a RemotePath with upload() or atomic_open, not open()")
        self._invalidate()  # (s3fs answers from a listing cached before another writer replaced the object)
        return self.fs.open(self.key, mode, **kwargs)

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def upload(self, local: str | Path) -> None:
        """Put the local file under this name (whole: the object appears complete or not at all)."""
        if self.protocol in LOCAL_PROTOCOLS:  # a local file (file:///…): copied beside it, synced, renamed
            import shutil

            final = Path(self.key)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(final)  # unique to this writer, its name cut to fit as every temp file's
            try:
                shutil.copyfile(local, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                Path(tmp).unlink(missing_ok=True)
            fsync_dir(final.parent)  # the rename itself
        else:
            self.fs.put_file(str(local), self.key)
        self._invalidate()

    def version(self) -> tuple[int, str]:
        """(size, content tag) of this object as the store says now, in one request (:func:`content_tag`: a
        rewrite changes the tag); FileNotFoundError when it is not there."""
        self._invalidate()
        info = self.fs.info(self.key)
        return int(info.get("size") or 0), content_tag(info)

    def download(self, local: str | Path) -> None:
        self.fs.get_file(self.key, str(local))

    def files(self) -> list["RemotePath"]:
        """Every object under this prefix (recursively), sorted."""
        self.forget_listings()  # all of it: listings of sub-prefixes are cached too
        try:
            found = self.fs.find(self.key)
        except FileNotFoundError:
            return []
        return sorted(p for p in (RemotePath.of(self.protocol, k) for k in found) if p != self)

    def listing(self) -> list[tuple[str, int, str]] | None:
        """What the store says of this object, or of every object under this prefix, without reading them:
        ``(relative name, size, content tag)`` sorted (the name is ``""`` for an object); None when nothing is
        there. The tag is the store's checksum (S3's ETag, GCS's md5 or crc32c), else its modification time."""
        self.forget_listings()
        try:
            found = self.fs.find(self.key, detail=True)
        except FileNotFoundError:
            return None
        base = PurePosixPath(self.key.rstrip("/"))
        rows = []
        for key, info in found.items():
            rel = "" if PurePosixPath(key) == base else str(PurePosixPath(key).relative_to(base))
            rows.append((rel, int(info.get("size") or 0), content_tag(info)))
        return sorted(rows) or None

    def relative_to(self, other: "RemotePath") -> str:
        return str(PurePosixPath(self.key).relative_to(other.key))

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """This object downloaded to a temporary local file (removed after)."""
        fd, tmp = tempfile.mkstemp(suffix=PurePosixPath(self.key).suffix)
        os.close(fd)
        try:
            self.fs.get_file(self.key, tmp)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)


@contextlib.contextmanager
def local_file(path) -> Iterator[Path]:
    """``path`` as a local file (a remote one downloaded for the duration)."""
    path = as_path(path)
    if isinstance(path, RemotePath):
        with path.local_copy() as local:
            yield local
    else:
        yield path


@contextlib.contextmanager
def staged(final) -> Iterator[Path]:
    """A temporary local file to write the object ``final`` through, uploaded under its name on success
    (:func:`pipeline.common.atomic.atomic_path` uses it for remote paths)."""
    fd, tmp = tempfile.mkstemp(suffix=PurePosixPath(final.key).suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        final.upload(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)


class Mirror:
    """A local folder mirrored to the folder ``remote`` on object storage (a training run folder).

    :meth:`pull` downloads what ``remote`` holds (names with a component starting with ``.`` stay behind: locks,
    Ray's own files); :meth:`push` uploads the local files that changed since the last pull or push, the names in
    ``last`` after all the others, then removes the remote files of ``prune`` patterns that are gone locally (old
    checkpoints): at any moment the remote folder is an earlier state of the local one plus whole new files, and
    its pointer files name only files that are there."""

    def __init__(self, remote: RemotePath, local: Path, last: Iterable[str] = (), prune: Iterable[str] = ()):
        self.remote, self.local = remote, Path(local)
        self.last, self.prune = tuple(last), tuple(prune)
        self.seen: dict[str, tuple[int, int]] = {}

    @staticmethod
    def _hidden(rel: str) -> bool:
        return any(part.startswith(".") for part in PurePosixPath(rel).parts)

    def _state(self, path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_mtime_ns, st.st_size

    def pull(self) -> int:
        """Download the remote folder's files into the local folder; returns how many."""
        n = 0
        for obj in self.remote.files():
            rel = obj.relative_to(self.remote)
            if self._hidden(rel):
                continue
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            obj.download(target)
            self.seen[rel] = self._state(target)
            n += 1
        return n

    def remove(self, patterns: Iterable[str]) -> None:
        """Delete the remote files (and local ones) matching ``patterns`` (paths relative to the folder)."""
        patterns = tuple(patterns)
        # the pointers first: no moment where one names a file already deleted
        for obj in sorted(self.remote.files(), key=lambda o: o.relative_to(self.remote) not in self.last):
            rel = obj.relative_to(self.remote)
            if any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                obj.unlink(missing_ok=True)
        for p in patterns:
            for path in self.local.glob(p):
                if path.is_file():
                    path.unlink()
                self.seen.pop(str(path.relative_to(self.local)), None)

    def push(self) -> int:
        """Upload what changed locally (``last`` last), then prune; returns how many files were uploaded."""
        changed = []
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            if self._hidden(rel) or self.seen.get(rel) == self._state(path):
                continue
            changed.append(rel)
        changed.sort(key=lambda rel: rel in self.last)
        for rel in changed:
            path = self.local / rel
            state = self._state(path)
            (self.remote / rel).upload(path)
            self.seen[rel] = state
        if self.prune:
            here = {p.relative_to(self.local).as_posix() for p in self.local.rglob("*") if p.is_file()}
            for obj in self.remote.files():
                rel = obj.relative_to(self.remote)
                if rel not in here and any(fnmatch.fnmatchcase(rel, p) for p in self.prune):
                    obj.unlink(missing_ok=True)
                    self.seen.pop(rel, None)
        return len(changed)
