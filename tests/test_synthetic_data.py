"""The embedded datasets: deterministic, COCO-valid, consistent masks and boxes, self-healing."""

import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bench.data import synthetic
from bench.data.coco import load_coco
from bench.hashing import file_sha256

TINY = synthetic.TargetConfig(train_images=24, val_images=8)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    return synthetic.ensure(TINY, root=tmp_path_factory.mktemp("t") / "tiny", workers=2)


def test_same_seed_gives_the_same_annotation_file_whatever_the_worker_count(tmp_path, tiny_target):
    again = synthetic.ensure(TINY, root=tmp_path / "again", workers=1)
    for split in ("train", "val"):
        a = file_sha256(tiny_target / "annotations" / f"instances_{split}.json")
        b = file_sha256(again / "annotations" / f"instances_{split}.json")
        assert a == b


def test_another_seed_gives_another_dataset(tmp_path, tiny_target):
    other = synthetic.ensure(synthetic.TargetConfig(seed=1, train_images=24, val_images=8),
                             root=tmp_path / "other", workers=1)
    assert (file_sha256(other / "annotations/instances_train.json")
            != file_sha256(tiny_target / "annotations/instances_train.json"))


def test_annotations_load_in_pycocotools_like_coco(tiny_target):
    coco = load_coco(tiny_target / "annotations" / "instances_train.json")
    assert len(coco.imgs) == 24
    assert len(coco.cats) == 8 and all(c["supercategory"] == "shape" for c in coco.cats.values())
    assert len(coco.anns) >= 24  # at least one object per image
    for img in coco.imgs.values():
        assert (tiny_target / "train" / img["file_name"]).is_file()


def test_every_mask_lies_inside_its_box_and_matches_its_area(tiny_target):
    coco = load_coco(tiny_target / "annotations" / "instances_train.json")
    for ann in coco.anns.values():
        m = coco.annToMask(ann)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(m)
        assert xs.min() == x and ys.min() == y
        assert xs.max() == x + w - 1 and ys.max() == y + h - 1
        assert m.sum() == ann["area"] == mask_utils.area(ann["segmentation"])
        assert ann["iscrowd"] == 0


def test_objects_vary_in_size_category_and_get_occluded(tiny_target):
    coco = load_coco(tiny_target / "annotations" / "instances_train.json")
    areas = [a["area"] for a in coco.anns.values()]
    assert min(areas) < 32 ** 2 < max(areas)  # COCO's small and medium objects both occur
    assert len({a["category_id"] for a in coco.anns.values()}) >= 6
    # occlusion: some visible masks are smaller than the full shape would be (not convex-full)
    fill = [a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in coco.anns.values()]
    assert min(fill) < 0.4


def test_source_set_has_more_classes_than_the_target(tmp_path):
    root = synthetic.ensure(synthetic.SourceConfig(train_per_class=2, val_per_class=1),
                            root=tmp_path / "src", workers=1)
    classes = sorted(os.listdir(root / "train"))
    assert len(classes) > 8
    # the target's categories are among the source's classes, as COCO's are among ImageNet's
    for name in ("circle", "star", "crescent"):
        assert any(c.endswith(name) for c in classes)


def test_partial_or_corrupt_cache_is_detected_and_regenerated(tmp_path):
    root = synthetic.ensure(TINY, root=tmp_path / "d", workers=1)
    ann = root / "annotations" / "instances_val.json"
    good = ann.read_bytes()
    image = next((root / "train").iterdir())
    image.write_bytes(image.read_bytes()[:100])  # truncated image
    assert "bytes" in synthetic.check_complete(root, TINY)
    synthetic.ensure(TINY, root=root, workers=1, log=lambda m: None)
    assert synthetic.check_complete(root, TINY) == ""
    ann.write_text(json.dumps({"images": []}))  # corrupt annotations
    assert "hash" in synthetic.check_complete(root, TINY)
    synthetic.ensure(TINY, root=root, workers=1, log=lambda m: None)
    assert ann.read_bytes() == good
    (root / "MANIFEST.json").unlink()  # generation killed before its end
    assert "missing" in synthetic.check_complete(root, TINY)
