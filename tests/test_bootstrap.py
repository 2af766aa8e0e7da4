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
def test_ap_from_per_image_results_is_pycocotools_ap(gt_and_detections, iou_type):
    gt, boxes, segms = gt_and_detections
    ev = _cocoeval(gt, boxes if iou_type == "bbox" else segms, iou_type)
    acc = bootstrap.Accumulator(per_image.from_cocoeval(ev))
    assert acc.average_precision() == pytest.approx(100 * ev.stats[0], abs=1e-9)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_a_weighted_resample_is_pycocotools_ap_of_the_copied_images(gt_and_detections,
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


def test_a_torn_or_empty_copy_of_a_real_file_is_one_line(tmp_path):
    """What a killed copy leaves (a truncated zip, an empty file) is a PerImageError naming
    the file, not a traceback from zipfile or zlib."""
    per_image.save(tmp_path / "eval.npz", {"bbox": _synthetic()})
    whole = (tmp_path / "eval.npz").read_bytes()
    for name, data in [("torn.npz", whole[: len(whole) // 2]), ("empty.npz", b""),
                       ("flipped.npz", whole[:200] + bytes(b ^ 0xFF for b in whole[200:400])
                        + whole[400:])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(per_image.PerImageError, match=f"{name}: unreadable"):
            per_image.load(tmp_path / name)


def test_a_run_without_per_image_results_is_named_with_how_to_get_them(tmp_path):
    runs = bootstrap.Runs({"r1": tmp_path / "r1"})
    with pytest.raises(per_image.PerImageError,
                       match=r"run r1: .*no per-image results.*delete runs/.*/r1.*bench run"):
        runs.accumulator("r1", 100, "bbox")
    per_image.save(tmp_path / "r1" / "per_image" / "0000100.npz", {"segm": _synthetic()})
    with pytest.raises(per_image.PerImageError, match="run r1: no bbox .*eval.backend"):
        runs.accumulator("r1", 100, "bbox")


def _pairs_of_seeds(tmp_path, gaps, states=None):
    """A pairs table (as table.paired gives it) of one recipe pair over seeds, with
    per-image results: seed k's scratch run misses gaps[k] of the pre-trained run's hits."""
    import pandas as pd
    rows, dirs = [], {}
    for k, gap in enumerate(gaps):
        good = _synthetic(seed=k)
        worse = copy.deepcopy(good)
        hit = np.flatnonzero(good["det_matched"][0])
        worse["det_matched"][:, hit[:gap]] = False
        ids = {}
        for init, arrays in (("scratch", worse), ("imagenet", good)):
            ids[init] = f"{init}-{k}"
            dirs[ids[init]] = tmp_path / ids[init]
            per_image.save(dirs[ids[init]] / "per_image" / "0000100.npz", {"bbox": arrays})
        ap = {i: bootstrap.Accumulator(a).average_precision()
              for i, a in (("scratch", worse), ("imagenet", good))}
        state = (states or {}).get(k, "done")
        rows.append({"engine": "torchvision", "arch": "mask_rcnn", "backbone": "resnet10",
                     "norm": "GN", "schedule": "3x", "max_iter": 100, "train_images": -1,
                     "seed": k, "bbox/AP scratch": ap["scratch"], "bbox/AP imagenet": ap["imagenet"],
                     "bbox/AP scratch-imagenet": ap["scratch"] - ap["imagenet"],
                     "state scratch": state, "state imagenet": "done",
                     "run_id scratch": ids["scratch"], "run_id imagenet": ids["imagenet"],
                     "iteration scratch": 100 if state == "done" else 60,
                     "iteration imagenet": 100})
    return pd.DataFrame(rows), bootstrap.Runs(dirs)


def test_the_gap_over_seeds_pools_finished_pairs_with_a_t_interval(tmp_path):
    pairs, runs = _pairs_of_seeds(tmp_path, [4, 8, 6, 30], states={3: "running"})
    import pandas as pd
    unpaired = dict(pairs.iloc[0], seed=9, **{"run_id imagenet": float("nan"),
                                              "bbox/AP imagenet": float("nan"),
                                              "bbox/AP scratch-imagenet": float("nan")})
    pairs = pd.concat([pairs, pd.DataFrame([unpaired])], ignore_index=True)
    out = bootstrap.pair_intervals(pairs, runs, n_samples=100, log=lambda m: None)
    assert out["bbox/AP scratch-imagenet lo"].iloc[:3].notna().all()
    assert out["bbox/AP scratch-imagenet lo"].iloc[3:].isna().all()  # running, unpaired
    gaps = bootstrap.gaps_over_seeds(out, runs, n_samples=100, log=lambda m: None)
    assert len(gaps) == 1
    g = gaps.iloc[0]
    assert (g["seeds"], g["incomplete"]) == (3, 2)
    done = pairs["bbox/AP scratch-imagenet"].iloc[:3].to_numpy()
    half = 4.303 * done.std(ddof=1) / np.sqrt(3)  # Student's t at 2 degrees of freedom
    assert g["bbox/AP gap"] == pytest.approx(done.mean())
    assert g["bbox/AP gap lo (seeds)"] == pytest.approx(done.mean() - half)
    assert g["bbox/AP gap hi (seeds)"] == pytest.approx(done.mean() + half)
    assert g["bbox/AP gap lo (images)"] < done.mean() < g["bbox/AP gap hi (images)"] < 0
