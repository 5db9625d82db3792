"""Human fixations from SALICON, MIT1003 and CAT2000, converted once into one HDF5 file each.

``pipeline eval`` scores predicted saliency maps against human fixations. The three public
datasets ship their fixations in three different ways; each reader below turns one release, as
its publisher lays it out on disk, into a :class:`FixationSet`, and :func:`write_hdf5` stores that
set in the single layout described at the end of this docstring.

Source formats read
-------------------
**SALICON** (2015 JSON release, ``read_salicon(root, split)`` with split ``train`` or ``val``)
    ``fixations_<split>2015r1.json`` (the name the release uses; ``fixations_<split>2015.json`` is
    accepted too), in ``root`` or ``root/annotations``. COCO-style JSON: ``images`` is a list of
    ``{id, file_name, width, height, ...}``; ``annotations`` a list of ``{id, image_id,
    worker_id, fixations}`` where ``fixations`` is a list of ``[row, col]`` pairs, **1-based**
    (the official evaluation reads them as ``salMap[y-1][x-1] for y, x in fixations``). Images
    are ``root/images/<split>/<file_name>`` (``root/<split>/<file_name>`` is accepted too), e.g.
    ``images/train/COCO_train2014_000000000009.jpg``. ``worker_id`` becomes ``subject``.
    Non-integer coordinates are rounded to the nearest pixel. Points that fall outside the image
    are **dropped and counted** (``FixationSet.n_skipped``, HDF5 attribute ``n_skipped``), not
    clipped: clipping would pile mouse-track excursions onto the border. Images listed in the
    JSON without any annotation are kept with no fixations; image files on disk that the JSON
    does not list are ignored. The 2014 release (``[x, y]``, 0-based) is *not* read.

    Or, where no such JSON is there, the ``.mat`` files of the releases salicon.net serves now (the 2015
    and the 2017 LSUN editions, as pysaliency's ``get_SALICON`` reads them): ``root/fixations/<split>/*.mat``
    (``root/<split>/*.mat`` is accepted too), one per image, MATLAB v5, with ``image`` (the file name
    without ``.jpg``), ``resolution`` (``[height, width]``) and ``gaze``, a struct array of one entry per
    observer whose field ``fixations`` holds that observer's fixations as ``[x, y]`` rows, **1-based**
    (``location``, the raw mouse samples, is not read). ``subject`` is the entry's index in ``gaze`` (the
    files name no observer). Points outside the image are dropped and counted, as above.

**MIT1003** (``read_mit1003(root)``)
    ``root/ALLSTIMULI/<name>.jpeg`` and ``root/ALLFIXATIONMAPS/<name>_fixPts.jpg``: a grayscale
    JPEG at the image's size whose white pixels are the fixations of all 15 observers pooled. As
    it is a JPEG, a pixel counts as a fixation when its value is >= ``threshold`` (default 128,
    half of white); compression ringing stays far below that, and an isolated white pixel stays
    far above it even at quality 50. The fixPts map is binary, so there is no observer
    (``subject`` is -1) and a pixel fixated twice appears once. ``<name>_fixMap.jpg`` (the
    blurred map) is not needed. The per-observer eye-tracking files ``DATA/<observer>/<name>.mat``
    are **not** read: they hold raw 240 Hz gaze samples inside a MATLAB struct, and turning those
    into fixations needs Judd et al.'s ``checkFixations.m`` from DatabaseCode.zip, which this
    module does not reimplement.

**CAT2000** (training set, ``read_cat2000(root)``)
    ``root/Stimuli/<Category>/<name>.jpg`` and ``root/FIXATIONLOCS/<Category>/<name>.mat``: a
    MATLAB v5 .mat file whose variable ``fixLocs`` is a binary matrix of the image's size, non-zero
    where any of the observers fixated (no observer either: ``subject`` is -1). ``root`` may be
    the ``trainSet`` folder or the folder that holds it. Sub-folders of a category (the release
    has ``Output`` folders in places) are ignored. Needs scipy.

Rules shared by the readers: images are sorted by their path relative to the source root (for
SALICON that is the order of the COCO ids, which the file names carry zero-padded); fixations
are grouped by image in that order, within an image in the source's order (SALICON: by
``worker_id``, then the annotations' order in the file, then the order in each list;
MIT1003/CAT2000: row-major).
Image sizes are read from the JPEG header (pixel rows and columns as stored; EXIF orientation is
ignored, as :mod:`pipeline.common.images` ignores it). Anything missing or malformed raises
:class:`FixationError` with one line naming the file, what was expected and where; this includes
a fixation file without its image and an image without its fixation file.

HDF5 layout (``format_version`` 1)
----------------------------------
Root attributes::

    format          "saliency-pipeline/fixations"
    format_version  1
    dataset         "salicon" | "mit1003" | "cat2000" (or the name given to FixationSet)
    split           "train" / "val" for SALICON, "" otherwise
    source_root     absolute path of the dataset root the images are relative to
    n_images        N
    n_fixations     M
    n_skipped       fixations dropped because they fell outside their image

Datasets (``N`` images, ``M`` fixations)::

    images/path        [N]    utf-8   image file, relative to source_root, '/'-separated
    images/name        [N]    utf-8   stable id: the path without suffix and without the
                                      dataset's image folder (e.g. "COCO_val2014_000000000042",
                                      "i05june05_static_street_boston_p1010764", "Action/001")
    images/size        [N, 2] int32   (height, width) in pixels
    images/offset      [N+1]  int64   fixations of image i are rows offset[i]:offset[i+1]
    fixations/y        [M]    int32   0-based row, 0 <= y < height
    fixations/x        [M]    int32   0-based column, 0 <= x < width
    fixations/image_index [M] int32   index into images/*, non-decreasing
    fixations/subject  [M]    int32   observer id (SALICON worker_id), -1 where unknown

Example::

    fs = read_salicon("/data/SALICON", "val")
    write_hdf5(fs, "/data/fixations/salicon_val.h5")
    fs = read_hdf5("/data/fixations/salicon_val.h5")
    ys, xs = fs.fixations(0); img = fs.image_path(0)

or ``pipeline fixations salicon --root /data/SALICON --split val --out /data/fixations/salicon_val.h5``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from PIL import Image

from pipeline.common.atomic import atomic_path, remove_orphaned_temps
from pipeline.common.files import HDF5_CLOSING, ensure_room
from pipeline.common.images import opencv
from pipeline.common.storage import as_path

FORMAT = "saliency-pipeline/fixations"
FORMAT_VERSION = 1

SALICON_SPLITS = ("train", "val")
#: annotation file names tried in order, for split "train" / "val"
SALICON_JSON_NAMES = ("fixations_{split}2015r1.json", "fixations_{split}2015.json")
MIT1003_THRESHOLD = 128
CAT2000_VARIABLE = "fixLocs"


class FixationError(Exception):
    """A dataset or HDF5 file cannot be read; the message is one line naming the file and what was expected."""


# --------------------------------------------------------------------------------------------
# The in-memory set


@dataclass(eq=False)
class FixationSet:
    """Images and their fixations; fixation arrays are flat and grouped by image.

    ``ys``/``xs`` are 0-based integer pixel coordinates inside the image; ``image_index[k]`` is the
    image fixation ``k`` belongs to; ``subject[k]`` the observer (-1 when the dataset has none).
    Fixations given out of image order are stably sorted by image on construction.
    """

    name: str
    root: Path
    paths: list[str]
    sizes: np.ndarray  # [N, 2] int32, (height, width)
    ys: np.ndarray
    xs: np.ndarray
    image_index: np.ndarray
    subject: np.ndarray | None = None
    names: list[str] | None = None
    split: str = ""
    n_skipped: int = 0
    offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.paths = [str(p) for p in self.paths]
        n = len(self.paths)
        self.sizes = np.asarray(self.sizes, dtype=np.int32).reshape(n, 2)
        self.ys = np.asarray(self.ys, dtype=np.int32).ravel()
        self.xs = np.asarray(self.xs, dtype=np.int32).ravel()
        self.image_index = np.asarray(self.image_index, dtype=np.int32).ravel()
        m = len(self.ys)
        if self.subject is None:
            self.subject = np.full(m, -1, dtype=np.int32)
        self.subject = np.asarray(self.subject, dtype=np.int32).ravel()
        if self.names is None:
            self.names = [str(Path(p).with_suffix("")) for p in self.paths]
        self.names = [str(s) for s in self.names]
        if not (len(self.xs) == len(self.image_index) == len(self.subject) == m):
            raise ValueError(
                f"ys, xs, image_index and subject must have one length (got {m}, {len(self.xs)}, "
                f"{len(self.image_index)}, {len(self.subject)})"
            )
        if len(self.names) != n:
            raise ValueError(f"{len(self.names)} names for {n} images")
        if m:
            if self.image_index.min() < 0 or self.image_index.max() >= n:
                raise ValueError(f"image_index must lie in [0, {n})")
            if np.any(np.diff(self.image_index) < 0):
                order = np.argsort(self.image_index, kind="stable")
                self.ys, self.xs = self.ys[order], self.xs[order]
                self.image_index, self.subject = self.image_index[order], self.subject[order]
            h, w = self.sizes[self.image_index, 0], self.sizes[self.image_index, 1]
            bad = (self.ys < 0) | (self.ys >= h) | (self.xs < 0) | (self.xs >= w)
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                i = int(self.image_index[k])
                raise ValueError(
                    f"fixation (y={self.ys[k]}, x={self.xs[k]}) lies outside image {self.paths[i]} "
                    f"of size {h[k]}x{w[k]} (and {int(bad.sum()) - 1} more)"
                )
        counts = np.bincount(self.image_index, minlength=n) if n else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_fixations(self) -> int:
        return len(self.ys)

    def _check(self, i: int) -> int:
        n = len(self.paths)
        if not -n <= i < n:
            raise IndexError(f"image {i} out of range for {n} images")
        return i % n

    def fixations(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ys, xs)`` of image ``i``, 0-based pixel coordinates."""
        i = self._check(i)
        s = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.ys[s], self.xs[s]

    def subjects(self, i: int) -> np.ndarray:
        """Observer of each fixation of image ``i`` (-1 where unknown)."""
        i = self._check(i)
        return self.subject[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def fixation_map(self, i: int) -> np.ndarray:
        """Binary ``(height, width)`` map, True where image ``i`` has at least one fixation."""
        i = self._check(i)
        h, w = (int(v) for v in self.sizes[i])
        m = np.zeros((h, w), dtype=bool)
        ys, xs = self.fixations(i)
        m[ys, xs] = True
        return m

    def image_path(self, i: int) -> Path:
        return self.root / self.paths[self._check(i)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FixationSet):
            return NotImplemented
        return (
            (self.name, self.root, self.paths, self.names, self.split, self.n_skipped)
            == (other.name, other.root, other.paths, other.names, other.split, other.n_skipped)
            and all(
                np.array_equal(getattr(self, a), getattr(other, a))
                for a in ("sizes", "ys", "xs", "image_index", "subject")
            )
        )


# --------------------------------------------------------------------------------------------
# Small readers


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file as stored (EXIF orientation ignored), read from its header by Pillow."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise FixationError(f"{path}: image not found") from None
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise FixationError(f"{path}: not a readable image ({e}); expected a JPEG stimulus") from None
    return int(height), int(width)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FixationError(f"{what} not found: expected the folder {path}")
    return path


def _loadmat(path: Path, dataset: str) -> dict:
    """A MATLAB v5 .mat file's variables (scipy's ``loadmat``); anything else is one FixationError line."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise FixationError(f"reading {dataset} .mat files needs scipy; expected it installed (pip install scipy)") from None
    try:
        return loadmat(str(path))
    except NotImplementedError:
        raise FixationError(f"{path}: MATLAB v7.3 (HDF5) .mat is not supported; expected a MATLAB v5 .mat") from None
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... on garbage
        raise FixationError(f"{path}: not a readable .mat file ({type(e).__name__}); expected a MATLAB v5 .mat") from None


def _points_from_mask(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)  # row-major order
    return ys.astype(np.int32), xs.astype(np.int32)


def _assemble(name, root, paths, names, sizes, per_image, split="", n_skipped=0) -> FixationSet:
    """Build a FixationSet from per-image ``(ys, xs, subject)`` lists, in image order."""
    ys = [p[0] for p in per_image]
    xs = [p[1] for p in per_image]
    subj = [p[2] for p in per_image]
    idx = [np.full(len(y), i, dtype=np.int32) for i, y in enumerate(ys)]
    cat = lambda parts: np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)  # noqa: E731
    return FixationSet(
        name=name, root=Path(root).resolve(), paths=paths, names=names,
        sizes=np.asarray(sizes, dtype=np.int32).reshape(-1, 2),
        ys=cat(ys), xs=cat(xs), image_index=cat(idx), subject=cat(subj),
        split=split, n_skipped=int(n_skipped),
    )


# --------------------------------------------------------------------------------------------
# SALICON


def _salicon_json(root: Path, split: str) -> Path | None:
    for folder in (root, root / "annotations"):
        for n in (t.format(split=split) for t in SALICON_JSON_NAMES):
            if (folder / n).is_file():
                return folder / n
    return None


def _salicon_mat_dir(root: Path, split: str) -> Path | None:
    """The folder of the per-image .mat files of ``split`` (the releases salicon.net serves now), or None."""
    for d in (root / "fixations" / split, root / split):
        if d.is_dir() and any(d.glob("*.mat")):
            return d
    return None


def _salicon_images_dir(root: Path, split: str) -> Path:
    for d in (root / "images" / split, root / split):
        if d.is_dir():
            return d
    raise FixationError(
        f"SALICON {split} images not found: expected the folder {root / 'images' / split} "
        f"(COCO_{split}2014_*.jpg)"
    )


def read_salicon(root: str | Path, split: str, annotations: str | Path | None = None) -> FixationSet:
    """SALICON 2015 fixations of ``split`` ("train" or "val"); see the module docstring."""
    root = Path(root)
    if split not in SALICON_SPLITS:
        raise FixationError(
            f"SALICON split {split!r} has no fixations: expected one of {', '.join(SALICON_SPLITS)}"
        )
    _need_dir(root, "SALICON root")
    ann_path = Path(annotations) if annotations is not None else _salicon_json(root, split)
    if ann_path is None:
        mat_dir = _salicon_mat_dir(root, split)
        if mat_dir is not None:
            return _read_salicon_mat(root, split, mat_dir)
        names = " or ".join(t.format(split=split) for t in SALICON_JSON_NAMES)
        raise FixationError(f"SALICON {split} annotations not found: expected {names} in {root} or "
                            f"{root / 'annotations'}, or the release's .mat files in {root / 'fixations' / split}")
    if not ann_path.is_file():
        raise FixationError(f"SALICON annotations not found: expected the file {ann_path}")
    try:
        with open(ann_path, "rb") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FixationError(f"{ann_path}: not readable JSON ({e}); expected SALICON fixations in COCO layout") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise FixationError(f"{ann_path}: not a SALICON fixations file; expected a JSON object with lists 'images' and 'annotations'")
    if doc.get("type", "fixations") != "fixations":
        raise FixationError(f"{ann_path}: its 'type' is {doc.get('type')!r}; expected 'fixations'")
    img_dir = _salicon_images_dir(root, split)

    by_id: dict[int, dict] = {}
    for k, im in enumerate(doc["images"]):
        try:
            image_id, file_name = int(im["id"]), str(im["file_name"])
            h, w = int(im["height"]), int(im["width"])
        except (TypeError, KeyError, ValueError):
            raise FixationError(f"{ann_path}: images[{k}] is malformed; expected id, file_name, height and width") from None
        if image_id in by_id:
            raise FixationError(f"{ann_path}: image id {image_id} is listed twice in 'images'")
        by_id[image_id] = {"file_name": file_name, "size": (h, w)}
    images = sorted(by_id.items(), key=lambda kv: (kv[1]["file_name"], kv[0]))
    if len({im["file_name"] for _, im in images}) != len(images):
        raise FixationError(f"{ann_path}: a file_name is listed for two image ids")
    row_of = {image_id: i for i, (image_id, _) in enumerate(images)}

    paths, names, sizes = [], [], []
    for _, im in images:
        p = img_dir / im["file_name"]
        if not p.is_file():
            raise FixationError(f"SALICON image missing: {ann_path.name} lists {im['file_name']}, expected at {p}")
        size = _image_size(p)
        if size != im["size"]:
            raise FixationError(
                f"{p}: image is {size[0]}x{size[1]} (HxW) but {ann_path.name} says {im['size'][0]}x{im['size'][1]}"
            )
        paths.append(p.relative_to(root).as_posix())
        names.append(Path(im["file_name"]).stem)
        sizes.append(im["size"])

    anns: list[list[tuple]] = [[] for _ in images]
    for k, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "fixations" not in a:
            raise FixationError(f"{ann_path}: annotations[{k}] is malformed; expected image_id and fixations")
        try:
            row = row_of[int(a["image_id"])]
        except (KeyError, TypeError, ValueError):
            raise FixationError(
                f"{ann_path}: annotations[{k}] refers to image_id {a['image_id']!r}, which 'images' does not list"
            ) from None
        worker = a.get("worker_id", -1)
        anns[row].append((int(worker) if worker is not None else -1, k, a["fixations"]))

    per_image, skipped = [], 0
    for row, (h, w) in enumerate(sizes):
        observers = []
        for worker, k, fix in sorted(anns[row], key=lambda t: (t[0], t[1])):
            try:
                pts = np.asarray(fix, dtype=np.float64)
            except (TypeError, ValueError):
                raise FixationError(f"{ann_path}: annotations[{k}].fixations is malformed; expected a list of [row, col] pairs") from None
            if pts.size == 0:
                continue
            if pts.ndim != 2 or pts.shape[1] != 2:
                raise FixationError(f"{ann_path}: annotations[{k}].fixations is malformed; expected a list of [row, col] pairs")
            observers.append((worker, pts))
        *image, out = _salicon_image(observers, h, w, "yx")
        per_image.append(tuple(image))
        skipped += out
    return _assemble("salicon", root, paths, names, sizes, per_image, split=split, n_skipped=skipped)


def _salicon_image(observers: list, h: int, w: int, columns: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One image's ``(subject, points)`` pairs, in order → its (ys, xs, subject) arrays and how many points fell
    outside it (see :func:`_salicon_points`)."""
    parts, skipped = [], 0
    for subject, pts in observers:
        y, x, out = _salicon_points(pts, h, w, columns)
        parts.append((y, x, np.full(len(y), subject, dtype=np.int32)))
        skipped += out
    cat = lambda i: np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int32)  # noqa: E731
    return cat(0), cat(1), cat(2), skipped


def _salicon_points(pts, h: int, w: int, columns: str) -> tuple[np.ndarray, np.ndarray, int]:
    """1-based points (``columns``: "yx" rows of [row, col], "xy" rows of [x, y]) → 0-based (ys, xs) inside an
    ``h``×``w`` image, rounded to the nearest pixel, and how many fell outside (dropped)."""
    pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    y, x = (pts[:, 0], pts[:, 1]) if columns == "yx" else (pts[:, 1], pts[:, 0])
    with np.errstate(invalid="ignore"):
        y, x = np.floor(y + 0.5) - 1, np.floor(x + 0.5) - 1
        ok = np.isfinite(y) & np.isfinite(x) & (y >= 0) & (y < h) & (x >= 0) & (x < w)
    return y[ok].astype(np.int32), x[ok].astype(np.int32), int((~ok).sum())


def _read_salicon_mat(root: Path, split: str, mat_dir: Path) -> FixationSet:
    """SALICON fixations of ``split`` from the release's per-image .mat files; see the module docstring."""
    img_dir = _salicon_images_dir(root, split)
    rows = []
    for path in sorted(mat_dir.glob("*.mat")):
        mat = _loadmat(path, "SALICON")
        try:
            image = str(np.asarray(mat["image"]).ravel()[0])
            h, w = (int(v) for v in np.asarray(mat["resolution"]).ravel()[:2])
            gaze = np.asarray(mat["gaze"]).ravel()
            observers = [np.asarray(g["fixations"]) for g in gaze]
        except (KeyError, IndexError, ValueError, TypeError):
            found = sorted(k for k in mat if not k.startswith("__"))
            raise FixationError(f"{path}: not a SALICON fixation file (variables {found}); expected image, "
                                "resolution and gaze with a fixations field") from None
        image = image[:-len(".jpg")] if image.lower().endswith(".jpg") else image  # (the name, with or without it)
        p = img_dir / f"{image}.jpg"
        if not p.is_file():
            raise FixationError(f"SALICON image missing: {path.name} is of {image}, expected at {p}")
        size = _image_size(p)
        if size != (h, w):
            raise FixationError(f"{p}: image is {size[0]}x{size[1]} (HxW) but {path.name} says {h}x{w}")
        rows.append((p.relative_to(root).as_posix(), image, (h, w), observers, path))
    rows.sort(key=lambda r: r[0])
    per_image, skipped = [], 0
    for _, _, (h, w), observers, path in rows:
        for k, pts in enumerate(observers):
            if pts.size and (pts.ndim != 2 or pts.shape[1] != 2):
                raise FixationError(f"{path}: gaze({k + 1}).fixations has shape {pts.shape}; expected [x, y] rows")
        *image, out = _salicon_image(list(enumerate(observers)), h, w, "xy")
        per_image.append(tuple(image))
        skipped += out
    return _assemble("salicon", root, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], per_image,
                     split=split, n_skipped=skipped)


# --------------------------------------------------------------------------------------------
# MIT1003


def read_mit1003(root: str | Path, threshold: int = MIT1003_THRESHOLD) -> FixationSet:
    """MIT1003 fixations from ``ALLFIXATIONMAPS/<name>_fixPts.jpg``; see the module docstring."""
    root = Path(root)
    _need_dir(root, "MIT1003 root")
    stim_dir = _need_dir(root / "ALLSTIMULI", "MIT1003 stimuli folder (ALLSTIMULI/<name>.jpeg)")
    if (root / "DATA").is_dir() and not (root / "ALLFIXATIONMAPS").is_dir():  # the raw eye tracking alone
        raise FixationError(f"MIT1003 fixation folder (ALLFIXATIONMAPS/<name>_fixPts.jpg) not found: expected the "
                            f"folder {root / 'ALLFIXATIONMAPS'} (the eye-tracking files in {root / 'DATA'} are not "
                            "read: ALLFIXATIONMAPS.zip of the same release holds the fixations)")
    fix_dir = _need_dir(root / "ALLFIXATIONMAPS", "MIT1003 fixation folder (ALLFIXATIONMAPS/<name>_fixPts.jpg)")
    stimuli = sorted(p for p in stim_dir.iterdir() if p.is_file() and p.suffix.lower() == ".jpeg")
    if not stimuli:
        raise FixationError(f"MIT1003 stimuli not found: expected <name>.jpeg files in {stim_dir}")
    stems = {p.stem for p in stimuli}
    for p in sorted(fix_dir.glob("*_fixPts.jpg")):
        stem = p.name[: -len("_fixPts.jpg")]
        if stem not in stems:
            raise FixationError(f"{p}: fixation file without its image; expected {stim_dir / (stem + '.jpeg')}")

    paths, names, sizes, per_image = [], [], [], []
    for p in stimuli:
        fp = fix_dir / f"{p.stem}_fixPts.jpg"
        if not fp.is_file():
            raise FixationError(f"{p}: image without its fixations; expected {fp}")
        h, w = _image_size(p)
        pts = opencv().imread(str(fp), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)
        if pts is None:
            raise FixationError(f"{fp}: not a readable image; expected a grayscale JPEG fixation-point map")
        if pts.shape != (h, w):
            raise FixationError(
                f"{fp}: fixation map is {pts.shape[0]}x{pts.shape[1]} (HxW) but its image {p.name} is {h}x{w}; expected the same size"
            )
        ys, xs = _points_from_mask(pts >= threshold)
        per_image.append((ys, xs, np.full(len(ys), -1, np.int32)))
        paths.append(p.relative_to(root).as_posix())
        names.append(p.stem)
        sizes.append((h, w))
    return _assemble("mit1003", root, paths, names, sizes, per_image)


# --------------------------------------------------------------------------------------------
# CAT2000


def _load_fixlocs(path: Path, size: tuple[int, int], image: str) -> np.ndarray:
    """``fixLocs`` of ``path``, whose shape is checked to be ``size`` before it is read (a compressed .mat of
    under a megabyte held a 30000² matrix: gigabytes once read)."""
    try:
        from scipy.io import whosmat

        stated = {name: shape for name, shape, _ in whosmat(str(path))}
    except Exception:  # noqa: BLE001 - loadmat says what is wrong with the file
        stated = {}
    shape = stated.get(CAT2000_VARIABLE)
    if shape is not None and tuple(shape) != tuple(size):
        raise FixationError(f"{path}: {CAT2000_VARIABLE} is {'x'.join(map(str, shape))} (HxW) but its image {image} "
                            f"is {size[0]}x{size[1]}; expected the same size")
    mat = _loadmat(path, "CAT2000")
    if CAT2000_VARIABLE not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise FixationError(f"{path}: no variable {CAT2000_VARIABLE!r} (found {found}); expected the binary fixation matrix")
    arr = np.asarray(mat[CAT2000_VARIABLE])
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise FixationError(f"{path}: {CAT2000_VARIABLE} has shape {arr.shape} and type {arr.dtype}; expected a 2-D numeric matrix")
    return arr


def read_cat2000(root: str | Path) -> FixationSet:
    """CAT2000 training fixations from ``FIXATIONLOCS/<Category>/<name>.mat``; see the module docstring."""
    root = Path(root)
    _need_dir(root, "CAT2000 root")
    if not (root / "Stimuli").is_dir() and (root / "trainSet" / "Stimuli").is_dir():
        root = root / "trainSet"
    stim_dir = _need_dir(root / "Stimuli", "CAT2000 stimuli folder (Stimuli/<Category>/<name>.jpg)")
    fix_dir = _need_dir(root / "FIXATIONLOCS", "CAT2000 fixation folder (FIXATIONLOCS/<Category>/<name>.mat)")
    categories = sorted(d.name for d in stim_dir.iterdir() if d.is_dir())
    if not categories:
        raise FixationError(f"CAT2000 stimuli not found: expected category folders in {stim_dir}")
    for d in sorted(fix_dir.iterdir()):
        if d.is_dir() and d.name not in categories:
            raise FixationError(f"{d}: fixation category without stimuli; expected {stim_dir / d.name}")

    paths, names, sizes, per_image = [], [], [], []
    for cat in categories:
        stimuli = sorted(p for p in (stim_dir / cat).iterdir() if p.is_file() and p.suffix.lower() == ".jpg")
        stems = {p.stem for p in stimuli}
        if (fix_dir / cat).is_dir():
            for m in sorted((fix_dir / cat).glob("*.mat")):
                if m.stem not in stems:
                    raise FixationError(f"{m}: fixation file without its image; expected {stim_dir / cat / (m.stem + '.jpg')}")
        for p in stimuli:
            mp = fix_dir / cat / f"{p.stem}.mat"
            if not mp.is_file():
                raise FixationError(f"{p}: image without its fixations; expected {mp}")
            h, w = _image_size(p)
            locs = _load_fixlocs(mp, (h, w), f"{cat}/{p.name}")
            if locs.shape != (h, w):
                raise FixationError(
                    f"{mp}: {CAT2000_VARIABLE} is {locs.shape[0]}x{locs.shape[1]} (HxW) but its image "
                    f"{cat}/{p.name} is {h}x{w}; expected the same size"
                )
            ys, xs = _points_from_mask(locs != 0)
            per_image.append((ys, xs, np.full(len(ys), -1, np.int32)))
            paths.append(p.relative_to(root).as_posix())
            names.append(f"{cat}/{p.stem}")
            sizes.append((h, w))
    return _assemble("cat2000", root, paths, names, sizes, per_image)


READERS: dict[str, Callable[..., FixationSet]] = {
    "salicon": read_salicon,
    "mit1003": read_mit1003,
    "cat2000": read_cat2000,
}


def read_dataset(dataset: str, root: str | Path, split: str | None = None) -> FixationSet:
    """Dispatch on ``dataset`` (a key of :data:`READERS`); ``split`` is for SALICON only."""
    if dataset not in READERS:
        raise FixationError(f"unknown fixation dataset {dataset!r}; expected one of {', '.join(READERS)}")
    if dataset == "salicon":
        if split is None:
            raise FixationError(f"SALICON needs a split; expected one of {', '.join(SALICON_SPLITS)}")
        return read_salicon(root, split)
    if split:
        raise FixationError(f"{dataset} has no splits; expected no split (got {split!r})")
    return READERS[dataset](root)


# --------------------------------------------------------------------------------------------
# HDF5


def write_hdf5(fs: FixationSet, path: str | Path) -> Path:
    """Write ``fs`` to ``path`` atomically (temp file beside it, fsync, rename; a URL: written locally, then
    uploaded); returns ``path``."""
    import h5py

    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = h5py.string_dtype("utf-8")

    def put(group, name, data, dtype):
        data = np.asarray(data, dtype=dtype)
        opts = dict(compression="gzip", compression_opts=4, shuffle=True) if data.size else {}
        group.create_dataset(name, data=data, **opts)

    remove_orphaned_temps(path)  # a killed conversion's
    with atomic_path(path) as tmp:
        data = sum(np.asarray(a).nbytes for a in (fs.ys, fs.xs, fs.image_index, fs.subject, fs.sizes, fs.offsets))
        data += sum(len(os.fsencode(str(t))) + 16 for t in (*fs.paths, *fs.names))
        # (h5py crashes on a full disk: the room is checked first)
        ensure_room(Path(tmp).parent, data + HDF5_CLOSING, "the fixation file with room for HDF5 to close it")
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "dataset": fs.name,
                    "split": fs.split,
                    "source_root": str(Path(fs.root).resolve()),
                    "n_images": len(fs),
                    "n_fixations": fs.n_fixations,
                    "n_skipped": int(fs.n_skipped),
                }
            )
            im = f.create_group("images")
            im.create_dataset("path", data=np.array(fs.paths, dtype=object), dtype=text)
            im.create_dataset("name", data=np.array(fs.names, dtype=object), dtype=text)
            im.create_dataset("size", data=fs.sizes.astype(np.int32).reshape(-1, 2))
            im.create_dataset("offset", data=fs.offsets.astype(np.int64))
            fx = f.create_group("fixations")
            put(fx, "y", fs.ys, np.int32)
            put(fx, "x", fs.xs, np.int32)
            put(fx, "image_index", fs.image_index, np.int32)
            put(fx, "subject", fs.subject, np.int32)
    return path


_REQUIRED = (
    "images/path", "images/name", "images/size", "images/offset",
    "fixations/y", "fixations/x", "fixations/image_index", "fixations/subject",
)


def read_hdf5(path: str | Path, root: str | Path | None = None) -> FixationSet:
    """Read a file written by :func:`write_hdf5`. ``root`` overrides the stored source root
    (for a dataset that has moved since it was converted)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FixationError(f"fixation file not found: expected {path}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise FixationError(f"{path}: not an HDF5 file; expected fixations written by `pipeline fixations`") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise FixationError(f"{path}: HDF5 file is not a fixation set; expected attribute format={FORMAT!r}")
        version = int(f.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise FixationError(f"{path}: fixation format version {version}; expected {FORMAT_VERSION} (rewrite it with this version)")
        missing = [k for k in _REQUIRED if k not in f]
        if missing:
            raise FixationError(f"{path}: fixation set is incomplete, missing {', '.join(missing)}")
        problem = _stated_problem(f)
        if problem:
            raise FixationError(f"{path}: fixation set is inconsistent ({problem})")
        try:
            dec = lambda d: [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in d[()]]  # noqa: E731
            fs = FixationSet(
                name=str(f.attrs["dataset"]),
                root=Path(root) if root is not None else Path(str(f.attrs["source_root"])),
                paths=dec(f["images/path"]),
                names=dec(f["images/name"]),
                sizes=f["images/size"][()],
                ys=f["fixations/y"][()],
                xs=f["fixations/x"][()],
                image_index=f["fixations/image_index"][()],
                subject=f["fixations/subject"][()],
                split=str(f.attrs.get("split", "")),
                n_skipped=int(f.attrs.get("n_skipped", 0)),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise FixationError(f"{path}: fixation set is inconsistent ({e})") from None
        if not np.array_equal(fs.offsets, f["images/offset"][()]) or int(f.attrs.get("n_fixations", -1)) != fs.n_fixations \
                or int(f.attrs.get("n_images", -1)) != len(fs):
            raise FixationError(f"{path}: fixation set is inconsistent (counts or offsets disagree with the arrays)")
    return fs


#: deflate compresses at most about 1032:1: an array stating more bytes than that over what the file stores
#: holds chunks never written (read back as zeros) or is not the file `pipeline fixations` wrote
_MOST_COMPRESSION = 1100


def _stated_problem(f) -> str:
    """Before any array is read: its shapes agree with the counts the file states, and each array stores about
    as many bytes as it states (a 12 KB file stated 10^8 fixations, 8 GB once read). "" when they do."""
    try:
        n_images, n_fixations = int(f.attrs["n_images"]), int(f.attrs["n_fixations"])
    except (KeyError, TypeError, ValueError):
        return "no n_images and n_fixations attributes"
    for key in _REQUIRED:
        ds = f[key]
        want = (n_images + 1,) if key == "images/offset" else (n_images, 2) if key == "images/size" else \
            (n_images,) if key.startswith("images/") else (n_fixations,)
        if ds.shape != want:
            return f"{key} has shape {ds.shape}, the file states {want}"
        stated = ds.size * ds.dtype.itemsize
        if stated > _MOST_COMPRESSION * ds.id.get_storage_size() + 65536:
            return f"{key} states {stated:,} bytes but stores {ds.id.get_storage_size():,}"
    return ""


#: where each dataset's reader looks for its images (said when it finds none)
EXPECTED_LAYOUT = {
    "salicon": "the images its fixations JSON or fixations/<split>/*.mat files name",
    "mit1003": "ALLSTIMULI/<name>.jpeg",
    "cat2000": "Stimuli/<Category>/<name>.jpg",
}

#: what each dataset's reader takes for a fixation (said when it finds none)
FIXATION_RULE = {
    "salicon": "the [row, col] points of its fixations JSON",
    "mit1003": f"pixels of at least {MIT1003_THRESHOLD} in each *_fixPts.jpg",
    "cat2000": "non-zero entries of each fixation-location .mat",
}


def convert(dataset: str, root: str | Path, out: str | Path, split: str | None = None) -> FixationSet:
    """Read one dataset and write it to ``out``; returns the set. A set without a fixation is refused (nothing
    could be scored with it); one where most images have none is written, with a warning."""
    fs = read_dataset(dataset, root, split)
    empty = sum(1 for i in range(len(fs)) if fs.offsets[i + 1] == fs.offsets[i])
    if not len(fs):
        raise FixationError(f"{root}: no images found ({dataset}: expected "
                            f"{EXPECTED_LAYOUT.get(dataset, 'the published layout')}); is it the dataset's folder?")
    if fs.n_fixations == 0:
        raise FixationError(f"{root}: no fixation found in its {len(fs)} images ({dataset}: a fixation is "
                            f"{FIXATION_RULE.get(dataset, 'what its reader takes')}); are these the published files?")
    if empty > len(fs) // 2:
        warnings.warn(f"{empty} of the {len(fs)} images of {root} have no fixation ({dataset}: a fixation is "
                      f"{FIXATION_RULE.get(dataset, 'what its reader takes')}); eval scores them in no mean")
    write_hdf5(fs, out)
    return fs
