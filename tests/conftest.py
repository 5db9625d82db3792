"""Shared fixtures: small COCO trees built from real photos (scikit-image's bundled data)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# subprocesses (`python -m pipeline`) and Ray workers import this checkout, wherever pytest runs from and
# whichever checkout the environment has installed
ROOT = Path(__file__).resolve().parents[1]
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(ROOT):
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "colorwheel"]


def photo(name: str, long_side: int = 160) -> np.ndarray:
    """A real photo from skimage.data, RGB (or gray) uint8, long side ``long_side``."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    h, w = img.shape[:2]
    s = long_side / max(h, w)
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


def write_jpeg(path: Path, img: np.ndarray) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])


def make_coco(root: Path, split: str, files: dict[int, str], kind: str = "instances") -> Path:
    """Write ``annotations/<kind>_<split>.json`` listing ``files`` ({id: file_name}) in COCO's layout."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images = []
    for image_id, name in files.items():
        p = root / split / name
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED) if p.exists() else None
        h, w = img.shape[:2] if img is not None else (480, 640)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    doc = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    (root / "annotations" / f"{kind}_{split}.json").write_text(json.dumps(doc))
    return root


SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "coco"


def four_photo_coco(root: Path) -> Path:
    """A COCO tree of four real photos in val2017 (ids 3, 7, 42, 99)."""
    (root / "val2017").mkdir(parents=True)
    files = {}
    for image_id, which in zip((3, 7, 42, 99), ("astronaut", "coffee", "chelsea", "rocket")):
        files[image_id] = f"{image_id:012d}.jpg"
        write_jpeg(root / "val2017" / files[image_id], photo(which))
    return make_coco(root, "val2017", files)


def label_classic(coco_root: Path, out: Path, *options) -> Path:
    """``pipeline label coco --teacher classic`` of ``coco_root``'s val2017 into ``out``, in this process, with
    ``options`` (``--shard-size``, ``--image-size``…); the folder of the finished shards."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    r = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(coco_root), "--split",
                                 "val2017", "--out", str(out), "--executor", "local", "--no-progress",
                                 *map(str, options)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return Path(out) / "classic" / "val2017"


@pytest.fixture
def coco_tree(tmp_path) -> Path:
    """A COCO tree with 8 real photos in val2017 (ids deliberately listed out of order)."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    files = {}
    for i, name in enumerate(PHOTOS):
        image_id = [42, 7, 1000, 3, 512, 99, 100000, 8][i]
        files[image_id] = f"{image_id:012d}.jpg"
        write_jpeg(root / "val2017" / files[image_id], photo(name))
    return make_coco(root, "val2017", files)


@contextlib.contextmanager
def chdir(path: Path):
    """``contextlib.chdir`` (Python 3.11) for the 3.10 the project supports."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(before)


def rewrite_shard(folder: Path, name: str, samples: list[dict]) -> None:
    """Write ``samples`` as shard ``name`` of a label folder, with a marker and labels.json entry that agree with
    the tar (a shard damaged in its content, not in its checksums)."""
    from pipeline.label.shards import read_marker, write_shard

    marker = {k: v for k, v in read_marker(folder, name).items() if k not in ("sha256", "bytes")}
    written = write_shard(folder, name, samples, marker)
    index = json.loads((folder / "labels.json").read_text())
    for entry in index["shards"]:
        if entry["tar"] == f"{name}.tar":
            entry["sha256"] = written["sha256"]
    (folder / "labels.json").write_text(json.dumps(index))


def sigkill_when(args: list, ready, what: str, timeout: float = 120.0) -> None:
    """Run ``python -m pipeline ARGS`` in its own process group and SIGKILL the whole group as soon as
    ``ready()`` holds (polled every 10 ms: a busy loop would take a core from the command on a 2-core
    machine); fails if the command ends first or ``timeout`` passes."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the command ended before {what}"
            assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def second_epoch_started(run: Path):
    """For :func:`sigkill_when`: the first step of a training run's second epoch is logged (the first
    epoch is checkpointed, the second is not)."""
    losses = Path(run) / "losses.csv"
    return lambda: losses.is_file() and any(line.startswith("1,") for line in losses.read_text().splitlines())


@pytest.fixture(scope="session")
def sample_labels(tmp_path_factory) -> Path:
    """The bundled sample labelled in this process by `classic` at 64x96 in shards of 4 (`--executor local`):
    the reference shards of the object-storage and cluster tests, and their trains' input. Read it, never
    change it."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli

    out = tmp_path_factory.mktemp("sample-labels")
    made = CliRunner().invoke(cli, ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES),
                                    "--shard-size", "4", "--io-threads", "2", "--image-size", "64x96", "--no-progress",
                                    "--executor", "local", "--out", str(out)])
    assert made.exit_code == 0, made.output
    return out / "classic" / "val2017"


@pytest.fixture(scope="session")
def s3_server() -> dict:
    """moto's S3 server as a process of its own on 127.0.0.1 (no patching of this process) with a bucket
    `labels`; yields the variables that point an S3 client at it. Started once, for the tests that ask."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto's S3 server did not start"
                time.sleep(0.1)
        s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="test", secret="test",
                          skip_instance_cache=True).mkdir("labels")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
