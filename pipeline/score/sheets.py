"""Side-by-side sheets: image | teacher | student, to see at a glance whether a student follows its teacher.

One sheet is one row of three panels of the same height: the photo, the teacher's map and the student's
map, each map a density scaled to its own maximum and drawn with a colour map (dark: low, bright: high),
with a caption over each panel and the CC of the two maps in the student's caption; a colour scale at the
right reads a colour as a fraction of its map's maximum. ``pipeline predict
--compare-teacher`` writes one per image; ``pipeline run``'s report makes a few per scored student.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.common import images
from pipeline.score import metrics

PANEL_HEIGHT = 192
CAPTION = 22  # px of caption band over each panel
SCALE_WIDTH = 46  # px of the colour scale at a sheet's right


def heatmap(log_density: np.ndarray) -> np.ndarray:
    """A log density → RGB uint8: the density over its maximum through the inferno colour map."""
    d = np.exp(log_density.astype(np.float64) - float(np.max(log_density)))
    bgr = cv2.applyColorMap(np.rint(d * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def colour_scale(height: int) -> np.ndarray:
    """The colour scale of :func:`heatmap` as a panel (RGB, ``CAPTION + height`` × ``SCALE_WIDTH``): a bar from
    the map's maximum (top) to 0 (bottom), ticks 1, .5 and 0, captioned "of max"."""
    panel = np.full((CAPTION + height, SCALE_WIDTH, 3), 255, np.uint8)
    ramp = np.linspace(1.0, 0.0, height)[:, None]  # as heatmap() scales a density: its value over the maximum
    bar = cv2.applyColorMap(np.rint(np.repeat(ramp, 10, 1) * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    panel[CAPTION:, 2:12] = cv2.cvtColor(bar, cv2.COLOR_BGR2RGB)
    text = dict(fontFace=cv2.FONT_HERSHEY_SIMPLEX, fontScale=0.4, color=(0, 0, 0), thickness=1,
                lineType=cv2.LINE_AA)
    cv2.putText(panel, "of max", (1, CAPTION - 7), **text)
    for label, y in (("1", CAPTION + 10), (".5", CAPTION + height // 2 + 4), ("0", CAPTION + height - 2)):
        cv2.putText(panel, label, (15, y), **text)
    return panel


def agreement(teacher: np.ndarray, student: np.ndarray) -> float:
    """CC of two log densities (the student's resized to the teacher's size when they differ)."""
    if student.shape != teacher.shape:
        student = cv2.resize(student, (teacher.shape[1], teacher.shape[0]), interpolation=cv2.INTER_LINEAR)
    return float(metrics.cc(np.exp(student.astype(np.float64)), np.exp(teacher.astype(np.float64))))


def _panel(rgb: np.ndarray, caption: str, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    width = max(1, round(w * height / h))
    body = cv2.resize(np.ascontiguousarray(rgb), (width, height),
                      interpolation=cv2.INTER_AREA if h > height else cv2.INTER_CUBIC)
    band = np.full((CAPTION, width, 3), 255, np.uint8)
    scale = 0.45
    text = caption.encode("ascii", "replace").decode("ascii")  # OpenCV's fonts draw ASCII (and crash on a lone
    # surrogate, a file name that is not UTF-8)
    while len(text) > 3 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 6:
        text = text[:-3] + ".."
    cv2.putText(band, text, (3, CAPTION - 7), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.concatenate([band, body], axis=0)


def sheet(rgb: np.ndarray, teacher: np.ndarray, student: np.ndarray, *, teacher_name: str = "teacher",
          student_name: str = "student", title: str = "", height: int = PANEL_HEIGHT) -> np.ndarray:
    """Image | teacher | student as one RGB uint8 array (``teacher``/``student``: log densities, any size)."""
    rgb = rgb if rgb.ndim == 3 else np.stack([rgb] * 3, -1)
    cc = agreement(teacher, student)
    gap = np.full((height + CAPTION, 4, 3), 255, np.uint8)
    panels = [_panel(rgb, title or "image", height), gap, _panel(heatmap(teacher), teacher_name, height), gap,
              _panel(heatmap(student), f"CC {cc:.2f}  {student_name}", height),  # (a narrow panel cuts the name)
              gap, colour_scale(height)]
    return np.concatenate(panels, axis=1)


def sheet_png(*args, **kwargs) -> bytes:
    """:func:`sheet` encoded as PNG."""
    return images.encode_png(cv2.cvtColor(sheet(*args, **kwargs), cv2.COLOR_RGB2BGR))
