"""COCO evaluation: pycocotools is the reference; faster-coco-eval, the optional fast
backend, must give the same 12 stats on the same detections."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bench.data import registry
from bench.data.coco import load_coco
from bench.engines.coco_stats import STAT_NAMES
from bench.engines.torchvision.evaluate import coco_stats


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_faster_coco_eval_gives_the_same_stats_as_pycocotools(gt_and_detections, iou_type):
    pytest.importorskip("faster_coco_eval")
    gt, boxes, segms = gt_and_detections
    dets = boxes if iou_type == "bbox" else segms
    kept_ref, kept_fast = {}, {}
    ref = coco_stats(gt, dets, iou_type, per_image_out=kept_ref)
    fast = coco_stats(gt, dets, iou_type, backend="faster-coco-eval", per_image_out=kept_fast)
    assert 0 < ref[f"{iou_type}/AP"] < 100
    for name in STAT_NAMES:
        key = f"{iou_type}/{name}"
        assert fast[key] == pytest.approx(ref[key], abs=1e-9, nan_ok=True), key
    # its C++ COCOeval keeps the per-image results out of Python: no intervals over val
    # images from it (README: Evaluation), while pycocotools' run keeps them
    assert iou_type in kept_ref and not kept_fast


def test_an_unknown_backend_is_refused(gt_and_detections):
    gt, boxes, _ = gt_and_detections
    with pytest.raises(ValueError, match="allowed: pycocotools, faster-coco-eval"):
        coco_stats(gt, boxes, "bbox", backend="cocoapi2")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_detection_scores_as_cocoeval_scores_one_useless_detection(gt_and_detections,
                                                                      iou_type):
    """COCOeval cannot load an empty result list; our stats for it are what COCOeval gives
    a model whose only detection matches nothing: 0, and NaN for size ranges without ground
    truth (the embedded val set has no large object)."""
    gt, _, _ = gt_and_detections
    img = gt.dataset["images"][0]
    useless = {"image_id": img["id"], "category_id": gt.getCatIds()[0], "score": 0.9,
               "bbox": [0.0, 0.0, 1.0, 1.0]}
    if iou_type == "segm":
        m = np.zeros((img["height"], img["width"]), np.uint8)
        m[0, 0] = 1
        rle = mask_utils.encode(np.asfortranarray(m))
        useless = {**useless, "segmentation": {**rle, "counts": rle["counts"].decode("ascii")}}
        del useless["bbox"]
    none, one = coco_stats(gt, [], iou_type), coco_stats(gt, [useless], iou_type)
    assert any(np.isnan(v) for v in one.values()) and any(v == 0 for v in one.values())
    assert none == pytest.approx(one, nan_ok=True)


def _mixed_size_set(dest):
    """Eight val images of shapes-tiny cut to three sizes (square, landscape, portrait),
    in an order that mixes them: a COCO set where a batch of 8 pads most images."""
    import json

    from PIL import Image

    from bench.data.coco import CocoDetection
    files = registry.resolve("shapes-tiny")
    gt = load_coco(files.val_annotations)
    sizes = [(128, 128), (96, 128), (128, 96)]  # (height, width)
    dest.mkdir()
    images = []
    for k, image_id in enumerate(sorted(gt.imgs)[:8]):
        h, w = sizes[k % 3]
        info = gt.imgs[image_id]
        Image.open(files.val_images / info["file_name"]).crop((0, 0, w, h)).save(
            dest / info["file_name"])
        images.append({"id": image_id, "file_name": info["file_name"], "height": h, "width": w})
    ann = dest / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": [],
                               "categories": gt.dataset["categories"]}))
    return CocoDetection(dest, ann, train=False)


@pytest.mark.slow
def test_detections_do_not_depend_on_eval_batch(tmp_path):
    """A GN model's detections for an image are those of the image alone, however many
    images of other sizes share its evaluation (Detectron and detectron2 test one image at
    a time; batching a portrait with a landscape would pad both and GN would normalize over
    the padding)."""
    import torch

    from bench import recipe
    from bench.engines.torchvision.evaluate import predict
    from bench.engines.torchvision.model import build_detector
    from conftest import REPO
    dataset = _mixed_size_set(tmp_path / "mixed")
    spec = next(s for s in recipe.load(REPO / "recipes/mini/study.yaml").runs
                if s.init == "scratch")
    assert spec.model.norm == "GN"
    torch.manual_seed(0)
    model = build_detector(spec.model, len(dataset.cat_ids), spec.data)
    alone = predict(model, dataset, "cpu", batch_size=1)
    batched = predict(model, dataset, "cpu", batch_size=8)
    assert len(alone[0]) > 100                      # an untrained model detects plenty

    def by_image(results, key):
        out = {}
        for r in results:
            out.setdefault(r["image_id"], []).append((r["category_id"], r[key], r["score"]))
        return out

    boxes_alone, boxes_batched = by_image(alone[0], "bbox"), by_image(batched[0], "bbox")
    assert boxes_alone.keys() == boxes_batched.keys()
    for image_id, dets in boxes_alone.items():
        other = boxes_batched[image_id]
        assert [c for c, _, _ in dets] == [c for c, _, _ in other], image_id
        np.testing.assert_allclose([b for _, b, _ in dets], [b for _, b, _ in other],
                                   atol=1e-3)
        np.testing.assert_allclose([s for _, _, s in dets], [s for _, _, s in other],
                                   atol=1e-5)
    masks_alone, masks_batched = by_image(alone[1], "segmentation"), by_image(
        batched[1], "segmentation")
    for image_id, dets in masks_alone.items():
        for (_, a, _), (_, b, _) in zip(dets, masks_batched[image_id]):
            assert mask_utils.iou([a], [b], [0])[0, 0] > 0.99 or (
                mask_utils.area(a) == mask_utils.area(b) == 0), image_id
