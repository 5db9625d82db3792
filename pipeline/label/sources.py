"""Image sources (a COCO tree, a folder of images) and the deterministic shard plan.

A source is a sorted list of :class:`ImageRecord`; :func:`plan_shards` cuts it into fixed-size
shards, so the same input always gives the same shards and the same keys.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.common.locks import LOCK_NAME, read_holder
from pipeline.common.tables import plural
from pipeline.label.shards import index_problem

#: what a folder source reads (.jpe and .jfif: JPEGs under other names; OpenCV decodes the bytes, whatever the name)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SourceError(Exception):
    """The source cannot be read at all (raised before any work starts)."""


@dataclass(frozen=True)
class ImageRecord:
    key: str  # the WebDataset sample key: no dots, stable
    source_id: int | str  # COCO image id, or the file's path relative to the folder
    path: str  # absolute path of the image file
    height: int | None = None  # as listed by the source (None when unknown before decoding)
    width: int | None = None
    root: str | None = None  # the folder the file must resolve inside when read (None: anywhere)


@dataclass(frozen=True)
class ShardPlan:
    index: int
    records: tuple[ImageRecord, ...]

    @property
    def name(self) -> str:
        return shard_name(self.index)

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def coco_key(image_id: int) -> str:
    """COCO ids zero-padded to 12 digits, as in COCO's own file names."""
    return f"{int(image_id):012d}"


def coco_splits(root: Path) -> list[str]:
    """Splits that have an annotation file under ``root/annotations``."""
    names = set()
    for p in (root / "annotations").glob("*.json"):
        m = re.fullmatch(r"(?:instances|image_info)_(.+)\.json", p.name)
        if m:
            names.add(m.group(1))
    return sorted(names)


def coco_annotation_file(root: Path, split: str) -> Path:
    for stem in (f"instances_{split}", f"image_info_{split}"):
        path = root / "annotations" / f"{stem}.json"
        if path.is_file():
            return path
    known = coco_splits(root)
    hint = f"splits found: {', '.join(known)}" if known else "no annotations/instances_*.json or image_info_*.json found"
    raise SourceError(
        f"no annotation file for split {split!r} under {root / 'annotations'} "
        f"(looked for instances_{split}.json and image_info_{split}.json; {hint})"
    )


def inside(real: str, root: str) -> bool:
    """Whether the resolved path ``real`` (``os.path.realpath``: ``..`` and symlinks followed; a symlink loop as
    far as it goes, not an error: reading it is that image's failure) lies under the resolved folder ``root``
    (strings: COCO's 118,287 images resolved the root, and each path twice, per image)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _entries(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_coco_images(ann: Path, images: list) -> None:
    """Every image entry has an integer id, seen once, and a file name (checked before pycocotools,
    which silently keeps the last of two entries with the same id)."""
    if not isinstance(images, list):
        raise SourceError(f"{ann}: 'images' is not a list")
    bad, names, seen = [], [], {}
    for n, info in enumerate(images):
        if not isinstance(info, dict):
            bad.append(f"#{n} ({info!r:.40})")
            continue
        image_id = info.get("id")
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            bad.append(f"#{n} (id {image_id!r:.40}, file_name {info.get('file_name')!r:.60})")
            continue
        seen.setdefault(image_id, []).append(n)
        if not isinstance(info.get("file_name"), str) or not info["file_name"]:
            names.append(f"#{n} (id {image_id})")
    if bad:
        raise SourceError(f"{ann}: image ids must be integers; entries {_entries(bad)} are not")
    dupes = [f"{i} (entries {', '.join(f'#{n}' for n in ns)})" for i, ns in seen.items() if len(ns) > 1]
    if dupes:
        raise SourceError(f"{ann}: image ids must be unique; duplicated: {_entries(dupes)}")
    if names:
        raise SourceError(f"{ann}: image entries without a file_name: {_entries(names)}")


def coco_records(root: str | Path, split: str, allow_outside_root: bool = False) -> list[ImageRecord]:
    """Images of one COCO split, read with pycocotools, sorted by image id.

    Image ids must be unique integers. Every ``file_name`` must resolve inside ``<root>/<split>``
    (no ``..``, no absolute path, no symlink leading out) unless ``allow_outside_root``.
    """
    from pycocotools.coco import COCO

    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"COCO root is not a directory: {root}")
    ann = coco_annotation_file(root, split)
    image_dir = root / split
    if not image_dir.is_dir():
        raise SourceError(f"image folder for split {split!r} not found: {image_dir}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco = COCO(str(ann))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError, AssertionError,
            RecursionError) as e:  # (RecursionError: JSON nested beyond Python's stack)
        raise SourceError(f"cannot read COCO annotation file {ann}: {type(e).__name__}: {e}") from e
    _check_coco_images(ann, coco.dataset.get("images", []))
    image_root = image_dir.resolve()
    root_text = str(image_root)
    records, outside = [], []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        # resolved once (a symlink loop: as far as it goes; reading it is that image's failure)
        real = os.path.realpath(image_dir / info["file_name"])
        if not allow_outside_root and (Path(info["file_name"]).is_absolute() or not inside(real, root_text)):
            outside.append(f"id {image_id} ({info['file_name']!r})")
            continue
        records.append(
            ImageRecord(
                key=coco_key(image_id),
                source_id=int(image_id),
                path=real,
                height=info.get("height"),
                width=info.get("width"),
                root=None if allow_outside_root else str(image_root),
            )
        )
    if outside:
        raise SourceError(f"{ann}: file_name outside the image folder {image_dir} for {_entries(outside)}; "
                          "use --allow-outside-root to label them anyway")
    if not records:
        raise SourceError(f"{ann} lists no images")
    return records


def folder_key(relative: str) -> str:
    """A stable key from a relative path without its suffix: path separators become '__', every character but
    letters, digits and combining marks (of any script: 東京.jpg is 東京, हिंदी.jpg हिंदी), '_' and '-' becomes '_'
    (no dot: webdataset splits a member's name at its first). A path with combining marks is first composed
    (NFC): a decomposed é (as macOS writes names) is the key of a composed one. A path without them is taken as
    it is (its key is the one it always had)."""
    if any(unicodedata.category(c).startswith("M") for c in relative):
        relative = unicodedata.normalize("NFC", relative)
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[^\w-]", lambda m: m[0] if unicodedata.category(m[0]).startswith("M") else "_",
                  stem.replace("/", "__"))


def hidden(name: str) -> bool:
    """Whether a file or folder of that name is left out of a folder source: a name starting with '.' (macOS's
    ``._x.jpg`` resource forks, ``.DS_Store``, ``.thumbnails/``…), or Synology's ``@eaDir`` folders (thumbnails)."""
    return name.startswith(".") or name == "@eaDir"


def folder_records(folder: str | Path, allow_outside_root: bool = False,
                   exclude: Iterable[str | Path] = (), keys: bool = True,
                   others: list[str] | None = None) -> list[ImageRecord]:
    """Every image file under ``folder`` (recursively), sorted by relative path, leaving out what lies in the
    folders ``exclude`` (a run's outputs, when they are inside ``folder``: its previews and maps are not inputs)
    and the :func:`hidden` files and folders. ``others``, when given, receives the relative paths of the files left
    out for their suffix, of the hidden files and folders (the outermost; a folder with a trailing ``/``), and of
    the symlinked folders, which are not followed (each with a trailing ``/``), sorted.

    Every entry with an image suffix that is not a folder is listed: a symlink that leads out of ``folder``
    (unless ``allow_outside_root``), a broken one, a FIFO or a device become per-image failures when read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "not found"
        raise SourceError(f"image folder {what}: {folder}")
    base = folder.resolve()
    skip = [Path(e).resolve().relative_to(base).parts for e in exclude if Path(e).resolve().is_relative_to(base)]
    files, other, concealed = [], [], set()
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(rel.parts[:len(s)] == s for s in skip):
            continue
        top = next((i for i, part in enumerate(rel.parts) if hidden(part)), None)
        if top is not None:  # (said once, by its outermost hidden part)
            inside = top < len(rel.parts) - 1
            concealed.add("/".join(rel.parts[:top + 1]) + ("/" if inside or p.is_dir() else ""))
        elif p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir():
            files.append(rel.as_posix())
        elif p.is_symlink() and p.is_dir():  # not followed (rglob does not descend into it): said, not silent
            other.append(rel.as_posix() + "/")
        elif others is not None and not p.is_dir() and p.suffix.lower() not in IMAGE_SUFFIXES:
            other.append(rel.as_posix())
    files.sort()
    if others is not None:
        others.extend(sorted(other + list(concealed)))
    if not files:
        raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    seen: dict[str, str] = {}
    records, same = [], []
    for rel in files:
        key = folder_key(rel)
        if keys and key in seen:  # (a reader that names its outputs by relative path needs no keys)
            same.append(f"{rel} and {seen[key]} map to the same sample key {key!r}")
        seen[key] = rel
        # the folder resolved, the entry not: a symlink is read (and named, and checked) as the folder's entry
        records.append(ImageRecord(key=key, source_id=rel, path=str(base / rel),
                                   root=None if allow_outside_root else str(base)))
    if same:  # every one of them at once: a messy folder is not renamed one run at a time
        raise SourceError(f"{'; '.join(same[:20])}{f' (and {len(same) - 20} more)' if len(same) > 20 else ''}; "
                          f"rename one of each")
    return records


def _hidden_path(relative: str) -> bool:
    """Whether an entry of :func:`folder_records`'s ``others`` is a hidden file or folder (a folder: ``…/``)."""
    return any(hidden(part) for part in relative.rstrip("/").split("/"))


def left_out_note(others: list[str]) -> str:
    """What a folder source leaves out: the files of other suffixes, the hidden files and folders, and the symlinked
    folders it does not follow (a line each; "" for none)."""
    def shown(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    concealed = [o for o in others if _hidden_path(o)]
    rest = [o for o in others if not _hidden_path(o)]
    files = [o for o in rest if not o.endswith("/")]
    links = [o for o in rest if o.endswith("/")]
    lines = []
    if concealed:
        folders = sum(o.endswith("/") for o in concealed)
        counts = [plural(n, f"hidden {what}") for n, what in ((len(concealed) - folders, "file"), (folders, "folder"))
                  if n]
        lines.append(f"note: left out {' and '.join(counts)} (a name starting with '.', as macOS's ._ files, or a "
                     f"Synology @eaDir folder): {shown(concealed)}")
    if files:
        lines.append(f"note: left out {len(files)} file{'s' if len(files) > 1 else ''} whose suffix is not an "
                     f"image's ({', '.join(IMAGE_SUFFIXES)}): {shown(files)}")
    if links:
        lines.append(f"note: left out {len(links)} symlinked folder{'s' if len(links) > 1 else ''}, not followed "
                     f"(copy {'them' if len(links) > 1 else 'it'} in, or label {'each' if len(links) > 1 else 'it'} "
                     f"as a folder of its own): {shown(links)}")
    return "\n".join(lines)


def plan_shards(records: list[ImageRecord], shard_size: int) -> list[ShardPlan]:
    """Cut the (already sorted) records into consecutive shards of ``shard_size``."""
    if shard_size < 1:
        raise ValueError("shard size must be at least 1")
    return [
        ShardPlan(index=i // shard_size, records=tuple(records[i : i + shard_size]))
        for i in range(0, len(records), shard_size)
    ]


def _ours(folder: Path, files: list[str]) -> bool:
    """Whether ``folder`` holds the mark of a pipeline output, as the pipeline writes it (a file of that name
    written by another tool is not one): a map folder's ``predictions.json``, a label folder's ``labels.json``,
    the lock of one being written, or the comparison sheets beside an HDF5 of maps (``<stem>_compare/``)."""
    def read(name):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return None

    if "predictions.json" in files:
        doc = read("predictions.json")
        if isinstance(doc, dict) and {"model", "maps", "failures"} <= set(doc):
            return True
    if "labels.json" in files and not index_problem(read("labels.json")):
        return True
    if LOCK_NAME in files and read_holder(folder / LOCK_NAME) is not None:
        return True
    return folder.name.endswith("_compare") and (folder.parent / f"{folder.name[:-len('_compare')]}.h5").is_file()


def pipeline_outputs(folder: Path) -> list[Path]:
    """The subfolders of ``folder`` that another `pipeline predict` or `pipeline label` wrote (or is writing):
    their maps, previews and sheets are no input images."""
    found = []
    for root, dirs, files in os.walk(folder):
        if root != str(folder) and _ours(Path(root), files):
            found.append(Path(root))
            dirs[:] = []
        else:
            dirs.sort()
    return found


def other_outputs(folder: Path, own: Iterable[Path] = ()) -> list[Path]:
    """:func:`pipeline_outputs` below ``folder`` except those in the running command's own output folders
    ``own`` (a label folder's mark lies below its ``--out``), said in one ``note:`` line on stderr."""
    own = [Path(o).resolve() for o in own]
    found = [p for p in pipeline_outputs(folder) if not any(p.resolve().is_relative_to(o) for o in own)]
    if found:
        shown = ", ".join(str(p.relative_to(folder)) for p in found[:3]) + (", …" if len(found) > 3 else "")
        print(f"note: left out {len(found)} folder{'s' if len(found) > 1 else ''} of other runs' maps or labels "
              f"below {folder} ({shown})", file=sys.stderr)
    return found
