"""Intervals over val images: COCO's AP re-accumulated from per-image results, with each
image counted as often as a resample draws it, is pycocotools' AP of that resample; and a
pair's difference is resampled on the same images for both runs."""

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench import per_image
from bench.analysis import bootstrap
from test_evaluate import gt_and_detections  # noqa: F401  (the fixture)


def _cocoeval(gt, results, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _copied(gt, results, draw):
    """The resample `draw` (a list of image ids, repeats allowed) as its own COCO: each
    drawn image a new copy, with its ground truth and detections."""
    d = gt.dataset
    images, anns, dets = [], [], []
    for new_id, old_id in enumerate(draw, start=1):
        images.append({**gt.imgs[old_id], "id": new_id})
        for a in gt.imgToAnns.get(old_id, []):
            anns.append({**a, "id": len(anns) + 1, "image_id": new_id})
        dets += [{**r, "image_id": new_id} for r in results if r["image_id"] == old_id]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": d["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, dets


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_ap_from_per_image_results_is_pycocotools_ap(gt_and_detections, iou_type):  # noqa: F811
    gt, boxes, segms = gt_and_detections
    ev = _cocoeval(gt, boxes if iou_type == "bbox" else segms, iou_type)
    acc = bootstrap.Accumulator(per_image.from_cocoeval(ev))
    assert acc.average_precision() == pytest.approx(100 * ev.stats[0], abs=1e-9)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_a_weighted_resample_is_pycocotools_ap_of_the_copied_images(gt_and_detections,  # noqa: F811
                                                                    iou_type):
    gt, boxes, segms = gt_and_detections
    results = boxes if iou_type == "bbox" else segms
    acc = bootstrap.Accumulator(per_image.from_cocoeval(_cocoeval(gt, results, iou_type)))
    for seed in range(3):
        weights = bootstrap.resample_weights(len(acc.image_ids), 1, seed)[0]
        draw = [int(i) for i, w in zip(acc.image_ids, weights) for _ in range(w)]
        coco, dets = _copied(gt, results, draw)
        expected = _cocoeval(coco, dets, iou_type).stats[0]
        assert acc.average_precision(weights) == pytest.approx(100 * expected, abs=1e-9)


def _synthetic(n_images=60, hit_rate=0.7, seed=0):
    """Per-image results with a known structure: one category, one object per image, one
    detection per image that matches it with probability hit_rate (score above any miss)."""
    rng = np.random.default_rng(seed)
    t = 10
    hit = rng.random(n_images) < hit_rate
    score = np.where(hit, 0.5 + 0.5 * rng.random(n_images), 0.5 * rng.random(n_images))
    return {"image_ids": np.arange(1, n_images + 1), "cat_ids": np.array([1]),
            "iou_thrs": np.linspace(0.5, 0.95, t), "rec_thrs": np.linspace(0, 1, 101),
            "gt_count": np.ones((1, n_images), dtype=np.int32),
            "det_image": np.arange(n_images), "det_cat": np.zeros(n_images, dtype=np.int32),
            "det_score": score, "det_matched": np.repeat(hit[None], t, 0),
            "det_ignored": np.zeros((t, n_images), dtype=bool)}


def test_a_known_answer_every_hit_scored_above_every_miss():
    """Precision is 1 up to recall = the hit rate, so AP = the share of the 101 recall
    thresholds at or below it."""
    arrays = _synthetic()
    hits = arrays["det_matched"][0].sum()
    expected = np.mean(np.linspace(0, 1, 101) <= hits / 60) * 100
    assert bootstrap.Accumulator(arrays).average_precision() == pytest.approx(expected)


def test_a_run_against_itself_differs_by_exactly_zero_and_a_worse_run_is_resolved():
    same = bootstrap.Accumulator(_synthetic())
    out = bootstrap.difference(same, bootstrap.Accumulator(_synthetic()), n_samples=200)
    assert out == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    worse = _synthetic()
    worse["det_matched"][:, :20] = False   # 20 hits fewer, on the same images
    out = bootstrap.difference(same, bootstrap.Accumulator(worse), n_samples=200)
    assert 0 < out["lo"] < out["diff"] < out["hi"]


def test_the_pair_interval_is_narrower_than_either_runs_own():
    """Resampling both runs on the same images cancels the images' shared difficulty
    (resampled independently, a difference would spread about 1.4x more than one run)."""
    a = _synthetic(seed=0)
    b = copy.deepcopy(a)
    b["det_score"] = b["det_score"] * 0.999  # the same run, nearly: same hits, same images
    b["det_matched"][:, :3] = False
    accs = [bootstrap.Accumulator(a), bootstrap.Accumulator(b)]
    reps = bootstrap.replicates(accs, n_samples=300)
    own = [np.subtract(*bootstrap.interval(reps[:, j])[::-1]) for j in (0, 1)]
    pair = np.subtract(*bootstrap.interval(reps[:, 0] - reps[:, 1])[::-1])
    assert pair < min(own)


def test_runs_over_different_val_images_are_refused():
    a = _synthetic()
    b = _synthetic()
    b["image_ids"] = b["image_ids"] + 1
    with pytest.raises(ValueError, match="same val set"):
        bootstrap.difference(bootstrap.Accumulator(a), bootstrap.Accumulator(b), n_samples=5)


def test_per_image_results_round_trip_and_a_damaged_file_is_one_line(tmp_path):
    arrays = _synthetic()
    per_image.save(tmp_path / "eval.npz", {"bbox": arrays})
    back = per_image.load(tmp_path / "eval.npz")["bbox"]
    assert all(np.array_equal(back[k], arrays[k]) for k in per_image.KEYS)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(per_image.PerImageError, match="bad.npz: unreadable"):
        per_image.load(tmp_path / "bad.npz")
    with pytest.raises(per_image.PerImageError, match="missing.npz: no per-image results"):
        per_image.load(tmp_path / "missing.npz")
