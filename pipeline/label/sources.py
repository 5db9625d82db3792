"""Image sources (a COCO tree, a folder of images) and the deterministic shard plan.

A source is a sorted list of :class:`ImageRecord`; :func:`plan_shards` cuts it into fixed-size
shards, so the same input always gives the same shards and the same keys.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class SourceError(Exception):
    """The source cannot be read at all (raised before any work starts)."""


@dataclass(frozen=True)
class ImageRecord:
    key: str  # the WebDataset sample key: no dots, stable
    source_id: int | str  # COCO image id, or the file's path relative to the folder
    path: str  # absolute path of the image file
    height: int | None = None  # as listed by the source (None when unknown before decoding)
    width: int | None = None


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


def coco_records(root: str | Path, split: str) -> list[ImageRecord]:
    """Images of one COCO split, read with pycocotools, sorted by image id."""
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
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError, AssertionError) as e:
        raise SourceError(f"cannot read COCO annotation file {ann}: {type(e).__name__}: {e}") from e
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        if "file_name" not in info:
            raise SourceError(f"{ann}: image {image_id} has no file_name")
        records.append(
            ImageRecord(
                key=coco_key(image_id),
                source_id=int(image_id),
                path=str((image_dir / info["file_name"]).resolve()),
                height=info.get("height"),
                width=info.get("width"),
            )
        )
    if not records:
        raise SourceError(f"{ann} lists no images")
    return records


def folder_key(relative: str) -> str:
    """A stable key from a relative path: path separators become '__', other odd characters '_'."""
    stem = relative.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "__"))


def folder_records(folder: str | Path) -> list[ImageRecord]:
    """Every image file under ``folder`` (recursively), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceError(f"image folder not found: {folder}")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    seen: dict[str, str] = {}
    records = []
    for rel in files:
        key = folder_key(rel)
        if key in seen:
            raise SourceError(f"{rel} and {seen[key]} map to the same sample key {key!r}; rename one")
        seen[key] = rel
        records.append(ImageRecord(key=key, source_id=rel, path=str((folder / rel).resolve())))
    return records


def plan_shards(records: list[ImageRecord], shard_size: int) -> list[ShardPlan]:
    """Cut the (already sorted) records into consecutive shards of ``shard_size``."""
    if shard_size < 1:
        raise ValueError("shard size must be at least 1")
    return [
        ShardPlan(index=i // shard_size, records=tuple(records[i : i + shard_size]))
        for i in range(0, len(records), shard_size)
    ]
