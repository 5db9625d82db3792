"""`pipeline verify`: every tar against its marker, labels.json against the markers, samples decodable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import cli
from pipeline.label.driver import label
from pipeline.label.shards import tar_samples
from pipeline.label.sources import coco_records
from pipeline.label.worker import LabelConfig
from tests.conftest import rewrite_shard


@pytest.fixture
def labelled(coco_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("labels")
    label(coco_records(coco_tree, "val2017"), out, LabelConfig(teacher="classic", batch_size=4), shard_size=3,
          executor="local", progress=False)
    return out


def verify(folder: Path, *extra: str):
    return CliRunner().invoke(cli, ["verify", str(folder), *extra])


rewrite = rewrite_shard


def test_a_sound_folder_is_one_ok_line(labelled):
    for extra in ([], ["--deep"]):
        result = verify(labelled, *extra)
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"OK: {labelled}: 3 shards, 8 samples, 0 images failed")
        assert result.output.count("\n") == 1


def test_every_problem_is_a_row_and_the_exit_status_is_1(labelled):
    with open(labelled / "shard-000000.tar", "r+b") as f:  # one byte flipped, same size
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    samples = list(tar_samples(labelled / "shard-000001.tar"))
    rewrite(labelled, "shard-000001", samples[::-1])  # consistent checksums, keys out of the marker's order
    index = json.loads((labelled / "labels.json").read_text())
    index["shards"] = index["shards"][:2]
    (labelled / "labels.json").write_text(json.dumps(index))
    shutil.copy(labelled / "shard-000002.tar", labelled / "shard-000007.tar")  # a tar without its marker

    result = verify(labelled)
    assert result.exit_code == 1 and "Traceback" not in result.output
    rows = [line.split(None, 1) for line in result.output.splitlines()[2:] if line.startswith("shard")]
    assert ["shard-000000", "tar sha256 does not match its marker"] in rows
    assert ["shard-000001", "tar keys differ from the marker's (sample 0: marker 000000000042, tar 000000000512)"] in rows
    assert ["shard-000002", "not listed in labels.json"] in rows
    assert ["shard-000007", "tar without a marker (an unfinished shard: re-run pipeline label)"] in rows
    assert result.output.splitlines()[-1].startswith("Error: ") and f"of {labelled}" in result.output


def test_deep_decodes_every_sample(labelled):
    samples = list(tar_samples(labelled / "shard-000000.tar"))
    samples[1]["jpg"] = b"\xff\xd8\xff\xe0 not a picture \xff\xda\x00\xff\xd9"
    rewrite(labelled, "shard-000000", samples)
    assert verify(labelled).exit_code == 0  # tar and markers agree
    deep = verify(labelled, "--deep")
    assert deep.exit_code == 1
    assert "shard-000000  000000000007: jpg: cannot decode" in deep.output


def test_a_label_member_that_does_not_decode_is_a_row_and_the_rest_is_checked(labelled):
    samples = list(tar_samples(labelled / "shard-000000.tar"))
    samples[0]["classic.png"] = b""  # empty: OpenCV asserts rather than returning None
    samples[2]["jpg"] = b"not a jpeg"
    rewrite(labelled, "shard-000000", samples)
    deep = verify(labelled, "--deep")
    assert deep.exit_code == 1 and "Traceback" not in deep.output
    assert f"shard-000000  {samples[0]['__key__']}: classic.png: cannot decode" in deep.output, deep.output
    assert f"shard-000000  {samples[2]['__key__']}: jpg: cannot decode" in deep.output, deep.output


@pytest.mark.parametrize("edit, why", [
    ({"count": "3"}, "its count is '3', not a count"),
    ({"failures": ["x"]}, "its failures are not a list of {key, file, reason}"),
    ({"failures": [{"reason": "r"}]}, "its failures are not a list of {key, file, reason}"),
    ({"planned": None}, "its planned is None, not a count"),
    ({"keys": "000000000042"}, "its keys are not a list of sample keys"),
])
def test_a_marker_edited_out_of_shape_is_a_row_and_label_redoes_its_shard(labelled, coco_tree, edit, why):
    """A marker whose fields are not what `pipeline label` writes is not a finished shard: `verify` names what is
    wrong with it (no Python error), and the same `pipeline label` command labels that shard again, to the
    same bytes, keeping the others."""
    marker = json.loads((labelled / "shard-000001.json").read_text())
    tar = (labelled / "shard-000001.tar").read_bytes()
    (labelled / "shard-000001.json").write_text(json.dumps({**marker, **edit}))
    result = verify(labelled)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"shard-000001  marker malformed: {why}" in result.output, result.output
    again = label(coco_records(coco_tree, "val2017"), labelled, LabelConfig(teacher="classic", batch_size=4),
                  shard_size=3, executor="local", progress=False)
    assert (again.shards_done, again.shards_skipped) == (1, 2)
    assert (labelled / "shard-000001.tar").read_bytes() == tar and verify(labelled).exit_code == 0


@pytest.mark.parametrize("index", [[], {"shards": 5}, {"shards": [{"x": 1}]}, {"shards": [{"tar": "a", "count": "4",
                                                                                            "sha256": "0"}]}])
def test_a_labels_json_out_of_shape_is_an_unfinished_folder_to_every_reader(labelled, index):
    """verify reports it; the manifest's check (a step whose output is not finished runs again) and training
    say so in a sentence."""
    from pipeline.label.shards import verify_dataset
    from pipeline.train.data import DataError, open_label_set

    (labelled / "labels.json").write_text(json.dumps(index))
    result = verify(labelled)
    assert result.exit_code == 1 and "labels.json  unreadable: " in result.output, result.output
    assert verify_dataset(labelled).startswith(f"{labelled}/labels.json: ")
    with pytest.raises(DataError, match="is not the index `pipeline label` writes"):
        open_label_set(labelled)


def test_a_shard_named_as_a_command_is_refused_and_never_run(labelled, monkeypatch):
    """webdataset opens a shard name starting `pipe:` by running it in a shell: a label folder shared by someone
    else, whose labels.json and marker name a tar `pipe:…` (a real file of that name holding a shard's bytes, so
    every sha256 holds), ran the command under `train --labels .` and `eval --labels .`. Only shard-NNNNNN.tar
    names are read; a marker naming another tar than its own is not a finished shard (its tar was read, and
    indexed, as the shard's)."""
    name = "pipe:cat shard-000000.tar; touch PWNED #"
    shutil.copy(labelled / "shard-000000.tar", labelled / f"{name}.tar")
    marker = json.loads((labelled / "shard-000000.json").read_text())
    (labelled / f"{name}.json").write_text(json.dumps({**marker, "tar": f"{name}.tar"}))
    index = json.loads((labelled / "labels.json").read_text())
    index["shards"][0]["tar"] = f"{name}.tar"
    (labelled / "labels.json").write_text(json.dumps(index))
    monkeypatch.chdir(labelled)
    for command in (["train", "--labels", ".", "--run", "../run", "--backbone-weights", "none", "--epochs", "1",
                     "--steps-per-epoch", "1", "--batch-size", "2", "--workers", "0", "--no-progress"],
                    ["eval", "--teacher", "classic", "--labels", ".", "--val-shards", "0", "--no-progress"]):
        r = CliRunner().invoke(cli, command)
        assert r.exit_code == 1 and "not a shard-NNNNNN.tar of the folder" in r.output, r.output
    assert not (labelled / "PWNED").exists()

    from pipeline.label.shards import marker_problem

    assert marker_problem({**marker, "tar": "/elsewhere/secret.tar"}) == (
        "its tar is '/elsewhere/secret.tar', not shard-000000.tar")


def test_the_out_root_named_as_a_label_folder_points_to_the_label_folders_below(labelled, tmp_path):
    """verify, train and eval alike; not "labelling not finished" (it is finished, one level down)."""
    from pipeline.train.data import DataError, open_label_set

    root = tmp_path / "out"
    shutil.copytree(labelled, root / "classic" / "val2017")
    result = verify(root)
    assert result.exit_code == 1 and "labels.json" not in result.output, result.output
    assert f"no shards in this folder; label folders below it: {root / 'classic' / 'val2017'}" in result.output
    with pytest.raises(DataError, match=f"^{root} is not a label folder; label folders below it: "
                                        f"{root / 'classic' / 'val2017'} \\(give one of those"):
        open_label_set(root)
    (root / "labels.json").write_text("{bad")  # an unreadable index there is said so (it was a ValueError)
    result = verify(root)
    assert result.exit_code == 1 and "labels.json  unreadable: " in result.output, result.output
    assert "label folders below it" in result.output


def test_a_folder_that_is_not_there_is_one_error_line(tmp_path):
    result = verify(tmp_path / "nowhere")
    assert result.exit_code == 2  # a path named on the command line that is not there: a usage mistake
    assert result.output.strip().splitlines()[-1] == f"Error: Invalid value for 'LABELS_DIR': {tmp_path / 'nowhere'} does not exist"
