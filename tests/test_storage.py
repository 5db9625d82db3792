"""`pipeline label --out s3://…`: shards on object storage (moto's stand-alone S3 server on loopback)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "coco"
LABEL = ["label", "coco", "--teacher", "classic", "--coco-root", str(SAMPLES), "--shard-size", "4",
         "--io-threads", "2", "--executor", "local", "--no-progress"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on 127.0.0.1 (moto's server in a thread) with a bucket `labels`; yields an s3fs client."""
    import os

    import fsspec
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir("labels")
        yield fs
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_labels_on_s3_are_the_local_labels_and_resume_and_verify_there(s3, tmp_path):
    local = CliRunner().invoke(cli, [*LABEL, "--out", str(tmp_path)])
    assert local.exit_code == 0, local.output
    folder = tmp_path / "classic" / "val2017"
    remote = "labels/run/classic/val2017"

    first = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])
    assert first.exit_code == 0, first.output
    names = sorted(p.rsplit("/", 1)[1] for p in s3.ls(remote, refresh=True))
    assert names == ["labels.json", "preview.png", "shard-000000.json", "shard-000000.tar", "shard-000001.json",
                     "shard-000001.tar", "shard-000002.json", "shard-000002.tar"]
    for tar in sorted(folder.glob("shard-*.tar")):  # the same bytes as the local run's
        assert sha(s3.cat_file(f"{remote}/{tar.name}")) == sha(tar.read_bytes())

    again = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])  # resume reads the markers there
    assert again.exit_code == 0 and "0 written, 3 already done" in again.output, again.output

    s3.rm_file(f"{remote}/shard-000001.json")  # a shard whose marker never made it: redone, alone
    s3.invalidate_cache()
    redo = CliRunner().invoke(cli, [*LABEL, "--out", "s3://labels/run"])
    assert redo.exit_code == 0 and "1 written, 2 already done" in redo.output, redo.output
    assert sha(s3.cat_file(f"{remote}/shard-000001.tar")) == sha((folder / "shard-000001.tar").read_bytes())

    from pipeline.label.shards import verify_dataset

    assert verify_dataset(f"s3://{remote}") == ""
    s3.pipe_file(f"{remote}/shard-000002.tar", b"not the tar")
    s3.invalidate_cache()
    assert "tar missing or of the wrong size" in verify_dataset(f"s3://{remote}")
