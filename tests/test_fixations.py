"""Fixation readers: tiny SALICON / MIT1003 / CAT2000 trees in each publisher's layout → HDF5 → back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from scipy.io import savemat

from pipeline.score.fixations import (FixationError, FixationSet, convert, read_cat2000, read_hdf5, read_mit1003,
                                      read_salicon, write_hdf5)
from tests.conftest import photo, write_jpeg


def stimulus(path: Path, h: int, w: int, which: str = "astronaut", progressive: bool = False) -> None:
    """A real photo resized to exactly h×w, written as a JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.resize(photo(which), (w, h), interpolation=cv2.INTER_AREA)
    if progressive:
        bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
        assert cv2.imwrite(str(path), bgr, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    else:
        write_jpeg(path, img)


# --------------------------------------------------------------------------------------------
# SALICON: fixations_<split>2015r1.json (COCO style, [row, col] 1-based) + images/<split>/


SAL_IMAGES = {  # id: (file_name, h, w) — listed out of order in the JSON on purpose
    73: ("COCO_val2014_000000000073.jpg", 32, 32),
    9: ("COCO_val2014_000000000009.jpg", 40, 56),
    42: ("COCO_val2014_000000000042.jpg", 48, 64),
}


def salicon_doc() -> dict:
    images = [
        {"license": 1, "url": "http://example/x.jpg", "file_name": f, "height": h, "width": w,
         "date_captured": "2013-11-14 21:09:00", "id": i}
        for i, (f, h, w) in SAL_IMAGES.items()
    ]
    annotations = [
        # worker 307 comes first in the file, but worker 12 sorts first
        {"image_id": 9, "worker_id": 307, "id": 1,
         "fixations": [[1, 1], [40, 56], [20, 30], [0, 5], [41, 1], [3, 57], [10.6, 3.2]]},
        {"image_id": 42, "worker_id": 5, "id": 2, "fixations": [[48, 64], [2, 3]]},
        {"image_id": 9, "worker_id": 12, "id": 3, "fixations": [[5, 6]]},
        {"image_id": 42, "worker_id": 5, "id": 4, "fixations": []},
    ]
    return {"info": {"description": "test", "version": "1.0", "year": 2015}, "images": images,
            "licenses": [{"id": 1, "name": "x", "url": "y"}], "type": "fixations", "annotations": annotations}


@pytest.fixture
def salicon_root(tmp_path) -> Path:
    root = tmp_path / "SALICON"
    for (f, h, w), which in zip(SAL_IMAGES.values(), ["astronaut", "coffee", "chelsea"]):
        stimulus(root / "images" / "val" / f, h, w, which)
    stimulus(root / "images" / "val" / "COCO_val2014_000000099999.jpg", 20, 20)  # on disk, not in the JSON
    (root / "annotations").mkdir()
    (root / "annotations" / "fixations_val2015r1.json").write_text(json.dumps(salicon_doc()))
    return root


def test_salicon_reads_row_col_one_based_sorted_by_file_name(salicon_root):
    fs = read_salicon(salicon_root, "val")
    assert fs.name == "salicon" and fs.split == "val" and len(fs) == 3
    assert fs.names == ["COCO_val2014_000000000009", "COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert fs.paths[0] == "images/val/COCO_val2014_000000000009.jpg"
    assert fs.image_path(0) == salicon_root.resolve() / "images/val/COCO_val2014_000000000009.jpg"
    assert fs.image_path(0).is_file()
    assert fs.sizes.tolist() == [[40, 56], [48, 64], [32, 32]]
    ys, xs = fs.fixations(0)
    # worker 12 first, then worker 307 in list order; [0,5], [41,1], [3,57] fall outside 40×56;
    # [10.6, 3.2] is rounded to the nearest pixel (11, 3) → 0-based (10, 2)
    assert list(zip(ys.tolist(), xs.tolist())) == [(4, 5), (0, 0), (39, 55), (19, 29), (10, 2)]
    assert fs.subjects(0).tolist() == [12, 307, 307, 307, 307]
    ys, xs = fs.fixations(1)
    assert list(zip(ys.tolist(), xs.tolist())) == [(47, 63), (1, 2)]
    assert fs.fixations(2)[0].size == 0  # listed, never annotated: kept with no fixations
    assert fs.n_skipped == 3 and fs.n_fixations == 7
    assert fs.image_index.tolist() == [0, 0, 0, 0, 0, 1, 1]
    m = fs.fixation_map(1)
    assert m.shape == (48, 64) and m.sum() == 2 and m[47, 63] and m[1, 2]


def salicon_mat(path: Path, image: str, size: tuple[int, int], observers: list) -> None:
    """One image's fixation file as salicon.net's releases ship it (fixations/<split>/<image>.mat, MATLAB v5):
    ``image``, ``resolution`` [h w] and ``gaze``, a struct array of one entry per observer with ``location``
    (mouse samples), ``timestamp`` and ``fixations``, both as 1-based [x y] rows."""
    gaze = np.zeros((len(observers), 1), dtype=[("location", "O"), ("timestamp", "O"), ("fixations", "O")])
    for k, fix in enumerate(observers):
        fix = np.asarray(fix, dtype=np.float64).reshape(-1, 2)
        samples = np.repeat(fix, 3, axis=0) + 0.25  # (a track around each fixation: not read)
        gaze[k, 0] = (samples, np.arange(len(samples), dtype=np.float64)[:, None] * 8, fix)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {"image": image, "resolution": np.array([[size[0], size[1]]], dtype=np.float64),
                        "gaze": gaze})


def test_salicon_mat_release_reads_each_observers_fixations_x_y_one_based(tmp_path):
    """The .mat files salicon.net serves now (the 2015 and 2017 editions, as pysaliency reads them) give the set
    the JSON release gives for the same points (written there as [row, col], here as [x, y])."""
    root = tmp_path / "SALICON"
    for (f, h, w), which in zip(SAL_IMAGES.values(), ["astronaut", "coffee", "chelsea"]):
        stimulus(root / "images" / "val" / f, h, w, which)
    folder = root / "fixations" / "val"

    def xy(pts):  # the JSON's [row, col] as the .mat's [x, y]
        return [[x, y] for y, x in pts]

    salicon_mat(folder / "COCO_val2014_000000000009.mat", "COCO_val2014_000000000009", (40, 56),
                [xy([[5, 6]]), xy([[1, 1], [40, 56], [20, 30], [0, 5], [41, 1], [3, 57], [10.6, 3.2]])])
    salicon_mat(folder / "COCO_val2014_000000000042.mat", "COCO_val2014_000000000042", (48, 64),
                [xy([[48, 64], [2, 3]]), []])
    salicon_mat(folder / "COCO_val2014_000000000073.mat", "COCO_val2014_000000000073.jpg", (32, 32), [])  # (either)
    fs = read_salicon(root, "val")
    assert fs.names == ["COCO_val2014_000000000009", "COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert fs.paths[0] == "images/val/COCO_val2014_000000000009.jpg"
    assert fs.sizes.tolist() == [[40, 56], [48, 64], [32, 32]]
    assert list(zip(*(a.tolist() for a in fs.fixations(0)))) == [(4, 5), (0, 0), (39, 55), (19, 29), (10, 2)]
    assert fs.subjects(0).tolist() == [0, 1, 1, 1, 1]  # the observer's entry in gaze
    assert list(zip(*(a.tolist() for a in fs.fixations(1)))) == [(47, 63), (1, 2)]
    assert fs.fixations(2)[0].size == 0 and fs.n_skipped == 3 and fs.n_fixations == 7

    salicon_mat(folder / "COCO_val2014_000000000042.mat", "COCO_val2014_000000000042", (40, 64), [])
    with pytest.raises(FixationError, match="COCO_val2014_000000000042.jpg: image is 48x64 .* says 40x64$"):
        read_salicon(root, "val")
    savemat(str(folder / "COCO_val2014_000000000042.mat"), {"fixLocs": np.zeros((2, 2))})
    with pytest.raises(FixationError, match=r"042.mat: not a SALICON fixation file \(variables \['fixLocs'\]\)"):
        read_salicon(root, "val")


def test_salicon_plain_2015_name_at_root_and_images_beside(tmp_path):
    root = tmp_path / "s"
    stimulus(root / "train" / "COCO_train2014_000000000009.jpg", 24, 36)
    doc = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 24, "width": 36}],
           "annotations": [{"image_id": 9, "worker_id": 1, "fixations": [[24, 36]]}]}
    (root / "fixations_train2015.json").write_text(json.dumps(doc))
    fs = read_salicon(root, "train")
    assert fs.paths == ["train/COCO_train2014_000000000009.jpg"]
    assert [a.tolist() for a in fs.fixations(0)] == [[23], [35]]


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: (r / "annotations/fixations_val2015r1.json").unlink(),
         "SALICON val annotations not found: expected fixations_val2015r1.json or fixations_val2015.json in {root} "
         "or {root}/annotations, or the release's .mat files in {root}/fixations/val"),
        (lambda r: (r / "annotations/fixations_val2015r1.json").write_text('{"images": [1, '),
         "{root}/annotations/fixations_val2015r1.json: not readable JSON"),
        (lambda r: (r / "annotations/fixations_val2015r1.json").write_text('{"images": []}'),
         "{root}/annotations/fixations_val2015r1.json: not a SALICON fixations file; expected a JSON object with lists 'images' and 'annotations'"),
        (lambda r: (r / "images/val/COCO_val2014_000000000042.jpg").unlink(),
         "SALICON image missing: fixations_val2015r1.json lists COCO_val2014_000000000042.jpg, expected at {root}/images/val/COCO_val2014_000000000042.jpg"),
        (lambda r: [p.unlink() for p in (r / "images/val").iterdir()] and (r / "images/val").rmdir(),
         "SALICON val images not found: expected the folder {root}/images/val"),
        (lambda r: stimulus(r / "images/val/COCO_val2014_000000000009.jpg", 41, 56),
         "{root}/images/val/COCO_val2014_000000000009.jpg: image is 41x56 (HxW) but fixations_val2015r1.json says 40x56"),
    ],
    ids=["no-json", "bad-json", "not-salicon", "image-missing", "no-image-folder", "size-mismatch"],
)
def test_salicon_bad_input_names_the_file(salicon_root, break_it, message):
    break_it(salicon_root)
    with pytest.raises(FixationError) as e:
        read_salicon(salicon_root, "val")
    assert message.format(root=salicon_root) in str(e.value)
    assert "\n" not in str(e.value)


def test_salicon_fixations_for_an_unlisted_image(salicon_root):
    doc = salicon_doc()
    doc["annotations"].append({"image_id": 555, "worker_id": 1, "fixations": [[1, 1]]})
    (salicon_root / "annotations/fixations_val2015r1.json").write_text(json.dumps(doc))
    with pytest.raises(FixationError, match=r"annotations\[4\] refers to image_id 555, which 'images' does not list"):
        read_salicon(salicon_root, "val")


def test_salicon_malformed_fixations(salicon_root):
    doc = salicon_doc()
    doc["annotations"][1]["fixations"] = [[1, 2, 3]]
    (salicon_root / "annotations/fixations_val2015r1.json").write_text(json.dumps(doc))
    with pytest.raises(FixationError, match=r"annotations\[1\]\.fixations is malformed; expected a list of \[row, col\] pairs"):
        read_salicon(salicon_root, "val")


def test_salicon_test_split_has_no_fixations(salicon_root):
    with pytest.raises(FixationError, match="SALICON split 'test' has no fixations: expected one of train, val"):
        read_salicon(salicon_root, "test")


# --------------------------------------------------------------------------------------------
# MIT1003: ALLSTIMULI/<name>.jpeg + ALLFIXATIONMAPS/<name>_fixPts.jpg (binary JPEG at image size)


MIT_POINTS = {
    "i05june05_static_street_boston_p1010764": ((30, 40), [(0, 0), (29, 39), (5, 7), (5, 30), (17, 2)]),
    "i1000": ((36, 24), [(12, 12), (35, 0)]),
    "aa_empty": ((20, 20), []),
}


def write_fixpts(path: Path, h: int, w: int, points, quality: int = 50) -> None:
    m = np.zeros((h, w), np.uint8)
    for y, x in points:
        m[y, x] = 255
    assert cv2.imwrite(str(path), m, [cv2.IMWRITE_JPEG_QUALITY, quality])


@pytest.fixture
def mit_root(tmp_path) -> Path:
    root = tmp_path / "MIT1003"
    (root / "ALLFIXATIONMAPS").mkdir(parents=True)
    for k, (name, ((h, w), pts)) in enumerate(MIT_POINTS.items()):
        stimulus(root / "ALLSTIMULI" / f"{name}.jpeg", h, w, ["coffee", "rocket", "camera"][k], progressive=k == 1)
        write_fixpts(root / "ALLFIXATIONMAPS" / f"{name}_fixPts.jpg", h, w, pts)
        blurred = cv2.GaussianBlur(np.full((h, w), 200, np.uint8), (5, 5), 2)
        cv2.imwrite(str(root / "ALLFIXATIONMAPS" / f"{name}_fixMap.jpg"), blurred)  # must be ignored
    (root / "ALLSTIMULI" / "Thumbs.db").write_bytes(b"\0" * 10)  # not a stimulus
    return root


def test_mit1003_reads_fixpts_jpegs(mit_root):
    fs = read_mit1003(mit_root)
    assert fs.name == "mit1003" and len(fs) == 3
    assert fs.names == ["aa_empty", "i05june05_static_street_boston_p1010764", "i1000"]
    assert fs.paths[1] == "ALLSTIMULI/i05june05_static_street_boston_p1010764.jpeg"
    assert fs.sizes.tolist() == [[20, 20], [30, 40], [36, 24]]  # i1000 is a progressive JPEG
    for i, name in enumerate(fs.names):
        ys, xs = fs.fixations(i)
        assert list(zip(ys.tolist(), xs.tolist())) == sorted(MIT_POINTS[name][1])  # row-major
    assert fs.n_fixations == 7 and fs.n_skipped == 0
    assert (fs.subject == -1).all()


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: (r / "ALLFIXATIONMAPS/i1000_fixPts.jpg").unlink(),
         "{root}/ALLSTIMULI/i1000.jpeg: image without its fixations; expected {root}/ALLFIXATIONMAPS/i1000_fixPts.jpg"),
        (lambda r: write_fixpts(r / "ALLFIXATIONMAPS/zz_fixPts.jpg", 10, 10, [(1, 1)]),
         "{root}/ALLFIXATIONMAPS/zz_fixPts.jpg: fixation file without its image; expected {root}/ALLSTIMULI/zz.jpeg"),
        (lambda r: write_fixpts(r / "ALLFIXATIONMAPS/i1000_fixPts.jpg", 24, 36, [(1, 1)]),
         "{root}/ALLFIXATIONMAPS/i1000_fixPts.jpg: fixation map is 24x36 (HxW) but its image i1000.jpeg is 36x24; expected the same size"),
        (lambda r: (r / "ALLFIXATIONMAPS/i1000_fixPts.jpg").write_bytes(b"not a jpeg"),
         "{root}/ALLFIXATIONMAPS/i1000_fixPts.jpg: not a readable image; expected a grayscale JPEG fixation-point map"),
        (lambda r: [p.unlink() for p in (r / "ALLFIXATIONMAPS").iterdir()] and (r / "ALLFIXATIONMAPS").rmdir(),
         "MIT1003 fixation folder (ALLFIXATIONMAPS/<name>_fixPts.jpg) not found: expected the folder {root}/ALLFIXATIONMAPS"),
        (lambda r: [p.unlink() for p in (r / "ALLFIXATIONMAPS").iterdir()] and (r / "ALLFIXATIONMAPS").rename(r / "DATA"),
         "MIT1003 fixation folder (ALLFIXATIONMAPS/<name>_fixPts.jpg) not found: expected the folder "
         "{root}/ALLFIXATIONMAPS (the eye-tracking files in {root}/DATA are not read: ALLFIXATIONMAPS.zip of the same "
         "release holds the fixations)"),
    ],
    ids=["fixpts-missing", "orphan-fixpts", "size-mismatch", "unreadable-fixpts", "no-folder", "data-alone"],
)
def test_mit1003_bad_input_names_the_file(mit_root, break_it, message):
    break_it(mit_root)
    with pytest.raises(FixationError) as e:
        read_mit1003(mit_root)
    assert message.format(root=mit_root) == str(e.value)


# --------------------------------------------------------------------------------------------
# CAT2000: trainSet/Stimuli/<Category>/<n>.jpg + trainSet/FIXATIONLOCS/<Category>/<n>.mat (fixLocs)


CAT_POINTS = {
    ("Action", "002"): ((27, 48), [(0, 47), (26, 0), (13, 20)]),
    ("Action", "001"): ((27, 48), [(3, 4)]),
    ("Art", "001"): ((30, 20), [(29, 19), (0, 0)]),
}


def write_fixlocs(path: Path, h: int, w: int, points, var: str = "fixLocs") -> None:
    m = np.zeros((h, w), np.float64)  # MATLAB double, as loaded by the release's eval code
    for y, x in points:
        m[y, x] = 1
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {var: m})  # MATLAB v5


@pytest.fixture
def cat_root(tmp_path) -> Path:
    """The folder holding trainSet/, as the release unzips."""
    top = tmp_path / "CAT2000"
    root = top / "trainSet"
    for (cat, n), ((h, w), pts) in CAT_POINTS.items():
        stimulus(root / "Stimuli" / cat / f"{n}.jpg", h, w, "chelsea")
        write_fixlocs(root / "FIXATIONLOCS" / cat / f"{n}.mat", h, w, pts)
    stimulus(root / "Stimuli" / "Action" / "Output" / "001.jpg", 10, 10)  # sub-folder: ignored
    return top


def test_cat2000_reads_fixlocs_mat(cat_root):
    fs = read_cat2000(cat_root)
    assert fs.name == "cat2000" and len(fs) == 3
    assert fs.root == (cat_root / "trainSet").resolve()
    assert fs.names == ["Action/001", "Action/002", "Art/001"]
    assert fs.paths == ["Stimuli/Action/001.jpg", "Stimuli/Action/002.jpg", "Stimuli/Art/001.jpg"]
    assert fs.sizes.tolist() == [[27, 48], [27, 48], [30, 20]]
    for i, name in enumerate(fs.names):
        ys, xs = fs.fixations(i)
        assert list(zip(ys.tolist(), xs.tolist())) == sorted(CAT_POINTS[tuple(name.split("/"))][1])
    assert fs.image_path(2).is_file()
    # the trainSet folder itself is accepted as the root too, with the same result
    assert read_cat2000(cat_root / "trainSet") == fs


def _v73_mat(path: Path) -> None:
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(116) + b"\0" * 8 + b"\x00\x02IM"
    path.write_bytes(header + b"\0" * 512)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda r: (r / "FIXATIONLOCS/Art/001.mat").unlink(),
         "{r}/Stimuli/Art/001.jpg: image without its fixations; expected {r}/FIXATIONLOCS/Art/001.mat"),
        (lambda r: write_fixlocs(r / "FIXATIONLOCS/Art/007.mat", 30, 20, []),
         "{r}/FIXATIONLOCS/Art/007.mat: fixation file without its image; expected {r}/Stimuli/Art/007.jpg"),
        (lambda r: write_fixlocs(r / "FIXATIONLOCS/Noisy/001.mat", 30, 20, []),
         "{r}/FIXATIONLOCS/Noisy: fixation category without stimuli; expected {r}/Stimuli/Noisy"),
        (lambda r: write_fixlocs(r / "FIXATIONLOCS/Art/001.mat", 30, 20, [], var="fixations"),
         "{r}/FIXATIONLOCS/Art/001.mat: no variable 'fixLocs' (found ['fixations']); expected the binary fixation matrix"),
        (lambda r: write_fixlocs(r / "FIXATIONLOCS/Art/001.mat", 20, 30, []),
         "{r}/FIXATIONLOCS/Art/001.mat: fixLocs is 20x30 (HxW) but its image Art/001.jpg is 30x20; expected the same size"),
        (lambda r: (r / "FIXATIONLOCS/Art/001.mat").write_bytes(b"garbage" * 40),
         "{r}/FIXATIONLOCS/Art/001.mat: not a readable .mat file"),
        (lambda r: _v73_mat(r / "FIXATIONLOCS/Art/001.mat"),
         "{r}/FIXATIONLOCS/Art/001.mat: MATLAB v7.3 (HDF5) .mat is not supported; expected a MATLAB v5 .mat"),
    ],
    ids=["mat-missing", "orphan-mat", "orphan-category", "wrong-variable", "size-mismatch", "garbage", "v7.3"],
)
def test_cat2000_bad_input_names_the_file(cat_root, break_it, message):
    r = cat_root / "trainSet"
    break_it(r)
    with pytest.raises(FixationError) as e:
        read_cat2000(cat_root)
    assert str(e.value).startswith(message.format(r=r))
    assert "\n" not in str(e.value)


def test_cat2000_missing_fixation_folder(tmp_path):
    stimulus(tmp_path / "Stimuli" / "Art" / "001.jpg", 10, 10)
    with pytest.raises(FixationError) as e:
        read_cat2000(tmp_path)
    assert str(e.value) == f"CAT2000 fixation folder (FIXATIONLOCS/<Category>/<name>.mat) not found: expected the folder {tmp_path}/FIXATIONLOCS"


# --------------------------------------------------------------------------------------------
# HDF5


@pytest.fixture(params=["salicon", "mit1003", "cat2000"])
def any_set(request, tmp_path) -> FixationSet:
    if request.param == "salicon":
        return read_salicon(request.getfixturevalue("salicon_root"), "val")
    if request.param == "mit1003":
        return read_mit1003(request.getfixturevalue("mit_root"))
    return read_cat2000(request.getfixturevalue("cat_root"))


def test_hdf5_round_trip_and_layout(any_set, tmp_path):
    out = write_hdf5(any_set, tmp_path / "out" / "fix.h5")
    back = read_hdf5(out)
    assert back == any_set
    for i in range(len(back)):
        for a, b in zip(back.fixations(i), any_set.fixations(i)):
            np.testing.assert_array_equal(a, b)
        assert back.image_path(i).is_file()
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "saliency-pipeline/fixations" and f.attrs["format_version"] == 1
        assert f.attrs["dataset"] == any_set.name and f.attrs["n_images"] == len(any_set)
        assert f.attrs["n_fixations"] == any_set.n_fixations and f.attrs["n_skipped"] == any_set.n_skipped
        assert f.attrs["source_root"] == str(any_set.root)
        assert f["images/size"].shape == (len(any_set), 2)
        assert f["images/offset"][-1] == any_set.n_fixations
        assert f["fixations/y"].dtype == np.int32 and f["fixations/y"].shape == (any_set.n_fixations,)
    assert [p.name for p in out.parent.iterdir()] == ["fix.h5"]  # no temp left behind


def test_conversion_is_deterministic(mit_root, tmp_path):
    a, b = read_mit1003(mit_root), read_mit1003(mit_root)
    assert a == b
    assert read_hdf5(write_hdf5(a, tmp_path / "a.h5")) == read_hdf5(write_hdf5(b, tmp_path / "b.h5"))


def test_read_hdf5_root_override(mit_root, tmp_path):
    path = write_hdf5(read_mit1003(mit_root), tmp_path / "m.h5")
    moved = tmp_path / "moved"
    mit_root.rename(moved)
    fs = read_hdf5(path, root=moved)
    assert fs.image_path(0) == moved / "ALLSTIMULI/aa_empty.jpeg" and fs.image_path(0).is_file()


def test_failed_write_keeps_the_old_file(mit_root, cat_root, tmp_path, monkeypatch):
    out = write_hdf5(read_mit1003(mit_root), tmp_path / "fix.h5")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)  # the atomic writer renames with os.replace
    with pytest.raises(OSError, match="disk full"):
        write_hdf5(read_cat2000(cat_root), out)
    assert read_hdf5(out).name == "mit1003"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["fix.h5"]


def test_hdf5_that_is_not_ours(tmp_path, mit_root):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(FixationError, match="notes.h5: not an HDF5 file; expected fixations written by `pipeline fixations`"):
        read_hdf5(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    with pytest.raises(FixationError, match="other.h5: HDF5 file is not a fixation set; expected attribute format='saliency-pipeline/fixations'"):
        read_hdf5(other)
    newer = write_hdf5(read_mit1003(mit_root), tmp_path / "newer.h5")
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(FixationError, match="newer.h5: fixation format version 2; expected 1"):
        read_hdf5(newer)
    cut = write_hdf5(read_mit1003(mit_root), tmp_path / "cut.h5")
    with h5py.File(cut, "a") as f:
        del f["fixations/subject"]
    with pytest.raises(FixationError, match="cut.h5: fixation set is incomplete, missing fixations/subject"):
        read_hdf5(cut)
    with pytest.raises(FixationError, match="fixation file not found: expected .*absent.h5"):
        read_hdf5(tmp_path / "absent.h5")


def test_an_hdf5_stating_more_fixations_than_it_stores_is_refused_before_reading_them(tmp_path, mit_root):
    """A 12 KB file whose fixation arrays are chunked and never written read back 10^8 fixations at (0, 0): 8 GB
    in `eval`. Its shapes and stored bytes are checked against what it states first."""
    bomb = write_hdf5(read_mit1003(mit_root), tmp_path / "bomb.h5")
    n = 10**7
    with h5py.File(bomb, "a") as f:
        f.attrs["n_fixations"] = n
        offsets = f["images/offset"][()]
        offsets[-1] = n
        f["images/offset"][...] = offsets
        for k in ("y", "x", "image_index", "subject"):
            del f[f"fixations/{k}"]
            f.create_dataset(f"fixations/{k}", shape=(n,), dtype=np.int32, chunks=(1 << 20,), compression="gzip")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(FixationError, match=r"bomb.h5: fixation set is inconsistent \(fixations/y states "
                                            r"40,000,000 bytes but stores 0\)"):
        read_hdf5(bomb)
    short = write_hdf5(read_mit1003(mit_root), tmp_path / "short.h5")
    with h5py.File(short, "a") as f:
        f.attrs["n_fixations"] = int(f.attrs["n_fixations"]) + 1
    with pytest.raises(FixationError, match=r"short.h5: fixation set is inconsistent \(fixations/y has shape"):
        read_hdf5(short)


def test_out_of_order_fixations_are_grouped_and_bounds_enforced(tmp_path):
    fs = FixationSet("x", tmp_path, ["a.jpg", "b.jpg"], [[4, 5], [6, 7]],
                     ys=[1, 2, 3], xs=[1, 2, 3], image_index=[1, 0, 1], subject=[7, 8, 9])
    assert [a.tolist() for a in fs.fixations(0)] == [[2], [2]]
    assert fs.fixations(1)[0].tolist() == [1, 3] and fs.subjects(1).tolist() == [7, 9]
    with pytest.raises(ValueError, match=r"fixation \(y=4, x=0\) lies outside image a.jpg of size 4x5"):
        FixationSet("x", tmp_path, ["a.jpg"], [[4, 5]], ys=[4], xs=[0], image_index=[0])


def test_cli_converts_and_reports_errors(mit_root, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    out = tmp_path / "mit.h5"
    r = CliRunner().invoke(cli, ["fixations", "mit1003", "--root", str(mit_root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "3 images, 7 fixations, 0 skipped" in r.output
    assert len(read_hdf5(out)) == 3
    # a split missing, given where there is none, or not one: usage mistakes (exit 2, click's usage line), not a
    # failure of the work (exit 1), said before the dataset is read
    for args, said in ((["salicon"], "Error: salicon needs --split train or --split val (its fixations are "
                                     "published per split)"),
                       (["mit1003", "--split", "val"], "Error: Invalid value for '--split': mit1003 has no splits "
                                                        "(--split is for salicon only)"),
                       (["salicon", "--split", "test"], "Error: Invalid value for '--split': 'test' is not one of "
                                                         "'train', 'val'.")):
        r = CliRunner().invoke(cli, ["fixations", *args, "--root", str(mit_root), "--out", str(tmp_path / "x.h5")])
        assert r.exit_code == 2 and r.output.startswith("Usage: ") and " fixations [OPTIONS]" in r.output, r.output
        assert r.output.strip().splitlines()[-1] == said, r.output
    assert not (tmp_path / "x.h5").exists()


def test_a_dataset_read_as_without_fixations_is_refused_and_mostly_empty_is_warned_of(mit_root, tmp_path):
    """Fixation-point maps written as 1 instead of 255 gave "3 images, 0 fixations", exit 0; eval then failed on
    the baseline, or with `--baseline uniform` printed a table of NaN. Now: one line naming the rule it read by."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    for name, ((h, w), pts) in MIT_POINTS.items():
        m = np.zeros((h, w), np.uint8)
        for y, x in pts:
            m[y, x] = 1
        cv2.imwrite(str(mit_root / "ALLFIXATIONMAPS" / f"{name}_fixPts.jpg"), m)
    out = tmp_path / "mit.h5"
    r = CliRunner().invoke(cli, ["fixations", "mit1003", "--root", str(mit_root), "--out", str(out)])
    assert r.exit_code == 1 and not out.exists()
    assert r.output.splitlines()[-1] == (f"Error: {mit_root}: no fixation found in its 3 images (mit1003: a fixation "
                                         "is pixels of at least 128 in each *_fixPts.jpg); are these the published "
                                         "files?")
    write_fixpts(mit_root / "ALLFIXATIONMAPS" / "i1000_fixPts.jpg", 36, 24, [(12, 12)])  # one of three has one
    with pytest.warns(UserWarning, match="2 of the 3 images of .* have no fixation"):
        convert("mit1003", mit_root, out)
    assert read_hdf5(out).n_fixations == 1

    empty = tmp_path / "cat2000"  # a release's folders with nothing in them was "0 images, 0 fixations", exit 0
    for folder in ("Stimuli/Action", "FIXATIONLOCS/Action"):
        (empty / folder).mkdir(parents=True)
    r = CliRunner().invoke(cli, ["fixations", "cat2000", "--root", str(empty), "--out", str(out)])
    assert r.exit_code == 1 and r.output.splitlines()[-1] == (
        f"Error: {empty}: no images found (cat2000: expected Stimuli/<Category>/<name>.jpg); is it the dataset's "
        "folder?")


def test_pipeline_fixations_on_a_full_disk_is_one_line_and_writes_nothing(mit_root, tmp_path, monkeypatch):
    """h5py crashed or printed a traceback when HDF5 could not close the file on a full disk: `pipeline fixations`
    checks for room first and says so in one line."""
    import collections

    from click.testing import CliRunner

    import pipeline.common.files as files
    from pipeline.cli.main import cli

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(2**30, 0, 2**20))
    out = tmp_path / "out" / "mit.h5"
    result = CliRunner().invoke(cli, ["fixations", "mit1003", "--root", str(mit_root), "--out", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == ("Error: No space left on device: 1 MiB free, the fixation file with room for HDF5 to "
                             f"close it needs 32 MiB: {out.parent}\n")
    assert list(out.parent.iterdir()) == []
