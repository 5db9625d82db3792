"""Regenerate the bundled COCO-format sample from photos that ship with scikit-image.

    pip install scikit-image && python samples/make_sample.py

Writes ``samples/coco/val2017/<id>.jpg`` (long side at most 480 px, JPEG quality 90; grayscale
photos stay grayscale, as some COCO images are) and ``samples/coco/annotations/instances_val2017.json``
in COCO's layout (images, empty annotations, one category). The ids are arbitrary but fixed.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import skimage.data

# (COCO-style id, skimage.data function) — photos only, all bundled with scikit-image
PHOTOS = [
    (139, "astronaut"), (285, "coffee"), (632, "chelsea"), (724, "rocket"), (776, "hubble_deep_field"),
    (785, "immunohistochemistry"), (802, "camera"), (872, "coins"), (885, "stereo_motorcycle"),
    (1000, "colorwheel"), (1268, "clock"), (1296, "retina"),
]


def main(root: Path = Path(__file__).parent / "coco") -> None:
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, name in PHOTOS:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pairs: the left view
            img = img[0]
        img = np.asarray(img)
        h, w = img.shape[:2]
        scale = min(1.0, 480 / max(h, w))
        img = cv2.resize(img, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
        file_name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(root / "val2017" / file_name), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1],
                       "license": 0, "coco_url": "", "date_captured": "", "source": f"skimage.data.{name}"})
    coco = {
        "info": {"description": "saliency-pipeline bundled sample (photos from scikit-image's data module)",
                 "version": "1.0", "year": 2026},
        "licenses": [{"id": 0, "name": "see scikit-image's data/README.txt (public domain / CC0 photos)", "url": ""}],
        "images": images,
        "annotations": [],
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco, indent=1) + "\n")
    print(f"wrote {len(images)} images to {root}")


if __name__ == "__main__":
    main()
