"""Sources: COCO trees through pycocotools and plain folders, cut into deterministic shards."""

import json
import re
from pathlib import Path

import pytest

from pipeline.label.sources import SourceError, coco_records, folder_key, folder_records, plan_shards
from tests.conftest import make_coco, photo, write_jpeg


def test_coco_records_are_sorted_by_id_with_zero_padded_keys(coco_tree):
    records = coco_records(coco_tree, "val2017")
    ids = [r.source_id for r in records]
    assert ids == sorted(ids) == [3, 7, 8, 42, 99, 512, 1000, 100000]
    assert records[0].key == "000000000003" and "." not in records[-1].key
    assert records[0].path.endswith("val2017/000000000003.jpg")


def test_image_info_files_are_read_like_instances(tmp_path):
    (tmp_path / "test2017").mkdir()
    write_jpeg(tmp_path / "test2017" / "a.jpg", photo("coffee", 32))
    make_coco(tmp_path, "test2017", {5: "a.jpg"}, kind="image_info")
    assert [r.key for r in coco_records(tmp_path, "test2017")] == ["000000000005"]


def test_wrong_split_names_the_splits_that_exist(coco_tree):
    with pytest.raises(SourceError, match="splits found: val2017"):
        coco_records(coco_tree, "train2017")


@pytest.mark.parametrize("content", ["{not json", '{"images": 3}', "\xff\xfe garbage"])
def test_unreadable_annotation_file_is_one_clear_error(coco_tree, content):
    (coco_tree / "annotations" / "instances_val2017.json").write_text(content, errors="surrogateescape")
    with pytest.raises(SourceError, match="instances_val2017.json"):
        coco_records(coco_tree, "val2017")


def test_missing_image_folder_is_an_error(coco_tree):
    (coco_tree / "val2017").rename(coco_tree / "elsewhere")
    with pytest.raises(SourceError, match="image folder"):
        coco_records(coco_tree, "val2017")


def test_folder_records_sorted_recursive_and_keys_have_no_dots(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in ["b.jpg", "a.v2.png", "sub/c.jpeg"]:
        write_jpeg(tmp_path / rel, photo("coffee", 32))
    for rel in ["d.JFIF", "e.jpe"]:  # JPEGs under other names
        (tmp_path / rel).write_bytes((tmp_path / "b.jpg").read_bytes())
    (tmp_path / "notes.txt").write_text("not an image")
    records = folder_records(tmp_path)
    assert [r.source_id for r in records] == ["a.v2.png", "b.jpg", "d.JFIF", "e.jpe", "sub/c.jpeg"]
    assert [r.key for r in records] == ["a_v2", "b", "d", "e", "sub__c"]


def test_folder_key_collisions_are_refused_every_one_at_once(tmp_path):
    for name in ("x.jpg", "x.jpeg", "b c.jpg", "b_c.jpg"):
        write_jpeg(tmp_path / name, photo("coffee", 32))
    with pytest.raises(SourceError) as e:
        folder_records(tmp_path)
    assert str(e.value) == ("b_c.jpg and b c.jpg map to the same sample key 'b_c'; x.jpg and x.jpeg map to the same "
                            "sample key 'x'; rename one of each")
    assert [r.source_id for r in folder_records(tmp_path, keys=False)] == ["b c.jpg", "b_c.jpg", "x.jpeg",
                                                                           "x.jpg"]  # predict's


def test_a_symlink_loop_or_alias_is_the_folders_entry_and_a_loop_fails_alone(tmp_path):
    """A symlink loop in the folder stopped the whole run (`RuntimeError: Symlink loop`, nothing labelled), and a
    symlink was read, named and reported by its target's name. Each entry is now the folder's own: a loop is
    that image's failure, the rest are labelled."""
    from pipeline.label.worker import LabelConfig, ShardLabeler

    images = tmp_path / "images"
    images.mkdir()
    write_jpeg(images / "a.jpg", photo("coffee", 64))
    (images / "alias.jpg").symlink_to("a.jpg")
    (images / "loop_a.jpg").symlink_to("loop_b.jpg")
    (images / "loop_b.jpg").symlink_to("loop_a.jpg")
    records = folder_records(images)
    assert [(r.source_id, r.path) for r in records] == [(n, str(images.resolve() / n)) for n in
                                                        ("a.jpg", "alias.jpg", "loop_a.jpg", "loop_b.jpg")]
    labeler = ShardLabeler(LabelConfig(teacher="classic", batch_size=4, io_threads=2, image_size=(64, 96)))
    try:
        marker = labeler.label_shard(plan_shards(records, 8)[0], tmp_path)
    finally:
        labeler.close()
    assert marker["keys"] == ["a", "alias"]
    assert [(f["key"], Path(f["file"]).name) for f in marker["failures"]] == [("loop_a", "loop_a.jpg"),
                                                                             ("loop_b", "loop_b.jpg")]
    assert all("symbolic links" in f["reason"] for f in marker["failures"]), marker["failures"]


def test_folder_keys_keep_letters_of_any_script():
    """東京.jpg and 大阪.jpg were both '__' (a whole folder of such names could not be labelled); हिंदी.jpg and
    हुंदू.jpg were both 'ह__द_' (their vowel signs are combining marks), and a decomposed é (a name copied from
    macOS) was 'e_' where a composed one was 'é'."""
    assert [folder_key(n) for n in ("東京.jpg", "大阪.jpg", "café/crème brûlée.png", "a.b c.jpg")] == [
        "東京", "大阪", "café__crème_brûlée", "a_b_c"]
    assert [folder_key(n) for n in ("हिंदी.jpg", "हुंदू.jpg", "e\u0301.jpg", "\u00e9.jpg")] == [
        "हिंदी", "हुंदू", "\u00e9", "\u00e9"]


def test_shard_plan_is_deterministic_and_covers_everything(coco_tree):
    records = coco_records(coco_tree, "val2017")
    plans = plan_shards(records, 3)
    assert [p.name for p in plans] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [len(p.records) for p in plans] == [3, 3, 2]
    assert [k for p in plans for k in p.keys] == [r.key for r in records]
    assert plan_shards(coco_records(coco_tree, "val2017"), 3) == plans
    json.dumps([p.keys for p in plans])  # keys are plain strings


def _annotations(root, images) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": images, "annotations": []}))


@pytest.mark.parametrize("images, message", [
    ([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 1, "file_name": "c.jpg"}],
     r"instances_val2017.json: image ids must be unique; duplicated: 1 \(entries #0, #2\)"),
    ([{"id": 1, "file_name": "a.jpg"}, {"id": "7", "file_name": "b.jpg"}],
     r"instances_val2017.json: image ids must be integers; entries #1 \(id '7', file_name 'b.jpg'\)"),
    ([{"id": 1.5, "file_name": "a.jpg"}], r"must be integers; entries #0 \(id 1.5"),
])
def test_duplicate_or_non_integer_ids_are_refused_up_front(coco_tree, images, message):
    _annotations(coco_tree, images)
    with pytest.raises(SourceError, match=message):
        coco_records(coco_tree, "val2017")


@pytest.mark.parametrize("file_name", ["../../outside/secret.jpg", "OUTSIDE/secret.jpg", "escape.jpg", "/dev/zero"])
def test_paths_outside_the_image_folder_are_refused_up_front(tmp_path, file_name):
    """``..``, an absolute path, a symlink leading out, a device: SourceError naming the entry, unless allowed."""
    root, outside = tmp_path / "coco", tmp_path / "outside"  # <root>/val2017/../../outside is outside
    (root / "val2017").mkdir(parents=True)
    outside.mkdir()
    write_jpeg(outside / "secret.jpg", photo("coffee", 32))
    (root / "val2017" / "escape.jpg").symlink_to(outside / "secret.jpg")
    write_jpeg(root / "val2017" / "fine.jpg", photo("coffee", 32))
    file_name = file_name.replace("OUTSIDE", str(outside))
    _annotations(root, [{"id": 1, "file_name": "fine.jpg"}, {"id": 2, "file_name": file_name}])
    with pytest.raises(SourceError, match=rf"instances_val2017.json: file_name outside the image folder .* "
                                          rf"id 2 \('{re.escape(file_name)}'\).*--allow-outside-root"):
        coco_records(root, "val2017")
    allowed = coco_records(root, "val2017", allow_outside_root=True)
    assert [r.key for r in allowed] == ["000000000001", "000000000002"]
    assert allowed[1].root is None and allowed[1].path == str(Path(root / "val2017" / file_name).resolve())


def test_inside_paths_are_kept_and_remember_their_folder(coco_tree):
    (coco_tree / "val2017" / "sub").mkdir()
    (coco_tree / "val2017" / "sub" / "link.jpg").symlink_to(coco_tree / "val2017" / "000000000003.jpg")
    _annotations(coco_tree, [{"id": 3, "file_name": "sub/../000000000003.jpg"}, {"id": 4, "file_name": "sub/link.jpg"}])
    records = coco_records(coco_tree, "val2017")
    assert [r.root for r in records] == [str((coco_tree / "val2017").resolve())] * 2


def test_files_left_out_for_their_suffix_are_named_in_one_note(tmp_path):
    """A folder source reads files by suffix: a GIF or a text file beside the photos is left out, and
    `pipeline label` / `predict` say so in one line (a photo of an unlisted format silently missing was the
    complaint), naming the first few. Hidden files and folders are left out whatever their suffix, in a line of
    their own: a folder copied from a Mac had a `._a.jpg` beside each photo (each a failure, `cannot decode`), and
    `.thumbnails/` or a Synology's `@eaDir/` thumbnails were labelled as photos."""
    from click.testing import CliRunner

    from pipeline.cli.main import cli
    from pipeline.label.sources import left_out_note

    (tmp_path / "photos").mkdir()
    write_jpeg(tmp_path / "photos" / "a.jpg", photo("chelsea", 64))
    for name in ("b.gif", "notes.txt", "sub/.DS_Store", "._a.jpg", ".thumbnails/a.jpg", "sub/@eaDir/a.jpg/t.jpg"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "photos" / name).write_bytes(b"x")
    write_jpeg(tmp_path / "photos" / ".thumbnails" / "a.jpg", photo("chelsea", 64))
    others: list[str] = []
    assert [r.source_id for r in folder_records(tmp_path / "photos", others=others)] == ["a.jpg"]
    assert others == ["._a.jpg", ".thumbnails/", "b.gif", "notes.txt", "sub/.DS_Store", "sub/@eaDir/"]
    assert left_out_note(others).splitlines() == [
        "note: left out 2 hidden files and 2 hidden folders (a name starting with '.', as macOS's ._ files, or a "
        "Synology @eaDir folder): ._a.jpg, .thumbnails/, sub/.DS_Store, sub/@eaDir/",
        "note: left out 2 files whose suffix is not an image's (.jpg, .jpeg, .jpe, .jfif, .png, .bmp, .tif, .tiff, "
        ".webp): b.gif, notes.txt"]
    assert left_out_note([]) == ""
    # a symlinked folder is not followed (its images vanished without a word): said in a line of its own
    (tmp_path / "more").mkdir()
    write_jpeg(tmp_path / "more" / "c.jpg", photo("chelsea", 64))
    (tmp_path / "photos" / "linked").symlink_to(tmp_path / "more", target_is_directory=True)
    linked: list[str] = []
    assert [r.source_id for r in folder_records(tmp_path / "photos", others=linked)] == ["a.jpg"]
    assert linked == ["._a.jpg", ".thumbnails/", "b.gif", "linked/", "notes.txt", "sub/.DS_Store", "sub/@eaDir/"]
    assert left_out_note(linked).splitlines()[2] == ("note: left out 1 symlinked folder, not followed (copy it in, "
                                                     "or label it as a folder of its own): linked/")
    (tmp_path / "photos" / "linked").unlink()
    for args in (["label", "folder", "--teacher", "classic", "--executor", "local", "--out", tmp_path / "labels",
                  "--image-size", "64x96"], ["predict", "--teacher", "classic", "--out", tmp_path / "maps"]):
        r = CliRunner().invoke(cli, [str(a) for a in [*args, "--images", tmp_path / "photos",
                                                      "--no-progress"]])
        assert r.exit_code == 0, r.output
        assert "note: left out 2 hidden files and 2 hidden folders" in r.output, r.output
        assert "note: left out 2 files whose suffix is not an image's" in r.output, r.output
