"""COCO's masks are polygons, and both reference engines (detectron2's MASK_FORMAT polygon,
Detectron's polys_to_mask_wrt_box) rasterize an instance's polygons inside each RoI at
28 x 28 rather than reading an image-sized bitmask. model.mask_target "polygon" does the
same; RLE masks (the embedded data) keep the bitmask path."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from bench import recipe
from bench.data.coco import CocoDetection
from bench.engines.torchvision import model as tv_model
from bench.engines.torchvision import train as train_mod
from bench.engines.torchvision.model import (GtMasks, build_detector, detectron2_mask_targets,
                                             polygon_mask_in_box)
from bench.spec import replace
from conftest import REPO

SPEC = next(r for r in recipe.load(REPO / "recipes/mini/study.yaml").runs if r.init == "scratch")


def _iou(a, b):
    a, b = a.bool(), b.bool()
    return ((a & b).sum() / (a | b).sum()).item()


def _full_image(polygons, h, w):
    rle = mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in polygons], h, w))
    return torch.from_numpy(mask_utils.decode(rle))


def test_a_polygon_filling_its_box_is_an_all_ones_target_and_half_a_box_is_half():
    box = [20.0, 10.0, 48.0, 38.0]
    square = [np.array([20, 10, 48, 10, 48, 38, 20, 38], dtype=np.float64)]
    assert torch.equal(polygon_mask_in_box(square, box, 28), torch.ones(28, 28, dtype=torch.uint8))
    left = [np.array([20, 10, 34, 10, 34, 38, 20, 38], dtype=np.float64)]
    half = polygon_mask_in_box(left, box, 28)
    assert half[:, :14].all() and not half[:, 14:].any()


def test_polygon_targets_agree_with_the_bitmask_of_the_same_shape():
    """The two paths read the same shape; they differ only at the border pixels."""
    rng = np.random.default_rng(0)
    tri = [np.array([12, 8, 56, 20, 24, 60], dtype=np.float64)]
    bitmask = _full_image(tri, 64, 64)[None]
    boxes = torch.tensor([[12., 8., 56., 60.]]) + torch.from_numpy(
        rng.uniform(-3, 3, (6, 4))).float()
    idx = torch.zeros(len(boxes), dtype=torch.int64)
    from_polygons = detectron2_mask_targets(GtMasks(bitmask, [tri]), boxes, idx, 28)
    from_bitmask = detectron2_mask_targets(bitmask, boxes, idx, 28)
    assert not torch.equal(from_polygons, from_bitmask)  # the paths differ...
    for p, b in zip(from_polygons, from_bitmask):
        assert _iou(p, b) > 0.9  # ...by the border only
    # an RLE instance (no polygons) of the same image takes the bitmask path
    mixed = detectron2_mask_targets(GtMasks(bitmask, [None]), boxes, idx, 28)
    assert torch.equal(mixed, from_bitmask)


def _polygon_coco(tmp_path):
    """Two images (one landscape, one portrait) with polygon instances, COCO's layout."""
    images, anns = [], []
    shapes = {1: [[10, 10, 60, 14, 40, 50]], 2: [[70, 20, 110, 20, 110, 60, 70, 60],
                                                 [90, 62, 110, 62, 100, 75]]}
    for image_id, (w, h) in ((1, (128, 96)), (2, (96, 128))):
        img = Image.new("RGB", (w, h), (40, 40, 40))
        draw = ImageDraw.Draw(img)
        for k, (cat, polys) in enumerate(shapes.items()):
            polys = [[min(v, (w if i % 2 == 0 else h) - 1) for i, v in enumerate(p)] for p in polys]
            for p in polys:
                draw.polygon(p, fill=(200, 50 * cat, 20))
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=cat,
                             segmentation=polys, area=float(mask_utils.area(rle)),
                             bbox=[float(v) for v in mask_utils.toBbox(rle)], iscrowd=0))
        img.save(tmp_path / f"{image_id}.png")
        images.append(dict(id=image_id, file_name=f"{image_id}.png", width=w, height=h))
    cats = [dict(id=c, name=f"c{c}") for c in shapes]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return path


@pytest.mark.parametrize("hflip", [False, True])
def test_polygons_follow_their_image_through_flip_and_resize(tmp_path, hflip):
    """The dataset flips an instance's polygons with its pixels, the model's transform
    scales them with the image: rasterized over the whole image, they cover the flipped and
    resized bitmask (up to border pixels)."""
    ann = _polygon_coco(tmp_path)
    data = CocoDetection(tmp_path, ann, polygons=True)
    for index in range(len(data)):  # at the image's own size: all but a few border pixels
        img, target = data.get(index, hflip=hflip)
        h, w = img.shape[-2:]
        for polys, mask in zip(target["polygons"], target["masks"]):
            wrong = (_full_image(polys, h, w).bool() ^ mask.bool()).sum().item()
            assert wrong <= 0.02 * mask.sum().item()  # (w - 1 - x would miss a column)
    det = build_detector(SPEC.model, num_classes=2, data=replace(SPEC.data, train_min_size=160,
                                                                   train_max_size=400))
    det.train()
    for index in range(len(data)):
        img, target = data.get(index, hflip=hflip)
        assert len(target["polygons"]) == len(target["masks"]) > 0
        _, resized = det.transform.resize(img.float() / 255, dict(target))
        h, w = resized["masks"].shape[-2:]
        assert (h, w) != tuple(target["masks"].shape[-2:])
        for polys, mask in zip(resized["polygons"], resized["masks"]):
            assert _iou(_full_image(polys, h, w), mask) > 0.85


def test_a_training_step_reads_polygon_targets_when_asked_and_bitmasks_otherwise(tmp_path,
                                                                                 monkeypatch):
    ann = _polygon_coco(tmp_path)
    calls = []
    real = tv_model.polygon_mask_in_box
    monkeypatch.setattr(tv_model, "polygon_mask_in_box",
                        lambda *a: calls.append(1) or real(*a))
    for mask_target, polygons in (("polygon", True), ("bitmask", False)):
        calls.clear()
        spec = replace(SPEC, **{"model.mask_target": mask_target})
        assert train_mod.datasets_for(spec)[0].polygons is polygons  # the engine's wiring
        data = CocoDetection(tmp_path, ann, polygons=spec.model.mask_target == "polygon")
        assert ("polygons" in data.get(0)[1]) is polygons
        torch.manual_seed(0)
        det = build_detector(spec.model, num_classes=2, data=spec.data)
        det.train()
        images, targets = zip(*(data.get(i) for i in range(len(data))))
        losses = det([i.float() / 255 for i in images], list(targets))
        assert torch.isfinite(losses["loss_mask"])
        assert bool(calls) is polygons


def test_detectron2_translation_follows_the_mask_target():
    from bench.engines.detectron2.config import translate
    parity = recipe.load(REPO / "recipes/parity/pair.yaml").runs[0]  # a model detectron2 builds
    coco = replace(parity, **{"data.dataset": "coco"})
    assert translate(coco)["INPUT"]["MASK_FORMAT"] == "polygon"
    bitmask = replace(coco, **{"model.mask_target": "bitmask"})
    assert translate(bitmask)["INPUT"]["MASK_FORMAT"] == "bitmask"


def test_polygon_targets_equal_detectron2s_rasterization():
    structures = pytest.importorskip("detectron2.structures.masks")
    rng = np.random.default_rng(1)
    for _ in range(20):
        centre = rng.uniform(20, 80, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = rng.uniform(5, 30, 7)
        poly = np.stack([centre[0] + radii * np.cos(angles),
                         centre[1] + radii * np.sin(angles)], 1).ravel()
        x0, y0 = poly[0::2].min(), poly[1::2].min()
        x1, y1 = poly[0::2].max(), poly[1::2].max()
        box = np.array([x0, y0, x1, y1]) + rng.uniform(-4, 4, 4)
        theirs = structures.rasterize_polygons_within_box([poly.copy()], box, 28)
        ours = polygon_mask_in_box([poly], box.tolist(), 28)
        assert torch.equal(ours.bool(), theirs.bool())
