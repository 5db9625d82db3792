"""Saliency maps for a folder of images: PNGs, or one HDF5 of log densities for pysaliency.

``png``: ``<out>/<relative path>.png``, 8-bit, the density divided by its maximum (each written
atomically), then ``<out>/predictions.json`` (model, maps, failures) last, as the completion mark. ``hdf5``: one file whose datasets are named by the images' paths relative to the
folder (``sub/img.jpg``), each the float32 log density at the image's size; pysaliency's
``HDF5Model(stimuli, file)`` reads it (its keys are matched against the stimuli's file names), and
its root attributes say what it is. The HDF5 is written under a temporary name and renamed when
complete. ``out`` may be a URL (``s3://…``): each file is written locally and uploaded under its name,
``predictions.json`` after every map.

With a teacher to compare with (``compare``), every image also gets a sheet image | teacher | student
(:mod:`pipeline.score.sheets`) at ``<out>/compare/<relative path>.png`` (``hdf5``: beside the file, in
``<out stem>_compare/``), and ``predictions.json`` records the teacher and each image's CC with it. A png folder of
images with a ``compare/`` subfolder mirroring its own images is refused (:class:`SheetClash`): a map there would be
another image's sheet.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.common import images
from pipeline.common.atomic import atomic_open, atomic_path, remove_orphaned_temps, write_json
from pipeline.common.files import HDF5_CLOSING, ensure_room
from pipeline.common.locks import LOCK_NAME, FolderLock
from pipeline.common.prefetch import batched, prefetched
from pipeline.common.progress import progress as show_progress
from pipeline.common.storage import as_path, is_url, local_place
from pipeline.common.tables import table
from pipeline.score import sheets
from pipeline.score.predictors import NOT_FINITE, Predictor
from pipeline.label.shards import enclosing_label_folder
from pipeline.label.sources import IMAGE_SUFFIXES, SourceError, folder_records, left_out_note, other_outputs

FORMATS = ("png", "hdf5")


@dataclass
class PredictResult:
    out: Path
    model: str = ""  # the predictor's name: the model, and the runtime serving it ("[onnxruntime]"…)
    written: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    compare_dir: Path | None = None  # the image | teacher | student sheets, with a teacher to compare with
    cc: dict[str, float] = field(default_factory=dict)  # each image's CC with that teacher

    def table(self) -> str:
        rows = [("model", self.model)] if self.model else []
        rows += [("maps written", str(self.written)), ("images failed", str(len(self.failures))),
                ("wall time", f"{self.seconds:.1f} s"), ("images/s", f"{self.written / max(self.seconds, 1e-9):.1f}"),
                ("output", str(self.out))]
        if self.compare_dir is not None:
            mean = float(np.mean(list(self.cc.values()))) if self.cc else float("nan")
            rows += [("CC with the teacher", f"{mean:.3f} (mean of {len(self.cc)})"),
                     ("sheets", f"{self.compare_dir} (image | teacher | student)")]
        return table(None, rows)


class NoMaps(Exception):
    """Every image failed: no file says the output is complete (an HDF5 file is not kept, no predictions.json is
    written). ``result`` holds the failures."""

    def __init__(self, result: PredictResult):
        super().__init__(f"no image could be mapped ({len(result.failures)} failed)")
        self.result = result


class SheetClash(ValueError):
    """With ``--compare-teacher`` (png), an image's map would be written where another image's sheet goes (or the
    reverse): the image folder has a ``compare/`` subfolder mirroring its own images. Said before any work."""


def map_png(log_density: np.ndarray, density: bool = True) -> bytes:
    """An 8-bit PNG of a map: a log density as density / its maximum; an extra map's raw values (SACT's ponder
    cost) scaled from their minimum to their maximum in the image (the raw values: ``--format hdf5``)."""
    if density:
        scaled = np.exp(log_density - log_density.max())
    else:
        lo, hi = float(log_density.min()), float(log_density.max())
        scaled = (log_density - lo) / (hi - lo) if hi > lo else np.zeros_like(log_density)
    return images.encode_png(np.rint(scaled * 255.0).astype(np.uint8))


def compare_folder(out: Path, fmt: str) -> Path:
    """Where ``predict --compare-teacher`` writes its sheets."""
    return out / "compare" if fmt == "png" else out.with_name(f"{out.stem}_compare")


def sheet_clash(folder: Path, out, rels: list[str]) -> str:
    """Why the png maps of the images ``rels`` (relative to ``folder``) and their comparison sheets cannot share
    the output folder ``out`` (the map of ``compare/x.jpg`` would be the sheet of ``x.jpg``), or ""."""
    maps = set(rels)  # the map of rel is <out>/<rel>.png, its sheet <out>/compare/<rel>.png
    both = sorted(rel for rel in rels if rel.startswith("compare/") and rel[len("compare/"):] in maps)
    if not both:
        return ""
    sub, n = folder / "compare", len(both)
    return (f"the map of {both[0]} would be {out}/{both[0]}.png, where the comparison sheet of "
            f"{both[0][len('compare/'):]} goes ({n} image{'s' if n > 1 else ''} of {sub} so): rename or move the "
            f"folder {sub}, or predict without --compare-teacher")


def predict_folder(predictor: Predictor, folder: str | Path, out: str | Path, *, fmt: str = "png",
                   batch_size: int = 8, io_threads: int = 4, progress: bool = True,
                   compare: Predictor | None = None) -> PredictResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    t0 = time.perf_counter()
    folder, out = Path(folder), as_path(out)
    local_out = None if is_url(out) else Path(out)
    over = writes_over_images(folder, out)
    if over:
        raise SourceError(f"--out {over}")
    # maps (and comparison sheets) written inside the image folder are not images, nor are other runs' outputs
    own = [] if local_out is None else [local_out, compare_folder(local_out, fmt)]
    others = other_outputs(folder, own)
    mine = photos_in_outputs(folder, own)
    if mine:
        n = len(mine)
        shown = ", ".join(mine[:5]) + (f" and {n - 5} more" if n > 5 else "")
        print(f"note: left out {n} image{'s' if n > 1 else ''} under --out {out}, inside --images: the output "
              f"folder is not read as images (give --out outside {folder}, or move {'them' if n > 1 else 'it'} out, "
              f"to map {'them' if n > 1 else 'it'}): {shown}", file=sys.stderr)
    skipped: list[str] = []
    records = folder_records(folder, exclude=[*others, *own], others=skipped,
                             keys=False)  # maps are named by relative path: x.jpg and x.png are two
    if skipped:
        print(left_out_note(skipped), file=sys.stderr)
    if compare is not None and fmt == "png":
        clash = sheet_clash(folder, out, [str(r.source_id) for r in records])
        if clash:
            raise SheetClash(clash)  # before the folder is taken or anything in it replaced
    result = PredictResult(out, model=predictor.name,
                           compare_dir=compare_folder(out, fmt) if compare is not None else None)

    def entry(record) -> str:  # a failure names the folder's entry (a link, not what it leads to)
        return str(folder / record.source_id)

    with contextlib.ExitStack() as stack:
        h5 = None
        if fmt == "png":
            if local_out is not None:  # one writer: two runs into one folder would mix their maps
                local_out.mkdir(parents=True, exist_ok=True)
                lock = FolderLock(local_out / LOCK_NAME, what=f"map folder {out}", command="pipeline predict")
                stack.callback(lock.take(SourceError).release)
            done = out / "predictions.json"  # the completion mark goes before the first map is replaced
            if done.exists():
                done.unlink()
        if fmt == "hdf5":
            import h5py

            out.parent.mkdir(parents=True, exist_ok=True)
            remove_orphaned_temps(out)  # a killed run's (its temp file lives as long as the run)
            tmp = stack.enter_context(atomic_path(out))
            h5 = stack.enter_context(h5py.File(tmp, "w"))
            h5.attrs.update({"type": "pysaliency.precomputed_models.predictions", "version": "1.0",
                             "model": predictor.name, "source": str(folder.resolve()),
                             "content": "log_density" if predictor.density else predictor.map_name})
        else:
            out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(io_threads) as pool, \
                show_progress(len(records), f"predict {predictor.name}", enabled=progress) as bar:
            maps, sheets_ = [], []  # (record, future) of each image's map, and of its sheet
            queued: deque = deque()  # writes not yet done: each holds a map at the image's full size

            def write(fn, *args) -> Future:
                """``fn(*args)`` on the pool, once fewer writes than threads wait: a model faster than the PNG
                encoder would otherwise queue the full-size map of every photo of the folder."""
                while len(queued) >= io_threads:
                    wait([queued.popleft()])
                future = pool.submit(fn, *args)
                queued.append(future)
                return future

            # png: a map lines up with the photo as viewers show it (EXIF orientation applied); hdf5 is for
            # pysaliency's benchmarks, whose fixations are in the stored pixels. Without comparison sheets a decode
            # thread keeps only what the model takes of a photo, and its size
            def read(r):
                rgb = images.read_image(r.path, upright=fmt == "png")
                return (rgb if compare is not None else predictor.prepared(rgb)), rgb.shape[:2]

            for batch in batched(prefetched(pool, records, read, batch_size + io_threads, catch=images.ImageError),
                                 batch_size):
                good = [(r, x) for r, x in batch if not isinstance(x, Exception)]
                result.failures += [{"file": entry(r), "reason": str(x)} for r, x in batch if isinstance(x, Exception)]
                if compare is None:  # each full-size map made as it is written
                    logds = predictor.iter_log_densities([x for _, (x, _) in good], [s for _, (_, s) in good])
                    refs = [None] * len(good)
                else:
                    logds = predictor.log_densities([x for _, (x, _) in good])
                    refs = compare.log_densities([x for _, (x, _) in good])
                for (rec, (x, _)), logd, ref in zip(good, logds, refs):
                    if not np.isfinite(logd).all():
                        result.failures.append({"file": entry(rec), "reason": NOT_FINITE})
                        continue
                    rel = str(rec.source_id)
                    if ref is not None:
                        sheets_.append((rec, write(_write_sheet, result, rel, x, ref, logd, compare.name,
                                                   predictor.name)))
                    if h5 is not None:
                        if not utf8(rel):
                            result.failures.append({"file": entry(rec), "reason": "its name is not UTF-8, which an "
                                                    "HDF5 dataset's name must be"})
                            continue
                        data = logd.astype(np.float32)  # (stopped while HDF5 can still close the file)
                        ensure_room(Path(tmp).parent, data.nbytes + HDF5_CLOSING,
                                    f"the map of {rel} with room for HDF5 to close the file")
                        h5.create_dataset(rel, data=data, compression="gzip", compression_opts=4)
                    else:
                        maps.append((rec, write(_write_png, out / f"{rel}.png", logd, predictor.density)))
                bar.update(len(batch))
            for rec, w in maps:
                if _too_long(w):
                    result.failures.append({"file": entry(rec), "reason": "its map's name is too long for the "
                                            f"filesystem: {out / rec.source_id}.png"})
            for rec, w in sheets_:
                if _too_long(w):  # the map is there: no failure, a line
                    result.cc.pop(str(rec.source_id), None)
                    print(f"warning: no comparison sheet for {rec.source_id}: its name is too long for the "
                          "filesystem", file=sys.stderr)
            result.written = len(records) - len(result.failures)  # each image failed once, or has its map
            if fmt == "png":  # a map an earlier run made of a picture since replaced is not this image's
                rel_of = {entry(r): str(r.source_id) for r in records}
                _remove_stale(out, [rel_of[f["file"]] for f in result.failures], result.compare_dir)
            if not result.written:
                raise NoMaps(result)  # before any mark of completion (the HDF5 file is discarded)
            if h5 is not None:  # what predictions.json says of a png folder's failures
                h5.attrs["failures"] = json.dumps(result.failures)
        if fmt == "png":  # the completion mark, while the folder is still held
            doc = {"model": predictor.name, "source": str(folder.resolve()), "maps": result.written,
                   "failures": result.failures}
            if not predictor.density:
                doc["map"] = predictor.map_name  # each PNG scaled from its own minimum to its maximum
            if compare is not None:
                doc.update(compare_teacher=compare.name, compare_sheets=str(result.compare_dir),
                           cc_with_teacher=dict(sorted(result.cc.items())))
            write_json(out / "predictions.json", doc)
    result.seconds = time.perf_counter() - t0
    return result


def writes_over_images(folder, out) -> str:
    """Why ``out`` cannot take the maps of ``folder``'s images (it is that folder, or lies in a label folder), or
    "" (also for a place on object storage)."""
    local = local_place(out)
    if local is None:
        return ""
    if local.resolve() == Path(folder).resolve():
        return (f"{out} is the image folder itself: the maps would be written among (and over) the images; give "
                "another folder")
    inside = enclosing_label_folder(out)
    if inside is not None:
        return (f"{out} lies in the label folder {inside}: the maps would be written among its shards; give "
                "another folder")
    return ""


def photos_in_outputs(folder: Path, own: list[Path]) -> list[str]:
    """The image files (relative to ``folder``, sorted) in the run's own output folders ``own`` that lie inside
    ``folder``, which are left out of its images, other than the maps and sheets a ``predict`` writes there
    (``<name>.<image suffix>.png``)."""
    base = folder.resolve()
    found = []
    for o in own:
        o = o.resolve()
        if not (o.is_relative_to(base) and o.is_dir()):
            continue
        for p in o.rglob("*"):
            name = p.name.lower()
            ours = name.endswith(".png") and Path(name[:-4]).suffix in IMAGE_SUFFIXES  # a map: x.jpg.png
            if p.suffix.lower() in IMAGE_SUFFIXES and not ours and not p.is_dir():
                found.append(p.relative_to(base).as_posix())
    return sorted(set(found))


def label_folder_as_images(folder) -> str:
    """Why ``folder`` is no folder of images to map (a label folder: its images are in its shards), or ""."""
    if enclosing_label_folder(folder) is None:
        return ""
    return (f"{folder} is a label folder of `pipeline label` (its images are inside its shards, which predict does "
            "not read): give the folder of the photos (`pipeline eval --labels` scores a model on a label folder)")


def utf8(name: str) -> bool:
    """Whether ``name`` (as the filesystem gave it: undecodable bytes as surrogates) is valid UTF-8."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _too_long(written) -> bool:
    """Whether a write's future failed for a file name the filesystem cannot take; any other write error (a full
    disk, a read-only folder) is the run's one error and is raised."""
    try:
        written.result()
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        return True
    return False


def _remove_stale(out, failed: list[str], compare_dir) -> None:
    """Remove what an earlier run left at the map path (and, with sheets, the sheet path) of each image of
    ``failed`` (relative paths) that failed in this run, said in a ``note:`` line: the map of the picture the
    file held before stayed beside a predictions.json listing the image as failed."""
    places = [("map", out)] + ([("comparison sheet", compare_dir)] if compare_dir is not None else [])
    for kind, where in places:
        gone = [f"{rel}.png" for rel in failed if _unlink_file(where / f"{rel}.png")]
        if gone:
            n = len(gone)
            shown = ", ".join(gone[:5]) + (f" and {n - 5} more" if n > 5 else "")
            why = ("its image failed in this run: it showed what the file held before" if n == 1 else
                   "their images failed in this run: they showed what the files held before")
            print(f"note: removed {n} {kind}{'s' if n > 1 else ''} an earlier run left in {where} ({why}): {shown}",
                  file=sys.stderr)


def _unlink_file(path) -> bool:
    """Remove the file at ``path``; whether there was one (a folder there is left alone)."""
    try:
        if not path.is_file():
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # (its map's name was too long: nothing can be there)
            return False
        raise
    return True


def _write_png(path: Path, logd: np.ndarray, density: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(map_png(logd, density))


def _write_sheet(result: PredictResult, rel: str, rgb: np.ndarray, teacher: np.ndarray, student: np.ndarray,
                 teacher_name: str, student_name: str) -> None:
    path = result.compare_dir / f"{rel}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    result.cc[rel] = sheets.agreement(teacher, student)
    short = student_name.split("@")[0]  # a checkpoint's name ends with its path: too long for a caption
    with atomic_open(path, "wb") as f:
        f.write(sheets.sheet_png(rgb, teacher, student, teacher_name=f"teacher {teacher_name}",
                                 student_name=short, title=Path(rel).name))
