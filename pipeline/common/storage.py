"""Output folders on object storage (``s3://bucket/prefix`` and any other fsspec URL) next to local ones.

:func:`as_path` gives a :class:`pathlib.Path` for a local folder and a :class:`RemotePath` for a URL; a
``RemotePath`` has the few ``Path`` methods the label driver, its workers and ``verify`` use, read and written
through fsspec. Writes are whole files: a file is written locally first, then uploaded under its final name
(an object store has no rename; an object appears whole or not at all), so the shard protocol holds as it is:
the tar is uploaded, then its marker, last. S3 endpoints and credentials come from the usual variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``…), which Ray's workers inherit.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterator


def is_url(path) -> bool:
    return isinstance(path, RemotePath) or "://" in str(path)


def as_path(path) -> "Path | RemotePath":
    if isinstance(path, RemotePath):
        return path
    text = os.fspath(path) if not isinstance(path, str) else path
    return RemotePath.parse(text) if "://" in text else Path(text)


@dataclass(frozen=True)
class _Stat:
    st_size: int


@dataclass(frozen=True, order=True)
class RemotePath:
    protocol: str
    key: str  # bucket/prefix/…, no leading or trailing slash

    @classmethod
    def parse(cls, url: str) -> "RemotePath":
        protocol, _, rest = url.partition("://")
        return cls(protocol, str(PurePosixPath("/" + rest.strip("/")))[1:])

    @property
    def fs(self):
        import fsspec

        return fsspec.filesystem(self.protocol)

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
        found = [RemotePath(self.protocol, n.strip("/")) for n in names]
        return iter(sorted((p for p in found if fnmatch.fnmatchcase(p.name, pattern)), key=lambda p: p.key))

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
        return self.fs.open(self.key, mode, **kwargs)

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def upload(self, local: str | Path) -> None:
        """Put the local file under this name (whole: the object appears complete or not at all)."""
        self.fs.put_file(str(local), self.key)
        self._invalidate()

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
