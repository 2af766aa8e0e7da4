"""PASCAL VOC (the paper's Sec. 5.2): VOC's own layout read through one converter, VOC's
metric written from its definition and checked by hand and against detectron2's, both
engines scoring VOC runs with it, and every broken input named in one line before training."""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from bench import recipe, voc_eval
from bench.data import registry, shapes, voc
from bench.data.coco import AnnotationError, CocoDetection
from bench.spec import SpecError
from bench.voc_eval import voc_stats
from conftest import REPO, write_recipe

PAPER = recipe.load(REPO / "recipes/he2019/voc_r101_gn.yaml")
MINI = recipe.load(REPO / "recipes/mini-voc/study.yaml")


@pytest.fixture(scope="module")
def tiny():
    return registry.resolve("shapes-voc-tiny")


def coco_of(boxes, cats=(1,), sizes=None):
    """A COCO ground truth of {image id: [(category, [x, y, w, h], difficult), ...]}."""
    images = [dict(id=i, file_name=f"{i}.jpg", width=100, height=100) for i in sorted(boxes)]
    anns = [dict(id=k + 1, image_id=i, category_id=c, bbox=list(b), area=b[2] * b[3],
                 iscrowd=0, difficult=d)
            for k, (i, c, b, d) in enumerate((i, c, b, d) for i in sorted(boxes)
                                              for c, b, d in boxes[i])]
    gt = COCO()
    gt.dataset = dict(images=images, annotations=anns,
                      categories=[dict(id=c, name=str(c)) for c in cats])
    gt.createIndex()
    return gt


def det(image_id, box, score, cat=1):
    return dict(image_id=image_id, category_id=cat, bbox=list(box), score=score)


# ------------------------------------------------------------------------- the metric by hand

def test_two_objects_three_detections_give_the_hand_computed_ap():
    # 2 objects; by score: a hit, a miss, the second hit.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    gt = coco_of({1: [(1, [0, 0, 20, 20], 0), (1, [50, 50, 20, 20], 0)]})
    dets = [det(1, [0, 0, 20, 20], 0.9), det(1, [80, 0, 10, 10], 0.8),
            det(1, [50, 50, 20, 20], 0.7)]
    # area (VOC2010+): recall rises 1/2 at precision 1, then 1/2 where the best precision
    # at any recall beyond is 2/3: 1/2 + 1/3
    assert voc_stats(gt, dets)["voc/AP50"] == pytest.approx(100 * 5 / 6)
    # 11 points (VOC2007): recall >= 0 .. 0.5 reach precision 1 (6 points), recall >= 0.6
    # .. 1 only 2/3 (5 points)
    assert voc_stats(gt, dets, metric="11point")["voc/AP50"] == \
        pytest.approx(100 * (6 + 5 * 2 / 3) / 11)
    # the curve itself
    per_class, _ = voc_eval.evaluate(gt, dets)
    _, _, tp, ignored, positives = per_class[1]
    recall, precision = voc_eval.curve(tp[0], ~tp[0] & ~ignored[0], positives)
    assert recall.tolist() == [0.5, 0.5, 1.0]
    assert precision == pytest.approx([1, 0.5, 2 / 3])


def test_a_difficult_object_is_neither_needed_nor_penalized():
    gt = coco_of({1: [(1, [0, 0, 20, 20], 0), (1, [50, 50, 20, 20], 1)]})
    found = [det(1, [50, 50, 20, 20], 0.95), det(1, [51, 50, 20, 20], 0.9),  # the difficult
             det(1, [0, 0, 20, 20], 0.8)]                                    # object, twice
    # only the non-difficult object counts: found at precision 1 (the two detections of the
    # difficult one are neither true nor false positives, the second no duplicate either)
    assert voc_stats(gt, found)["voc/AP50"] == pytest.approx(100.0)
    per_class, _ = voc_eval.evaluate(gt, found)
    assert per_class[1][3][0].tolist() == [True, True, False]     # ignored at IoU 0.5
    # missing it costs nothing; scored as a normal object, the same detections would lose
    # precision on the duplicate
    assert voc_stats(gt, found[2:])["voc/AP50"] == pytest.approx(100.0)
    normal = coco_of({1: [(1, [0, 0, 20, 20], 0), (1, [50, 50, 20, 20], 0)]})
    assert voc_stats(normal, found)["voc/AP50"] == pytest.approx(100 * (1 / 2 + 1 / 2 * 2 / 3))


def test_a_duplicate_is_a_false_positive_and_an_object_is_claimed_once():
    gt = coco_of({1: [(1, [0, 0, 20, 20], 0)]})
    exact, shifted = det(1, [0, 0, 20, 20], 0.9), det(1, [1, 0, 20, 20], 0.8)
    scores, _, tp, _, _ = voc_eval.evaluate(gt, [exact, shifted])[0][1]
    assert scores.tolist() == [0.9, 0.8] and tp[0].tolist() == [True, False]
    assert voc_stats(gt, [exact, shifted])["voc/AP50"] == pytest.approx(100.0)
    # the higher score claims the object, not the better box: the exact one is the duplicate
    shifted["score"] = 0.95
    scores, _, tp, _, _ = voc_eval.evaluate(gt, [exact, shifted])[0][1]
    assert scores.tolist() == [0.95, 0.9] and tp[0].tolist() == [True, False]
    assert voc_stats(gt, [exact, shifted])["voc/AP75"] == pytest.approx(100.0)  # IoU 0.9


def test_voc_iou_counts_both_end_pixels_and_equals_the_continuous_iou_after_the_shift():
    # VOC (11, 11, 20, 20) is 10 x 10 pixels; a box over its left half has IoU 5 x 10 / 100
    assert voc_eval.iou([[11, 11, 15, 20]], [[11, 11, 20, 20]]).item() == pytest.approx(0.5)
    # which does not exceed 0.5: a false positive at IoU 0.5, as VOC's "exceed 50%"
    gt = coco_of({1: [(1, [10, 10, 10, 10], 0)]})
    assert voc_stats(gt, [det(1, [10, 10, 5, 10], 0.9)])["voc/AP50"] == 0.0
    # with detectron2's -1 on load and +1 on the way back, the +1 of VOC's widths cancels:
    # the IoU of the boxes as the model sees them
    import torchvision
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 50, (20, 2))
    a = np.concatenate([a, a + rng.uniform(1, 40, (20, 2))], 1)
    b = a + rng.normal(0, 5, a.shape)
    b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
    xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], 1)  # noqa: E731
    ours = voc_eval.iou(voc_eval.voc_boxes(xywh(a)), voc_eval.voc_boxes(xywh(b)))
    plain = torchvision.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy()
    assert ours == pytest.approx(plain)


def test_map_is_the_mean_over_classes_with_ground_truth_and_ap_the_mean_over_ious():
    gt = coco_of({1: [(1, [0, 0, 20, 20], 0)], 2: [(2, [0, 0, 40, 40], 0)]}, cats=(1, 2, 3))
    shifted = [det(1, [0, 0, 20, 20], 0.9), det(2, [4, 0, 40, 40], 0.9, cat=2)]
    stats = voc_stats(gt, shifted)
    # class 3 has no ground truth: not averaged (class 1 is exact, class 2 has IoU 36/44)
    assert stats["voc/AP50"] == pytest.approx(100.0) and stats["voc/AP75"] == pytest.approx(100)
    ious = np.round(np.arange(0.5, 0.951, 0.05), 2)
    assert stats["voc/AP"] == pytest.approx(100 * np.mean([1 if t < 36 / 44 else 0.5
                                                           for t in ious]))
    assert set(stats) == {"voc/AP", "voc/AP50", "voc/AP75"}
    assert voc_stats(gt, [])["voc/AP50"] == 0.0                 # nothing found: 0, not NaN
    assert np.isnan(voc_stats(coco_of({1: []}), [])["voc/AP50"])  # nothing to find: NaN


# ------------------------------------------------------- against detectron2's implementation

def noisy_detections(files, rng, decimals=False):
    """Jittered ground-truth boxes, misses and false positives on the val set, as
    (our COCO-format results, detectron2's per-class text lines)."""
    gt = json.loads(files.val_annotations.read_text())
    voc_id = {im["id"]: im["voc_id"] for im in gt["images"]}
    scores = iter(rng.permutation(np.arange(50, 1000)) / 1000)  # distinct at 3 decimals
    ours, theirs = [], {}
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes = [] if rng.random() < 0.15 else [[x, y, w, h]]
        if rng.random() < 0.4:
            boxes.append([x + rng.normal(0, 0.2) * w, y + rng.normal(0, 0.2) * h, w, h])
        if rng.random() < 0.3:
            boxes.append([rng.uniform(0, 100), rng.uniform(0, 100), 20, 20])
        for bx in boxes:
            # detectron2 writes VOC's corners at 1 decimal: give both the same numbers
            x1, y1 = round(bx[0] + 1, 1), round(bx[1] + 1, 1)
            x2, y2 = round(bx[0] + bx[2], 1), round(bx[1] + bx[3], 1)
            score = float(next(scores))
            cat = ann["category_id"] if rng.random() < 0.9 else 1
            ours.append(det(ann["image_id"], [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                            score, cat))
            theirs.setdefault(cat, []).append(f"{voc_id[ann['image_id']]} {score:.3f} "
                                              f"{x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}")
    return ours, theirs


def test_our_ap_equals_detectron2s_voc_eval_on_the_same_detections(tiny, tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.evaluation.pascal_voc_evaluation import voc_eval as d2_voc_eval

    from bench.data.coco import load_coco
    ours, theirs = noisy_detections(tiny, np.random.default_rng(0))
    gt = load_coco(tiny.val_annotations)
    per_class, _ = voc_eval.evaluate(gt, ours)
    compared = 0
    for metric, use_07 in (("area", False), ("11point", True)):
        for cat, name in enumerate(shapes.TARGET_SHAPES, 1):
            positives = per_class[cat][4]
            if not positives:
                continue  # detectron2 divides by zero there
            (tmp_path / f"{name}.txt").write_text("\n".join(theirs.get(cat, [])))
            for t, iou in ((0, 0.5), (5, 0.75)):
                _, _, ap = d2_voc_eval(str(tmp_path / "{}.txt"),
                                       str(tiny.val_images / "VOC2012/Annotations/{}.xml"),
                                       str(tiny.val_images / "VOC2012/ImageSets/Main/val.txt"),
                                       name, ovthresh=iou, use_07_metric=use_07)
                _, _, tp, ignored, _ = per_class[cat]
                recall, precision = voc_eval.curve(tp[t], ~tp[t] & ~ignored[t], positives)
                assert voc_eval.average_precision(recall, precision, metric) == \
                    pytest.approx(ap, abs=1e-12), (metric, name, iou)
                compared += 1
    assert compared >= 16


# --------------------------------------------------------------------- the per-image results

def test_the_bootstrap_recomputes_voc_map_from_the_per_image_results(tiny):
    from bench.analysis.bootstrap import Accumulator
    from bench.data.coco import load_coco
    ours, _ = noisy_detections(tiny, np.random.default_rng(1))
    gt = load_coco(tiny.val_annotations)
    for metric in ("area", "11point"):
        kept = {}
        stats = voc_stats(gt, ours, metric=metric, per_image_out=kept)
        acc = Accumulator(kept["voc"])
        assert acc.average_precision() == pytest.approx(stats["voc/AP50"])
        # a resample (image 0 twice, image 1 not at all) is the metric on copied images
        weights = np.ones(len(acc.image_ids))
        weights[0], weights[1] = 2, 0
        images = {int(i): [] for i in acc.image_ids}
        for a in gt.dataset["annotations"]:
            images[a["image_id"]].append((a["category_id"], a["bbox"], a["difficult"]))
        first, second = (int(i) for i in acc.image_ids[:2])
        images[10_000] = images[first]
        del images[second]
        copied = [dict(r) for r in ours if r["image_id"] != second] + \
            [dict(r, image_id=10_000) for r in ours if r["image_id"] == first]
        again = voc_stats(coco_of(images, cats=tuple(sorted(gt.getCatIds()))), copied,
                          metric=metric)
        assert acc.average_precision(weights) == pytest.approx(again["voc/AP50"])


def test_the_torchvision_engine_scores_a_voc_dataset_by_vocs_metric_only(tiny, monkeypatch):
    from bench.engines.torchvision import evaluate as ev
    val = CocoDetection(tiny.val_images, tiny.val_annotations, train=False, masks=False)

    def ground_truth(model, dataset, device, indices=None):
        boxes, segms, kps = [], [], []
        for i in indices:
            _, t = dataset.get(i)
            n = len(t["boxes"])
            ev._append_results(dataset, t["image_id"], {"boxes": t["boxes"], "scores":
                               torch.ones(n), "labels": t["labels"]}, boxes, segms, kps)
        return boxes, segms, kps
    monkeypatch.setattr(ev, "predict", ground_truth)
    kept = {}
    stats = ev.evaluate(None, val, "cpu", masks=False, voc="area", per_image_out=kept)
    assert stats["voc/AP50"] == pytest.approx(100.0) and stats["voc/AP"] == pytest.approx(100)
    assert not any(k.startswith("bbox/") for k in stats) and set(kept) == {"voc"}
    assert registry.voc_metric("shapes-voc-tiny") == "area" and registry.voc_metric("voc") == \
        "area" and registry.voc_metric("shapes-tiny") is None


def test_the_detectron2_engine_scores_a_voc_dataset_by_the_same_metric(tiny):
    pytest.importorskip("detectron2")
    from detectron2.structures import Boxes, Instances

    from bench.engines.detectron2 import data as d2data
    from bench.engines.detectron2.train import VocEvaluator
    from detectron2.data import DatasetCatalog
    _, val_name = d2data.register(dataclasses.replace(MINI.runs[0].data,
                                                      dataset="shapes-voc-tiny"))
    dicts = DatasetCatalog.get(val_name)
    evaluator = VocEvaluator(val_name, "area", distributed=False)
    evaluator.reset()
    for d in dicts:  # the ground truth given back as detectron2's predictions
        inst = Instances((d["height"], d["width"]))
        boxes = torch.tensor([a["bbox"] for a in d["annotations"]]).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]],
                                         dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["voc"]["AP50"] == pytest.approx(100.0)
    assert evaluator.detections == sum(len(d["annotations"]) for d in dicts)
    assert "voc" in evaluator.per_image


# ------------------------------------------------------------------------ the layout and data

def test_the_embedded_voc_set_is_vocs_layout_in_two_year_folders(tiny):
    root = tiny.train_images
    for folder, image_set in (("VOC2007", "trainval"), ("VOC2007", "train"), ("VOC2007", "val"),
                              ("VOC2012", "train"), ("VOC2012", "val"), ("VOC2012", "trainval")):
        ids = voc.read_image_set(root, folder, image_set)
        assert ids and all((root / folder / "JPEGImages" / f"{i}.jpg").is_file() and
                           (root / folder / "Annotations" / f"{i}.xml").is_file() for i in ids)
    assert voc.read_image_set(root, "VOC2012", "val")[0].startswith("2012_")
    assert voc.read_image_set(root, "VOC2007", "trainval")[0] == "000001"
    train = json.loads(tiny.train_annotations.read_text())
    folders = {im["voc_folder"] for im in train["images"]}
    assert folders == {"VOC2007", "VOC2012"}          # VOC2007 trainval + VOC2012 train
    assert len(train["images"]) == 24 + 24
    assert [c["name"] for c in train["categories"]] == shapes.TARGET_SHAPES
    # about 2 objects an image (VOC: 2.4), some difficult, in both splits
    val = json.loads(tiny.val_annotations.read_text())
    for doc in (train, val):
        flags = [a["difficult"] for a in doc["annotations"]]
        assert 1 <= len(flags) / len(doc["images"]) <= 3
    assert any(a["difficult"] for a in train["annotations"] + val["annotations"])


def test_boxes_are_converted_as_detectron2s_voc_loader_converts_them(tiny):
    pytest.importorskip("detectron2")
    from detectron2.data.datasets.pascal_voc import load_voc_instances
    ours = json.loads(tiny.val_annotations.read_text())
    by_voc_id = {im["voc_id"]: im for im in ours["images"]}
    anns = {}
    for a in ours["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    theirs = load_voc_instances(str(tiny.val_images / "VOC2012"), "val",
                                tuple(shapes.TARGET_SHAPES))
    assert len(theirs) == len(ours["images"])
    for d in theirs:
        im = by_voc_id[d["image_id"]]
        assert (d["height"], d["width"]) == (im["height"], im["width"])
        assert im["file_name"] == "VOC2012/JPEGImages/" + Path(d["file_name"]).name
        mine = [(a["category_id"] - 1, [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                        a["bbox"][1] + a["bbox"][3]]) for a in anns[im["id"]]]
        assert mine == [(t["category_id"], t["bbox"]) for t in d["annotations"]]


def test_difficult_objects_train_as_detectron2s_loader_trains_them(tiny):
    train = CocoDetection(tiny.train_images, tiny.train_annotations, masks=False)
    doc = json.loads(tiny.train_annotations.read_text())
    assert any(a["difficult"] for a in doc["annotations"])
    loaded = sum(len(train.get(i)[1]["boxes"]) for i in range(len(train)))
    assert loaded == len(doc["annotations"])          # none dropped, difficult or not
    img, target = train.get(0)
    assert img.shape == (3, 128, 128) and target["labels"].min() >= 1


def test_nested_subsets_draw_from_the_converted_training_set(tiny):
    from bench.data import subsets
    small, large = registry.subset_file(tiny, 10), registry.subset_file(tiny, 20)
    a = subsets.read_subset(small, tiny.train_annotations, size=10, seed=0)
    b = subsets.read_subset(large, tiny.train_annotations, size=20, seed=0)
    assert set(a) < set(b) and small.parent == tiny.subsets_dir
    ids = registry.train_ids(tiny, dataclasses.replace(MINI.runs[0].data, train_images=10))
    assert sorted(ids) == sorted(a)
    assert len(CocoDetection(tiny.train_images, tiny.train_annotations, ids, masks=False)) == 10


def _voc_copy(tiny, dest: Path) -> Path:
    """The tiny embedded layout as a real `voc` root: copied, its shapes renamed to VOC
    classes (the i-th shape -> the i-th VOC class)."""
    shutil.copytree(tiny.train_images, dest, ignore=shutil.ignore_patterns("MANIFEST.json"))
    for xml in dest.glob("VOC*/Annotations/*.xml"):
        text = xml.read_text()
        for name, cls in zip(shapes.TARGET_SHAPES, voc.VOC_CLASSES):
            text = text.replace(f"<name>{name}</name>", f"<name>{cls}</name>")
        xml.write_text(text)
    return dest


def test_voc_is_read_from_its_own_folders_and_converted_into_the_cache_once(tiny, tmp_path,
                                                                            monkeypatch):
    root = _voc_copy(tiny, tmp_path / "datasets")
    monkeypatch.delenv("BENCH_VOC", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    before = sorted(p for p in root.rglob("*"))
    files = registry.resolve("voc")
    assert files.train_images == root.absolute() and files.val_images == root.absolute()
    doc = json.loads(files.val_annotations.read_text())
    assert [c["name"] for c in doc["categories"]] == list(voc.VOC_CLASSES)
    assert sorted(p for p in root.rglob("*")) == before   # nothing written into the dataset
    assert registry.resolve("voc") == files                 # converted once
    # an edited annotation is a new conversion
    xml = sorted(root.glob("VOC2012/Annotations/*.xml"))[0]
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>",
                                           "<difficult>1</difficult>", 1))
    os.utime(xml, ns=(xml.stat().st_atime_ns, xml.stat().st_mtime_ns + 10 ** 9))
    again = registry.resolve("voc")
    assert again.val_annotations != files.val_annotations
    assert again.subsets_dir != files.subsets_dir           # its own subsets, too
    monkeypatch.setenv("BENCH_VOC", str(tmp_path / "nowhere"))
    with pytest.raises(registry.DatasetMissing, match=r"nowhere/VOC2007 does not exist; "
                                                      r"--voc \(BENCH_VOC\)") as e:
        registry.resolve("voc")
    assert "\n" not in str(e.value)


def test_a_conversion_someone_emptied_is_made_again(tiny, tmp_path):
    splits = registry.VOC["shapes-voc-tiny"]
    first = voc.ensure_converted(tiny.train_images, splits, tmp_path)
    (first / "annotations" / "instances_val.json").unlink()
    again = voc.ensure_converted(tiny.train_images, splits, tmp_path)
    assert again == first and (again / "annotations" / "instances_val.json").read_bytes() == \
        tiny.val_annotations.read_bytes()


# ------------------------------------------------------------------------------ bad input

@pytest.fixture
def broken(tiny, tmp_path, monkeypatch):
    """A `voc` root to break, and the check every run passes before training."""
    root = _voc_copy(tiny, tmp_path / "voc")
    monkeypatch.setenv("BENCH_VOC", str(root))
    monkeypatch.setenv("BENCH_DATA", str(tmp_path / "cache"))
    study = recipe.load(write_recipe(tmp_path, (REPO / "recipes/mini-voc/study.yaml").read_text()
                                     .replace("base: ../mini/", f"base: {REPO}/recipes/mini/")
                                     .replace("dataset: shapes-voc", "dataset: voc")))

    def check():
        from bench import preflight
        scratch = [s for s in study.runs if s.init == "scratch"]
        with pytest.raises(AnnotationError) as e:
            preflight.check([study], scratch, tmp_path / "runs")
        assert "\n" not in str(e.value)
        return str(e.value)
    return root, check


def test_a_missing_image_list_is_named_with_its_fix(broken):
    root, check = broken
    (root / "VOC2012/ImageSets/Main/train.txt").unlink()
    message = check()
    assert message.startswith(f"{root}/VOC2012/ImageSets/Main/train.txt: no such image list")
    assert "restore it" in message


def test_an_annotation_that_does_not_parse_or_lacks_a_field_is_named(broken):
    root, check = broken
    xml = sorted(root.glob("VOC2007/Annotations/*.xml"))[3]
    good = xml.read_text()
    xml.write_text(good[:len(good) // 2])
    message = check()
    assert message.startswith(f"{xml}: not a VOC annotation file (XML:")
    xml.write_text(good.replace("<xmin>", "<xmn>", 1).replace("</xmin>", "</xmn>", 1))
    assert check().startswith(f"{xml}: has no <xmin> (object 1)")
    xml.write_text(good.replace("<name>", "<name>unicorn", 1))
    assert "not one of the dataset's 20 classes" in check()
    xml.write_text(good.replace("<size>", "<sise>").replace("</size>", "</sise>"))
    assert check().startswith(f"{xml}: has no <size>")


def test_a_missing_image_is_named_with_the_list_that_wants_it(broken):
    root, check = broken
    jpeg = sorted(root.glob("VOC2012/JPEGImages/*.jpg"))[-1]
    jpeg.unlink()
    message = check()
    assert message.startswith(f"{jpeg}: missing (listed in {root}/VOC2012/ImageSets/Main/")


def test_voc_data_refuses_a_model_it_has_no_labels_for_in_one_line(tmp_path):
    body = (REPO / "recipes/mini-voc/study.yaml").read_text().replace(
        "arch: faster_rcnn", "arch: mask_rcnn").replace("base: ../mini/",
                                                        f"base: {REPO}/recipes/mini/")
    with pytest.raises(SpecError, match="model.arch mask_rcnn on data.dataset 'shapes-voc'; "
                                        ".*use model.arch: faster_rcnn"):
        recipe.load(write_recipe(tmp_path, body))


# ------------------------------------------------------------------------------- recipes

def test_the_voc_study_is_the_papers_faster_rcnn_r101_gn_at_18k_and_144k():
    runs = {(r.init, r.solver.max_iter): r for r in PAPER.runs}
    assert sorted(runs) == [("imagenet", 18_000), ("imagenet", 144_000), ("scratch", 18_000),
                            ("scratch", 144_000)]
    for (init, n), r in runs.items():
        assert (r.model.arch, r.model.depth, r.model.norm, r.data.dataset) == \
            ("faster_rcnn", 101, "GN", "voc")
        assert (r.solver.batch, r.solver.lr, r.gpus) == (16, 0.02, 8)
        assert r.solver.steps == ((12_000, 16_000) if n == 18_000 else (132_000, 140_000))
        assert r.model.freeze_at == (2 if init == "imagenet" else 0)
        assert r.data.train_min_size == (640, 672, 704, 736, 768, 800)   # training aug only
        assert r.data.test_min_size == 800
    # the paper's two numbers belong to two of these runs
    from bench.analysis import reference
    published = reference.load()
    rows = published[published["study"] == PAPER.name]
    assert sorted(zip(rows["init"], rows["iterations"], rows["metric"], rows["published"])) == \
        [("imagenet", 18_000, "voc/AP50", 82.7), ("scratch", 144_000, "voc/AP50", 77.6)]


def test_the_voc_miniature_plans_both_arms_at_a_1x_and_an_8x():
    from bench import fork
    runs = MINI.runs
    assert {(r.init, r.solver.max_iter) for r in runs} == \
        {(i, n) for i in ("scratch", "imagenet") for n in (360, 2880)}
    assert {r.data.dataset for r in runs} == {"shapes-voc"} and \
        {r.model.arch for r in runs} == {"faster_rcnn"}
    families = fork.families(runs)
    assert sorted(n for kids in families.values() for _, n in kids) == [240, 240]


@pytest.mark.slow
def test_a_voc_run_trains_evaluates_and_draws_its_voc_map(tmp_path):
    """18 iterations of the miniature's model on the tiny VOC stand-in, end to end."""
    from bench import per_image, runner
    from bench.analysis import report
    from bench.rundir import RunDir, run_dir_for
    body = (REPO / "recipes/mini-voc/study.yaml").read_text().replace(
        "base: ../mini/", f"base: {REPO}/recipes/mini/").replace(
        "dataset: shapes-voc", "dataset: shapes-voc-tiny")
    path = write_recipe(tmp_path, body)
    study = recipe.load(path, recipe.parse_overrides([
        "solver.batch=2", "solver.ref_batch=2", "solver.unit_iters=18",
        "solver.drops_from_end=[12, 4]", "solver.warmup_iters=3", "eval.period=9",
        "checkpoint.period=18", "vary.schedule=[1x]"]))
    (scratch,) = [s for s in study.runs if s.init == "scratch"]
    out = runner.run([scratch], tmp_path / "runs", slots=["cpu0"], progress=False,
                     log=lambda m: None)
    assert out.done == [scratch.run_id], out.failed
    rd = RunDir(run_dir_for(scratch, tmp_path / "runs"))
    rows = [r for r in rd.read_metrics() if r["type"] == "eval"]
    assert [r["iteration"] for r in rows] == [9, 18]
    assert {"voc/AP", "voc/AP50", "voc/AP75"} <= set(rows[-1]) and "bbox/AP" not in rows[-1]
    assert "voc" in per_image.load(rd.per_image_file(18))
    written = report.write_study_results(tmp_path / "runs" / "mini-voc", tmp_path / "out",
                                         log=lambda m: None)
    assert tmp_path / "out" / "ap_vs_iterations.png" in written
    assert "VOC mAP scratch" in (tmp_path / "out" / "final_ap.md").read_text()

