"""Test-time augmentation of a torchvision-engine detector, as detectron2's
GeneralizedRCNNWithTTA does it (the paper's "test aug" of Fig. 5 and Table 3).

One image is run at every shorter side of the recipe's list (the longer side capped), and
flipped too when asked. Each pass gives its detections after its own per-class NMS, mapped
back to the original image; all passes' boxes are then merged by one more per-class NMS
(IoU as the model's) keeping the model's number of detections per image. For a mask model
the merged boxes are taken back into every pass, the mask head predicts each box's mask
there (28 x 28, the box's own class), flipped passes' masks are flipped back, and the mean
over the passes is pasted into the image. Keypoints have no test-time augmentation (nor in
detectron2).
"""

import contextlib

import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from bench.engines.torchvision.model import paste_masks


@contextlib.contextmanager
def _boxes_only(model):
    """The RoI heads without their mask and keypoint branches (torchvision's RoIHeads skip a
    branch whose pooler is None)."""
    heads = model.roi_heads
    saved = heads.mask_roi_pool, heads.keypoint_roi_pool
    heads.mask_roi_pool = heads.keypoint_roi_pool = None
    try:
        yield
    finally:
        heads.mask_roi_pool, heads.keypoint_roi_pool = saved


def _flip_boxes(boxes, width):
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def _features(model, image, min_size, max_size):
    """The backbone's features of `image` resized as the transform does at this size, and
    the resized image's size."""
    model.transform.min_size, model.transform.max_size = (min_size,), max_size
    images, _ = model.transform([image])
    return images, model.backbone(images.tensors)


@torch.no_grad()
def detect(model, image, min_sizes, max_size, flip):
    """The augmented detections of one image (C x H x W, floats in [0, 1]) in the original
    image's pixels: {"boxes", "labels", "scores"[, "masks" (N, 1, H, W) probabilities]}."""
    height, width = image.shape[-2:]
    passes = [(s, f) for s in min_sizes for f in ((False, True) if flip else (False,))]
    heads = model.roi_heads
    boxes, scores, labels = [], [], []
    for size, flipped in passes:
        images, features = _features(model, image.flip(-1) if flipped else image, size,
                                     max_size)
        proposals, _ = model.rpn(images, features)
        with _boxes_only(model):
            out = heads(features, proposals, images.image_sizes)[0][0]
        b = resize_boxes(out["boxes"], images.image_sizes[0], (height, width))
        boxes.append(_flip_boxes(b, width) if flipped else b)
        scores.append(out["scores"])
        labels.append(out["labels"])
    boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
    boxes = box_ops.clip_boxes_to_image(boxes, (height, width))
    keep = box_ops.batched_nms(boxes, scores, labels, heads.nms_thresh)
    keep = keep[:heads.detections_per_img]
    result = {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}
    if heads.has_mask():
        result["masks"] = paste_masks(_mean_masks(model, image, result, passes, max_size),
                                      result["boxes"], height, width)
    return result


def _mean_masks(model, image, result, passes, max_size):
    """The merged detections' 28 x 28 mask probabilities (their own class), averaged over
    the passes; a flipped pass's masks are flipped back first."""
    heads = model.roi_heads
    height, width = image.shape[-2:]
    total = 0
    for size, flipped in passes:
        images, features = _features(model, image.flip(-1) if flipped else image, size,
                                     max_size)
        boxes = _flip_boxes(result["boxes"], width) if flipped else result["boxes"]
        boxes = resize_boxes(boxes, (height, width), images.image_sizes[0])
        x = heads.mask_roi_pool(features, [boxes], images.image_sizes)
        probs = tv_roi_heads.maskrcnn_inference(heads.mask_predictor(heads.mask_head(x)),
                                                [result["labels"]])[0]
        total = total + (probs.flip(-1) if flipped else probs)
    return total / len(passes)
