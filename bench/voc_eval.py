"""PASCAL VOC's detection metric, written here from its definition (the VOC devkit's
documentation and detectron2's pascal_voc_evaluation.py were read for it; no code taken).

Per class, over the val images:
* Detections are taken in order of score, highest first (equal scores keep their order:
  image order, then the model's order within an image).
* A detection is compared, in its own image, with every ground-truth box of its class
  (claimed or not, difficult or not) and goes to the one it overlaps most. If that overlap
  exceeds the IoU threshold (strictly, as detectron2's and Detectron's voc_eval), then: a
  `difficult` box makes the detection ignored, neither true nor false positive (the devkit
  neither requires nor penalizes difficult objects); an unclaimed box makes it a true
  positive that claims the box; a box already claimed makes it a false positive (a
  duplicate). An overlap at or under the threshold, or no box of the class, is a false
  positive.
* Overlap is VOC's IoU of pixel-index boxes, where a box (x1, y1, x2, y2) includes both end
  pixels: width x2 - x1 + 1, height y2 - y1 + 1. Boxes arrive in COCO's format with
  detectron2's conversion (bench.data.voc: xmin and ymin minus 1) and go back by adding 1 to
  x and y, as detectron2's evaluator does for both ground truth and predictions. The +1
  cancels that shift exactly, so this IoU equals the plain IoU of the boxes as the model
  sees them (tests/test_voc.py).
* After each detection: recall = true positives / non-difficult ground-truth boxes,
  precision = true positives / (true + false positives).
* AP "area" (VOC2010 and later; VOC2012 val, the paper's evaluation): the area under the
  interpolated curve, where the precision at recall r is the highest precision at any
  recall >= r, summed over every recall the detections reach: AP = sum over detections that
  raise the recall of (the rise) x (the interpolated precision there).
  AP "11point" (VOC2007): the mean, over r = 0, 0.1, ..., 1, of the highest precision at
  recall >= r, 0 where no detection reaches r. The eleven r are np.arange(0, 1.1, 0.1), as
  in Detectron's and detectron2's voc_eval (the paper's numbers come from the former):
  there 0.3, 0.6 and 0.7 are one float step above, so a recall of exactly 3/5 does not
  reach 0.6, there nor here (tests/test_voc.py meets that case: k / 10 would differ).
* mAP: the mean AP over the classes that have a non-difficult ground-truth box in the
  images scored (detectron2 would give NaN for one without); NaN when none has.

Reported as detectron2's PascalVOCDetectionEvaluator reports it, in percent: `voc/AP50`
(mAP at IoU 0.5: the paper's "VOC mAP", 82.7 pre-trained vs 77.6 from scratch), `voc/AP75`,
and `voc/AP`, the mean of the mAPs at IoU 0.50, 0.55, ..., 0.95. Unlike detectron2's, scores
and boxes are not rounded (it writes them to text files at 3 and 1 decimals first).
"""

import numpy as np

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)   # 0.50, 0.55, ..., 0.95
METRICS = ("area", "11point")
ELEVEN = np.arange(0.0, 1.1, 0.1)   # VOC2007's recall points (see above)
STAT_NAMES = ("AP", "AP50", "AP75")


def voc_boxes(xywh) -> np.ndarray:
    """COCO boxes (x, y, w, h; continuous, from detectron2's VOC conversion) -> VOC's
    inclusive pixel indices (x1, y1, x2, y2)."""
    b = np.asarray(xywh, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] + 1, b[:, 1] + 1, b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def iou(a, b) -> np.ndarray:
    """(len(a), len(b)) IoU of VOC pixel-index boxes (both end pixels included)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + 1
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + 1
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def match(det_boxes, gt_boxes, gt_difficult, thresholds=IOU_THRESHOLDS):
    """One image and class: (true positive, ignored) flags, each (thresholds, detections),
    of detections already in score order against that image's boxes of the class."""
    t, n = len(thresholds), len(det_boxes)
    tp, ignored = np.zeros((t, n), bool), np.zeros((t, n), bool)
    if n == 0 or len(gt_boxes) == 0:
        return tp, ignored
    overlaps = iou(det_boxes, gt_boxes)
    best, best_iou = overlaps.argmax(axis=1), overlaps.max(axis=1)
    thresholds = np.asarray(thresholds)
    claimed = np.zeros((t, len(gt_boxes)), bool)
    for d in range(n):
        g = best[d]
        hit = best_iou[d] > thresholds
        if gt_difficult[g]:
            ignored[:, d] = hit
        else:
            tp[:, d] = hit & ~claimed[:, g]
            claimed[:, g] |= hit
    return tp, ignored


def curve(tp, fp, positives):
    """Recall and precision after each detection (in score order)."""
    tp_sum, fp_sum = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    recall = tp_sum / positives
    precision = tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)
    return recall, precision


def average_precision(recall, precision, metric="area") -> float:
    """VOC's AP of one precision / recall curve (points in detection order)."""
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if metric == "11point":
        return float(np.mean([precision[recall >= r].max(initial=0.0) for r in ELEVEN]))
    if metric != "area":
        raise ValueError(f"VOC AP {metric!r}; allowed: {', '.join(METRICS)}")
    if recall.size == 0:
        return 0.0
    # the interpolated precision: at each point, the best precision at this recall or beyond
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    rise = np.diff(recall, prepend=0.0)
    return float(np.sum(rise * envelope))


def evaluate(coco_gt, results, image_ids=None, thresholds=IOU_THRESHOLDS):
    """Every class's matches over `image_ids` (default: all of `coco_gt`'s images):
    {category id: (scores, image indices, tp, ignored, positives)}, detections in score order
    (tp and ignored: (thresholds, detections)); and the image ids in order."""
    image_ids = sorted(coco_gt.imgs) if image_ids is None else list(image_ids)
    column = {int(i): j for j, i in enumerate(image_ids)}
    cats = sorted(coco_gt.getCatIds())
    gt = {}   # (category, image) -> (boxes, difficult)
    positives = {c: 0 for c in cats}
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            gt.setdefault((ann["category_id"], image_id), []).append(ann)
    for key, anns in list(gt.items()):
        difficult = np.array([bool(a.get("difficult", 0)) for a in anns])
        gt[key] = (voc_boxes([a["bbox"] for a in anns]), difficult)
        positives[key[0]] += int((~difficult).sum())
    dets = {c: [] for c in cats}
    for r in results:  # image order, then the model's order: ties in score keep it
        if r["image_id"] in column and r["category_id"] in dets:
            dets[r["category_id"]].append(r)
    dets = {c: sorted(rs, key=lambda r: column[r["image_id"]]) for c, rs in dets.items()}
    out = {}
    for c in cats:
        rs = dets[c]
        scores = np.array([r["score"] for r in rs], dtype=np.float64)
        order = np.argsort(-scores, kind="mergesort")
        images = np.array([column[r["image_id"]] for r in rs], dtype=np.int64)[order]
        boxes = voc_boxes([r["bbox"] for r in rs])[order]
        tp = np.zeros((len(thresholds), len(rs)), bool)
        ignored = np.zeros_like(tp)
        for j in np.unique(images):  # each image's detections, still in score order
            at = np.nonzero(images == j)[0]
            g_boxes, g_difficult = gt.get((c, image_ids[j]), (np.zeros((0, 4)), np.zeros(0, bool)))
            tp[:, at], ignored[:, at] = match(boxes[at], g_boxes, g_difficult, thresholds)
        out[c] = (scores[order], images, tp, ignored, positives[c])
    return out, image_ids


def voc_stats(coco_gt, results, image_ids=None, metric="area", per_image_out=None) -> dict:
    """`voc/AP`, `voc/AP50`, `voc/AP75` (percent) of COCO-format box `results` against VOC
    ground truth in COCO's format (bench.data.voc). With a dict `per_image_out`, also the
    per-image results of the IoU-0.5 matches under "voc" (bench.per_image's arrays), from
    which bench.analysis.bootstrap recomputes the mAP on resampled val images."""
    if metric not in METRICS:
        raise ValueError(f"VOC AP {metric!r}; allowed: {', '.join(METRICS)}")
    per_class, image_ids = evaluate(coco_gt, results, image_ids)
    aps = np.full((len(IOU_THRESHOLDS), len(per_class)), np.nan)
    for k, (_, _, tp, ignored, positives) in enumerate(per_class.values()):
        if positives == 0:
            continue  # no ground truth to find: left out of the mean
        for t in range(len(IOU_THRESHOLDS)):
            recall, precision = curve(tp[t], ~tp[t] & ~ignored[t], positives)
            aps[t, k] = average_precision(recall, precision, metric)
    scored = ~np.isnan(aps[0])
    m_ap = aps[:, scored].mean(axis=1) * 100 if scored.any() else np.full(len(IOU_THRESHOLDS),
                                                                          np.nan)
    if per_image_out is not None:
        per_image_out["voc"] = per_image_arrays(per_class, image_ids, coco_gt, metric)
    return {"voc/AP": float(m_ap.mean()), "voc/AP50": float(m_ap[0]),
            "voc/AP75": float(m_ap[list(IOU_THRESHOLDS).index(0.75)])}


def per_image_arrays(per_class, image_ids, coco_gt, metric) -> dict:
    """bench.per_image's arrays for the IoU-0.5 matches (the paper's mAP): per detection its
    image, class, score, true positive and ignored flags; per class and image its
    non-difficult ground truth; `interpolation` names VOC's AP for the bootstrap."""
    cats = list(per_class)
    row = {c: k for k, c in enumerate(cats)}
    column = {int(i): j for j, i in enumerate(image_ids)}
    gt_count = np.zeros((len(cats), len(image_ids)), dtype=np.int32)
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if not ann.get("difficult", 0) and ann["category_id"] in row:
                gt_count[row[ann["category_id"]], column[int(image_id)]] += 1
    parts = [(np.full(len(s), k, np.int32), s, i, tp[:1], ig[:1])
             for k, (s, i, tp, ig, _) in enumerate(per_class.values())]
    return dict(
        image_ids=np.asarray(image_ids, dtype=np.int64), cat_ids=np.asarray(cats, np.int64),
        iou_thrs=IOU_THRESHOLDS[:1].astype(np.float64),
        rec_thrs=ELEVEN if metric == "11point" else np.zeros(0),
        gt_count=gt_count,
        det_image=np.concatenate([p[2] for p in parts]).astype(np.int32) if parts
        else np.zeros(0, np.int32),
        det_cat=np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32),
        det_score=np.concatenate([p[1] for p in parts]) if parts else np.zeros(0),
        det_matched=np.concatenate([p[3] for p in parts], 1) if parts else np.zeros((1, 0), bool),
        det_ignored=np.concatenate([p[4] for p in parts], 1) if parts else np.zeros((1, 0), bool),
        interpolation=np.asarray(f"voc-{metric}"))
