"""The bundled sample: what samples/make_sample.py writes, small, and its held-out photos never trained on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "coco"


def make_sample():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "samples" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_bundled_sample_is_what_make_sample_writes(tmp_path):
    make_sample().main(tmp_path / "coco")
    made, bundled = files(tmp_path / "coco"), files(SAMPLE)
    assert sorted(made) == sorted(bundled)
    assert [name for name in made if made[name] != bundled[name]] == []
    assert sum(map(len, bundled.values())) < 3_000_000  # a few MB at most


def test_the_held_out_photos_are_never_trained_on():
    ms = make_sample()
    val = json.loads((SAMPLE / "annotations" / "instances_val2017.json").read_text())["images"]
    train = json.loads((SAMPLE / "annotations" / "instances_train2017.json").read_text())["images"]
    assert len(val) == 12 and len(train) == 256
    held_out = {img["source"].removeprefix("skimage.data.") for img in val}
    assert held_out == {name for _, name in ms.PHOTOS}
    # the training photos: none of the held-out ones, nor another name or view of one of them
    same_scene = {"cat": "chelsea", "motorcycle_right": "stereo_motorcycle", "clock_motion": "clock"}
    assert not held_out & set(ms.TRAIN_PHOTOS)
    assert not set(same_scene) & set(ms.TRAIN_PHOTOS)
    assert {img["id"] for img in val}.isdisjoint(img["id"] for img in train)
    assert all(img["source"] == train[0]["source"] for img in train)
    assert all(name in train[0]["source"] for name in ms.TRAIN_PHOTOS)
