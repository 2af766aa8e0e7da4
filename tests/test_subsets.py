"""Less-data runs use nested, seeded subsets stored as id lists, never re-drawn per run."""

import json

import pytest

from bench.data import subsets, synthetic

CFG = synthetic.TargetConfig(train_images=40, val_images=4)


@pytest.fixture(scope="module")
def ann_file(tmp_path_factory):
    root = synthetic.ensure(CFG, root=tmp_path_factory.mktemp("s") / "d", workers=1)
    return root / "annotations" / "instances_train.json"


def test_subsets_are_nested_free_of_duplicates_and_stable(ann_file, tmp_path):
    paths = subsets.write_subsets(ann_file, [5, 10, 20], tmp_path / "a", seed=0)
    again = subsets.write_subsets(ann_file, [20, 10], tmp_path / "b", seed=0)  # other order, later
    ids = {json.loads(p.read_text())["size"]: subsets.read_subset(p, ann_file) for p in paths}
    assert set(ids[5]) < set(ids[10]) < set(ids[20])
    assert all(len(v) == len(set(v)) == n for n, v in ids.items())
    assert subsets.read_subset(again[0], ann_file) == ids[20]
    assert subsets.read_subset(again[1], ann_file) == ids[10]


def test_another_seed_draws_another_subset(ann_file, tmp_path):
    a = subsets.nested_subsets(subsets.eligible_ids(ann_file), [10], seed=0)[10]
    b = subsets.nested_subsets(subsets.eligible_ids(ann_file), [10], seed=1)[10]
    assert a != b


def test_subset_of_another_annotation_file_or_edited_is_refused(ann_file, tmp_path):
    (path,) = subsets.write_subsets(ann_file, [5], tmp_path, seed=0)
    other = tmp_path / "other.json"
    other.write_text(ann_file.read_text() + " ")
    with pytest.raises(ValueError, match="drawn from another"):
        subsets.read_subset(path, other)
    doc = json.loads(path.read_text())
    doc["image_ids"][0] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="do not match their recorded hash"):
        subsets.read_subset(path, ann_file)


def test_asking_for_more_images_than_exist_is_an_error(ann_file):
    with pytest.raises(ValueError, match="only 40 are eligible"):
        subsets.nested_subsets(subsets.eligible_ids(ann_file), [41])


def test_coco_sized_subsets_are_the_same_on_every_machine():
    """Pinned draws from 118,287 ids (COCO-sized; the real subsets are drawn from train2017's
    eligible images): the permutation comes from numpy's seeded PCG64 stream, the same on
    every platform, so every machine draws the same ids from the same annotation file. A
    change here would silently change the paper's less-data runs: it must be deliberate."""
    d = subsets.nested_subsets(range(1, 118_288), [1000, 10_000, 35_000], seed=0)
    assert d[1000][:8] == [74, 518, 621, 676, 1044, 1095, 1185, 1256]
    assert subsets.ids_sha256(d[1000]).startswith("d9d3092056be2ff4")
    assert subsets.ids_sha256(d[35_000]).startswith("1e16af87d347f0c3")
    assert set(d[1000]) < set(d[10_000]) < set(d[35_000])
