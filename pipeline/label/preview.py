"""A contact sheet of labelled samples (image | label heat map), for a person to look at."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from pipeline.common.atomic import atomic_open
from pipeline.common.images import opencv


def _heat(label: np.ndarray) -> np.ndarray:
    x = label.astype(np.float32)
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return cv2.applyColorMap((x * 255).astype(np.uint8), cv2.COLORMAP_JET)


def caption(key: str) -> str:
    """``key`` as OpenCV's Hershey fonts can draw it (ASCII alone: they draw any other letter as ``?``): accents
    dropped (``café`` → ``cafe``), other letters ``?``."""
    bare = "".join(c for c in unicodedata.normalize("NFKD", key) if not unicodedata.combining(c))
    return bare.encode("ascii", "replace").decode("ascii")


def write_preview(tar: str | Path, label_key: str, out: str | Path, n: int = 8) -> Path:
    """Write ``out`` (PNG): up to ``n`` samples of ``tar``, each as the image beside its label over it."""
    rows = []
    for sample in wds.WebDataset(str(tar), shardshuffle=False):
        if len(rows) == n:
            break
        bgr = opencv().imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
        raw = sample[label_key]
        if label_key.endswith(".npy"):
            label = np.exp(np.load(io.BytesIO(raw)).astype(np.float32))
        else:
            label = opencv().imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_GRAYSCALE)
        overlay = cv2.addWeighted(bgr, 0.45, _heat(label), 0.55, 0)
        row = np.hstack([bgr, overlay])
        for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):  # white on a black outline: read on any photo
            cv2.putText(row, caption(sample["__key__"]), (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, thickness, cv2.LINE_AA)
        rows.append(row)
    if not rows:
        raise ValueError(f"{tar} holds no samples")
    ok, buf = cv2.imencode(".png", np.vstack(rows) if len(rows) > 1 else rows[0])
    with atomic_open(out, "wb") as f:
        f.write(buf.tobytes())
    return Path(out)
