"""Saliency maps for a folder of images: PNGs, or one HDF5 of log densities for pysaliency.

``png``: ``<out>/<relative path>.png``, 8-bit, the density divided by its maximum (each written
atomically), then ``<out>/predictions.json`` (model, maps, failures) last, as the completion mark. ``hdf5``: one file whose datasets are named by the images' paths relative to the
folder (``sub/img.jpg``), each the float32 log density at the image's size; pysaliency's
``HDF5Model(stimuli, file)`` reads it (its keys are matched against the stimuli's file names), and
its root attributes say what it is. The HDF5 is written under a temporary name and renamed when
complete.
"""

from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.common import images
from pipeline.common.atomic import atomic_open, atomic_path, write_json
from pipeline.common.prefetch import batched, prefetched
from pipeline.common.tables import table
from pipeline.score.predictors import Predictor
from pipeline.label.sources import folder_records

FORMATS = ("png", "hdf5")


@dataclass
class PredictResult:
    out: Path
    written: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("maps written", str(self.written)), ("images failed", str(len(self.failures))),
                ("wall time", f"{self.seconds:.1f} s"), ("images/s", f"{self.written / max(self.seconds, 1e-9):.1f}"),
                ("output", str(self.out))]
        return table(None, rows)


def map_png(log_density: np.ndarray) -> bytes:
    density = np.exp(log_density - log_density.max())
    return images.encode_png(np.rint(density * 255.0).astype(np.uint8))


def predict_folder(predictor: Predictor, folder: str | Path, out: str | Path, *, fmt: str = "png",
                   batch_size: int = 8, io_threads: int = 4, progress: bool = True) -> PredictResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} ({', '.join(FORMATS)})")
    t0 = time.perf_counter()
    folder, out = Path(folder), Path(out)
    records = folder_records(folder)
    result = PredictResult(out)
    with contextlib.ExitStack() as stack:
        h5 = None
        if fmt == "hdf5":
            import h5py

            out.parent.mkdir(parents=True, exist_ok=True)
            h5 = stack.enter_context(h5py.File(stack.enter_context(atomic_path(out)), "w"))
            h5.attrs.update({"type": "pysaliency.precomputed_models.predictions", "version": "1.0",
                             "model": predictor.name, "content": "log_density", "source": str(folder.resolve())})
        else:
            out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(io_threads) as pool, \
                tqdm(total=len(records), unit="img", desc=f"predict {predictor.name}", disable=not progress,
                     file=sys.stderr, dynamic_ncols=True) as bar:
            writes = []
            for batch in batched(prefetched(pool, records, lambda r: images.read_image(r.path), 3 * batch_size,
                                            catch=images.ImageError), batch_size):
                good = [(r, x) for r, x in batch if not isinstance(x, Exception)]
                result.failures += [{"file": r.path, "reason": str(x)} for r, x in batch if isinstance(x, Exception)]
                for (rec, _), logd in zip(good, predictor.log_densities([x for _, x in good])):
                    rel = str(rec.source_id)
                    if h5 is not None:
                        h5.create_dataset(rel, data=logd.astype(np.float32), compression="gzip", compression_opts=4)
                    else:
                        writes.append(pool.submit(_write_png, out / f"{rel}.png", logd))
                    result.written += 1
                bar.update(len(batch))
            for w in writes:
                w.result()
    if fmt == "png":
        write_json(out / "predictions.json", {"model": predictor.name, "source": str(folder.resolve()),
                                              "maps": result.written, "failures": result.failures})
    result.seconds = time.perf_counter() - t0
    return result


def _write_png(path: Path, logd: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(map_png(logd))
