"""Regenerate the bundled COCO-format sample from photos that ship with scikit-image (and matplotlib).

    pip install scikit-image && python samples/make_sample.py

Writes two splits in COCO's layout, each ``samples/coco/<split>/<id>.jpg`` plus
``samples/coco/annotations/instances_<split>.json`` (images, empty annotations, one category):

* ``val2017``: 12 whole photos (long side at most 480 px, JPEG quality 90; grayscale photos stay
  grayscale, as some COCO images are). The demo holds these out: no student ever trains on them.
* ``train2017``: :data:`TRAIN_IMAGES` small images (96x128, JPEG quality 85) made from *other*
  photos (:data:`TRAIN_PHOTOS`, none of them in val2017 nor a view of the same scene): random crops
  (flipped half the time) and collages of crops pasted on a background crop, some of the grey photos
  tinted with random channel gains so that the students see colour. The demo's students learn from
  these, so the val2017 photos are photos never seen in training, not crops of training photos.

Everything is seeded: the same versions of the libraries give the same files. The ids are arbitrary
but fixed (val2017 keeps its 12 ids; train2017's are 1_000_000 + n).
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

#: the photos train2017 is made from: bundled with scikit-image (or matplotlib, a dependency of the
#: pipeline), none of them in val2017 (``cat`` is chelsea, ``motorcycle_right`` is the motorcycle's
#: other view and ``clock_motion`` the clock: all left out)
TRAIN_PHOTOS = ["brick", "grass", "gravel", "moon", "page", "text", "cell", "microaneurysms", "horse", "logo",
                "grace_hopper", "shepp_logan_phantom", "lfw_subset"]
TRAIN_IMAGES = 256
TRAIN_SIZE = (96, 128)  # (H, W) of the train2017 images
TRAIN_ID0 = 1_000_000


def _load(name: str) -> np.ndarray:
    """A training photo as RGB uint8 (``lfw_subset``: its 200 small faces side by side in a 10x20 grid)."""
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            img = cv2.cvtColor(cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    else:
        img = np.asarray(getattr(skimage.data, name)())
    if name == "lfw_subset":
        faces = np.clip(img * 255.0, 0, 255).astype(np.uint8)  # (200, 25, 25) floats in [0, 1]
        img = faces.reshape(10, 20, 25, 25).transpose(0, 2, 1, 3).reshape(250, 500)
    if img.dtype == bool:
        img = np.where(img, 255, 0).astype(np.uint8)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:  # RGBA on white
        alpha = img[..., 3:].astype(np.float32) / 255.0
        img = (img[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def train_images(n: int = TRAIN_IMAGES, size: tuple[int, int] = TRAIN_SIZE, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB images of ``size``: a third crops of one photo, the rest collages (see the module docstring)."""
    rng = np.random.default_rng(seed)
    photos = [_load(name) for name in TRAIN_PHOTOS]
    h, w = size

    def crop(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
        ih, iw = img.shape[:2]
        s = rng.uniform(lo, hi)
        ch, cw = max(8, int(ih * s)), max(8, int(iw * s))
        y, x = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        c = img[y:y + ch, x:x + cw]
        c = c[:, ::-1] if rng.random() < 0.5 else c
        if rng.random() < 0.5:  # tint: grey photos become coloured, coloured ones change hue
            c = np.clip(c * rng.uniform(0.55, 1.15, 3), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(c)

    def resized(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)

    out = []
    for k in range(n):
        if k % 3 == 0:
            out.append(resized(crop(photos[rng.integers(len(photos))], 0.35, 1.0), size))
            continue
        bg = resized(crop(photos[rng.integers(len(photos))], 0.3, 1.0), size)
        for _ in range(rng.integers(1, 4)):
            ph, pw = int(rng.integers(h // 5, h * 2 // 3)), int(rng.integers(w // 6, w * 2 // 3))
            y, x = rng.integers(0, h - ph), rng.integers(0, w - pw)
            bg[y:y + ph, x:x + pw] = resized(crop(photos[rng.integers(len(photos))], 0.15, 0.6), (ph, pw))
        out.append(bg)
    return out


def _coco(images: list[dict], description: str, licence: str) -> dict:
    return {
        "info": {"description": description, "version": "1.0", "year": 2026},
        "licenses": [{"id": 0, "name": licence, "url": ""}],
        "images": images,
        "annotations": [],
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def write_val(root: Path) -> int:
    (root / "val2017").mkdir(parents=True, exist_ok=True)
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
    doc = _coco(images, "saliency-pipeline bundled sample (photos from scikit-image's data module)",
                "see scikit-image's data/README.txt (public domain / CC0 photos)")
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc, indent=1) + "\n")
    return len(images)


def write_train(root: Path, n: int = TRAIN_IMAGES) -> int:
    (root / "train2017").mkdir(parents=True, exist_ok=True)
    images = []
    for k, img in enumerate(train_images(n)):
        image_id = TRAIN_ID0 + k
        file_name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(root / "train2017" / file_name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                    [cv2.IMWRITE_JPEG_QUALITY, 85])
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1],
                       "license": 0, "coco_url": "", "date_captured": "",
                       "source": "crops and collages of " + ", ".join(TRAIN_PHOTOS)})
    doc = _coco(images, "saliency-pipeline bundled sample: crops and collages of photos that are not in val2017",
                "see scikit-image's data/README.txt and matplotlib's sample_data/README.txt")
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc, indent=1) + "\n")
    return len(images)


def main(root: Path = Path(__file__).parent / "coco") -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    n_val, n_train = write_val(root), write_train(root)
    print(f"wrote {n_val} photos to {root / 'val2017'} and {n_train} training images to {root / 'train2017'}")


if __name__ == "__main__":
    main()
