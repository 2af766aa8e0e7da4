"""COCO evaluation of a torchvision detector: inference, then pycocotools' COCOeval.

Rows carry all 12 COCO stats per task, in percent as detectron2 reports them:
`bbox/AP`, `bbox/AP50`, ..., `segm/ARl`.
"""

import contextlib
import io
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from bench.engines.torchvision.model import use_input_sizes

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@torch.no_grad()
def predict(model, dataset, device, batch_size=8, indices=None):
    """COCO-format results for `dataset` images: (bbox results, segm results)."""
    was_training = model.training
    model.eval()
    use_input_sizes(model, train=False)
    boxes_out, segms_out = [], []
    indices = list(range(len(dataset))) if indices is None else list(indices)
    for start in range(0, len(indices), batch_size):
        items = [dataset.get(i) for i in indices[start:start + batch_size]]
        images = [img.to(device, torch.float32) / 255 for img, _ in items]
        outputs = model(images)
        for (_, target), out in zip(items, outputs):
            image_id = target["image_id"]
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
    model.train(was_training)
    use_input_sizes(model, train=was_training)
    return boxes_out, segms_out


def coco_stats(coco_gt, results, iou_type, image_ids=None) -> dict:
    """The 12 COCOeval stats (percent) for `results`; all zero when there is no detection."""
    if not results:
        return {f"{iou_type}/{n}": 0.0 for n in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a size range has no ground truth; keep it as NaN, not 0.
    return {f"{iou_type}/{n}": (float(v) * 100 if v >= 0 else float("nan"))
            for n, v in zip(STAT_NAMES, ev.stats)}


def evaluate(model, dataset, device, masks=True) -> dict:
    t0 = time.time()
    boxes, segms = predict(model, dataset, device)
    stats = coco_stats(dataset.coco, boxes, "bbox", dataset.ids)
    if masks:
        stats.update(coco_stats(dataset.coco, segms, "segm", dataset.ids))
    stats["eval_time"] = time.time() - t0
    stats["detections"] = len(boxes)
    return stats
