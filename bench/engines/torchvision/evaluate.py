"""COCO evaluation of a torchvision detector: inference, then COCOeval.

Inference is sharded over the processes of a DDP run and gathered on rank 0. Rows carry all
COCO stats per task (12 for boxes and masks, 10 for keypoints), in percent as detectron2
reports them: `bbox/AP`, `bbox/AP50`, ..., `segm/ARl`, `keypoints/AP`, ... The COCOeval is pycocotools' (the reference), or
with `eval.backend: faster-coco-eval` that package's C++ re-implementation, which gives the
same stats (tests/test_evaluate.py).
"""

import contextlib
import copy
import io
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from bench import distributed, per_image
from bench.engines.coco_stats import no_detection_stats, stat_names
from bench.engines.torchvision.model import use_input_sizes



def same_size_batches(dataset, indices, batch_size):
    """`indices` cut into batches of at most `batch_size` images that all have one size.

    Why: the model pads a batch to its largest image and GroupNorm normalizes over that
    padding, so an image batched with a larger one (a portrait with a landscape) would get
    other detections than alone; Detectron and detectron2 test one image at a time. Images
    of one size are resized alike and padded alike whether alone or together, and every
    later stage (RPN, RoI heads, BN/FrozenBN in eval) works per image, so these batches
    give each image what a batch of one gives it (tests/test_evaluate.py). The sizes come
    from the annotation file; `predict` checks them on the loaded pixels."""
    groups = {}
    for i in indices:
        info = dataset.coco.imgs[dataset.ids[i]]
        groups.setdefault((info.get("height"), info.get("width")), []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            yield members[start:start + batch_size]


@torch.no_grad()
def predict(model, dataset, device, batch_size=8, indices=None):
    """COCO-format results for `dataset` images: (bbox results, segm results, keypoint
    results). Each image's detections are those of a forward pass of that image alone
    (same_size_batches)."""
    was_training = model.training
    model.eval()
    use_input_sizes(model, train=False)
    boxes_out, segms_out, kps_out = [], [], []
    indices = list(range(len(dataset))) if indices is None else list(indices)
    for batch in same_size_batches(dataset, indices, batch_size):
        loaded = [dataset.get(i) for i in batch]
        # an annotation file whose sizes do not match its images: split by the real sizes
        by_shape = {}
        for item in loaded:
            by_shape.setdefault(tuple(item[0].shape), []).append(item)
        for items in by_shape.values():
            images = [img.to(device, torch.float32) / 255 for img, _ in items]
            for (_, target), out in zip(items, model(images)):
                _append_results(dataset, target["image_id"], out, boxes_out, segms_out,
                                kps_out)
    model.train(was_training)
    use_input_sizes(model, train=was_training)
    return boxes_out, segms_out, kps_out


@torch.no_grad()
def predict_tta(model, dataset, device, tta, indices=None):
    """predict's results with detectron2's test-time augmentation (`tta`: the EvalSpec's
    min sizes, max size and flip; bench.engines.torchvision.tta), one image at a time."""
    from bench.engines.torchvision import tta as augment
    was_training = model.training
    model.eval()
    boxes_out, segms_out, kps_out = [], [], []
    try:
        for i in (range(len(dataset)) if indices is None else indices):
            image, target = dataset.get(i)
            out = augment.detect(model, image.to(device, torch.float32) / 255,
                                 tta.tta_min_sizes, tta.tta_max_size, tta.tta_flip)
            _append_results(dataset, target["image_id"], out, boxes_out, segms_out, kps_out)
    finally:
        model.train(was_training)
        use_input_sizes(model, train=was_training)
    return boxes_out, segms_out, kps_out


def _append_results(dataset, image_id, out, boxes_out, segms_out, kps_out):
    """One image's detections in COCO's result format (xywh boxes, RLE masks)."""
    boxes = out["boxes"].cpu().numpy()
    scores = out["scores"].cpu().numpy().tolist()
    cats = [dataset.cat_ids[int(l) - 1] for l in out["labels"].cpu()]
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    for b, s, c in zip(xywh, scores, cats):
        boxes_out.append({"image_id": image_id, "category_id": c, "bbox": b, "score": s})
    if "masks" in out:
        binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        for m, s, c in zip(binary, scores, cats):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            segms_out.append({"image_id": image_id, "category_id": c,
                              "segmentation": rle, "score": s})
    if "keypoints" in out:
        # x, y back to COCO's pixel indices (the loader added 0.5, as detectron2's does and
        # its evaluator takes off); the third number, unused by COCOeval, is the keypoint's
        # score, and the detection's score is its box's, as in detectron2
        kps = out["keypoints"].detach().cpu().clone()
        kps[..., :2] -= 0.5
        kps[..., 2] = out["keypoints_scores"].detach().cpu()
        for k, s, c in zip(kps.numpy(), scores, cats):
            kps_out.append({"image_id": image_id, "category_id": c,
                            "keypoints": k.ravel().tolist(), "score": s})


BACKENDS = ("pycocotools", "faster-coco-eval")
_FASTER_GT = {}


def _faster_coco_eval(coco_gt):
    """faster-coco-eval's COCO for the same ground truth (built once per val set)."""
    try:
        import faster_coco_eval
    except ImportError:
        raise ValueError("eval.backend: faster-coco-eval is not installed; `pip install "
                         "faster-coco-eval`, or use eval.backend: pycocotools") from None
    key = id(coco_gt)
    if key not in _FASTER_GT:
        _FASTER_GT[key] = (coco_gt, faster_coco_eval.COCO(copy.deepcopy(coco_gt.dataset)))
    return _FASTER_GT[key][1], faster_coco_eval.COCOeval_faster


def coco_stats(coco_gt, results, iou_type, image_ids=None, backend="pycocotools",
               per_image_out=None) -> dict:
    """The 12 COCOeval stats (percent) for `results`; with a dict `per_image_out`, also
    the per-image results (bench.per_image) under `iou_type`."""
    if not results:
        if per_image_out is not None:
            per_image_out[iou_type] = per_image.without_detections(coco_gt, image_ids, iou_type)
        return {f"{iou_type}/{n}": v
                for n, v in no_detection_stats(coco_gt, image_ids, iou_type).items()}
    gt, evaluator = coco_gt, COCOeval
    if backend == "faster-coco-eval":
        gt, evaluator = _faster_coco_eval(coco_gt)
    elif backend != "pycocotools":
        raise ValueError(f"eval.backend: {backend!r}; allowed: {', '.join(BACKENDS)}")
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        dt = gt.loadRes(copy.deepcopy(results))     # loadRes adds fields to the dicts
        ev = evaluator(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    if per_image_out is not None and getattr(ev, "evalImgs", None):
        # (a backend that keeps its per-image results out of Python leaves none: the
        # bootstrap then names the run and says to evaluate with pycocotools)
        per_image_out[iou_type] = per_image.from_cocoeval(ev)
    # COCOeval reports -1 where a size range has no ground truth; keep it as NaN, not 0.
    return {f"{iou_type}/{n}": (float(v) * 100 if v >= 0 else float("nan"))
            for n, v in zip(stat_names(iou_type), ev.stats)}


def evaluate(model, dataset, device, masks=True, backend="pycocotools",
             world=distributed.World(), per_image_out=None, keypoints=False, voc=None,
             tta=None):
    """COCO stats of `model` on `dataset` (box, and mask or keypoint (OKS) as asked), or with
    `voc` ("area" or "11point") PASCAL VOC's box stats instead (bench.voc_eval: `voc/AP50`,
    the paper's VOC mAP, `voc/AP`, `voc/AP75`); under DDP each process predicts every
    world.size-th image and rank 0 scores them all (the others get None). A dict
    `per_image_out` receives the per-image results of each task (on rank 0). With `tta`
    (an EvalSpec asking for it) the detections are test-time augmented (predict_tta)."""
    t0 = time.time()
    shard = range(world.rank, len(dataset), world.size)
    if tta is not None:
        boxes, segms, kps = predict_tta(model, dataset, device, tta, indices=shard)
    else:
        boxes, segms, kps = predict(model, dataset, device, indices=shard)
    boxes, segms = distributed.gather(boxes, world), distributed.gather(segms, world)
    kps = distributed.gather(kps, world)
    if not world.main:
        return None
    if voc:  # VOC's own metric, not COCOeval: the numbers the paper reports for VOC
        from bench.voc_eval import voc_stats
        stats = voc_stats(dataset.coco, boxes, dataset.ids, voc, per_image_out)
        return {**stats, "eval_time": time.time() - t0, "detections": len(boxes)}
    stats = coco_stats(dataset.coco, boxes, "bbox", dataset.ids, backend, per_image_out)
    if masks:
        stats.update(coco_stats(dataset.coco, segms, "segm", dataset.ids, backend,
                                per_image_out))
    if keypoints:
        stats.update(coco_stats(dataset.coco, kps, "keypoints", dataset.ids, backend,
                                per_image_out))
    stats["eval_time"] = time.time() - t0
    stats["detections"] = len(boxes)
    return stats
