"""Sources: COCO trees through pycocotools and plain folders, cut into deterministic shards."""

import json

import pytest

from pipeline.label.sources import SourceError, coco_records, folder_records, plan_shards
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
    (tmp_path / "notes.txt").write_text("not an image")
    records = folder_records(tmp_path)
    assert [r.source_id for r in records] == ["a.v2.png", "b.jpg", "sub/c.jpeg"]
    assert [r.key for r in records] == ["a_v2", "b", "sub__c"]


def test_folder_key_collisions_are_refused(tmp_path):
    write_jpeg(tmp_path / "x.jpg", photo("coffee", 32))
    write_jpeg(tmp_path / "x.jpeg", photo("coffee", 32))
    with pytest.raises(SourceError, match="same sample key"):
        folder_records(tmp_path)


def test_shard_plan_is_deterministic_and_covers_everything(coco_tree):
    records = coco_records(coco_tree, "val2017")
    plans = plan_shards(records, 3)
    assert [p.name for p in plans] == ["shard-000000", "shard-000001", "shard-000002"]
    assert [len(p.records) for p in plans] == [3, 3, 2]
    assert [k for p in plans for k in p.keys] == [r.key for r in records]
    assert plan_shards(coco_records(coco_tree, "val2017"), 3) == plans
    json.dumps([p.keys for p in plans])  # keys are plain strings
