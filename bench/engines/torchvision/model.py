"""Mask R-CNN / Faster R-CNN / Keypoint R-CNN from torchvision's detection parts, configured
by a ModelSpec.

The paper's detector: ResNet-FPN backbone, norm (GN/SyncBN/...) in backbone, FPN and heads,
box head 4conv+1fc, mask head 4conv, scratch init MSRA. torchvision provides every part;
this file only wires them to the spec.
"""

import math
import types
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d, boxes as box_ops, roi_align
from torchvision.ops.poolers import LevelMapper, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from bench.backbones import build_backbone
from bench.norms import init_mask_logits_, msra_init_, norm_layer, xavier_init_
from bench.spec import pixel_normalization


def _freeze_batchnorms(module: nn.Module):
    """Replace every BatchNorm (and SyncBatchNorm) under `module` by FrozenBatchNorm2d: a
    frozen stage must not normalize with batch statistics or update its running ones."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            if child.affine:
                frozen.weight.copy_(child.weight.detach())
                frozen.bias.copy_(child.bias.detach())
            if child.track_running_stats:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorms(child)


def freeze_stages(body: nn.Module, stage_names, freeze_at: int):
    """Freeze the stem (freeze_at >= 1) and the first freeze_at - 1 stages, as detectron2:
    no gradients, and BN layers there become FrozenBatchNorm2d (GN has no statistics)."""
    if freeze_at > len(stage_names) + 1:  # would silently freeze the whole backbone
        raise ValueError(f"model.freeze_at={freeze_at}: this backbone has a stem and "
                         f"{len(stage_names)} stages; allowed 0..{len(stage_names) + 1} (0 "
                         f"nothing, 1 the stem, k the stem and the first k-1 stages)")
    if freeze_at <= 0:
        return
    frozen = [name for name, _ in body.named_children() if name not in stage_names]
    frozen += list(stage_names[:freeze_at - 1])
    for name in frozen:
        module = getattr(body, name)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):  # e.g. the stem's bn1
            holder = nn.Module()
            holder.m = module
            _freeze_batchnorms(holder)
            setattr(body, name, holder.m)
            module = holder.m
        else:
            _freeze_batchnorms(module)
        for p in module.parameters():
            p.requires_grad_(False)


class RoIPooler(MultiScaleRoIAlign):
    """Multi-level RoIAlign as detectron2's ROIPooler: each RoI is pooled from the FPN level
    its size selects (a 224-pixel box from P4, as torchvision's LevelMapper), with the
    half-pixel alignment of ROIAlignV2 and adaptive sampling (ratio 0) by default.
    torchvision's MultiScaleRoIAlign does the same but always unaligned (its RoI heads accept
    only that class, hence the subclass; only forward is ours)."""

    def __init__(self, featmap_names, output_size: int, sampling_ratio: int, aligned: bool):
        super().__init__(list(featmap_names), output_size, sampling_ratio)
        self.output_size = (output_size, output_size)
        self.aligned = aligned

    def forward(self, x, boxes, image_shapes):
        feats = [x[k] for k in self.featmap_names]
        height = max(s[0] for s in image_shapes)
        scales = [2.0 ** round(math.log2(f.shape[-2] / height)) for f in feats]
        levels = LevelMapper(round(-math.log2(scales[0])), round(-math.log2(scales[-1])))(boxes)
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1)
                          for i, b in enumerate(boxes)])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, scales)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                                     sampling_ratio=self.sampling_ratio,
                                     aligned=self.aligned).to(out.dtype)
        return out


class Anchors(AnchorGenerator):
    """detectron2's anchors (DefaultAnchorGenerator, offset 0): for each size and then each
    height/width ratio r, a box of area size² with corners at exactly ±w/2, ±h/2, centred on
    every stride-th pixel of its level, stride 2^level, in fp32.

    torchvision's own generator differs in three ways, each of which changes the positive
    anchors, RPN targets and proposals of the same image: it rounds the corners to whole
    pixels (an 8-pixel anchor at r = 0.5 is 12 x 6, not 11.3 x 5.7); it takes a level's stride
    as padded image size // grid size, so P6 of an image whose padded side / 32 is odd (COCO's
    800 x 1344: a 13-row P6) gets a stride of 61, not 64; and it casts the anchors to the
    features' dtype (bf16 or fp16 under AMP without GN: 8-pixel steps past 1,024)."""

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32,
                         device=torch.device("cpu")):
        boxes = []
        for size in scales:  # detectron2's arithmetic (Python floats) and order
            for ratio in aspect_ratios:
                w = math.sqrt(size ** 2.0 / ratio)
                h = ratio * w
                boxes.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(boxes, dtype=dtype, device=device)

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        padded = image_list.tensors.shape[-2:]
        device = feature_maps[0].device
        # each level's stride is the power of two nearest padded size / grid size (the
        # RoI pooler's scales are found the same way)
        strides = [[torch.tensor(2 ** round(math.log2(size / cells)), dtype=torch.int64,
                                 device=device) for size, cells in zip(padded, grid)]
                   for grid in grid_sizes]
        self.set_cell_anchors(torch.float32, device)
        per_level = self.grid_anchors(grid_sizes, strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class BoxPredictor(nn.Module):
    """detectron2's FastRCNNOutputLayers: K+1 class scores, box deltas for the K foreground
    classes only, initialized N(0, 0.01) and N(0, 0.001) with zero bias.

    torchvision's FastRCNNPredictor also regresses a box for the background class (4 x 1024
    more weights than the paper's model, and PyTorch's default Linear init). Its RoI heads
    index deltas by class id, background included, so a zero background column is put in
    front: it is never trained (only foreground RoIs have a box loss) and never used
    (inference drops the background column).
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        x = x.flatten(start_dim=1)
        deltas = self.bbox_pred(x)
        return self.cls_score(x), torch.cat([deltas.new_zeros(len(deltas), 4), deltas], dim=1)


class MaskPredictor(nn.Module):
    """detectron2's mask predictor: 2x2 deconvolution (MSRA fill) and a 1x1 conv to K
    class-specific masks (init_mask_logits_). torchvision's predictor has a background mask
    too; its RoI heads pick each RoI's mask by class id (never 0), so a zero channel stands in."""

    def __init__(self, in_channels: int, num_classes: int, logits_init: str = "normal"):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, in_channels, 2, 2)
        self.mask_fcn_logits = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        init_mask_logits_(self.mask_fcn_logits, logits_init)

    def forward(self, x):
        logits = self.mask_fcn_logits(torch.relu(self.conv5_mask(x)))
        return torch.cat([logits.new_zeros(len(logits), 1, *logits.shape[2:]), logits], dim=1)


def box_regression_loss(pred, target, beta: float):
    """Summed smooth-L1 with transition `beta`; beta 0 is plain L1, detectron2's default for
    the RPN and the box head (torchvision fixes beta at 1/9 for both)."""
    if beta == 0:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class RPN(RegionProposalNetwork):
    """torchvision's RPN with the box loss's beta from the ModelSpec, and detectron2's
    normalization of both losses: by the anchors the batch may sample (batch per image x
    images), not by those it did sample, which are fewer when an image has too few negative
    anchors (torchvision divides by those)."""

    box_loss_beta = 1 / 9

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        pos = torch.where(torch.cat(pos, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg, dim=0))[0]])
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_loss = box_regression_loss(pred_bbox_deltas[pos], regression_targets[pos],
                                       self.box_loss_beta) / normalizer
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels[sampled], reduction="sum") / normalizer
        return objectness_loss, box_loss


class Fp32BoxCoder(BoxCoder):
    """Box deltas decoded in fp32, as detectron2's Box2BoxTransform does: under AMP the
    heads' deltas are bf16 or fp16, and torchvision's coder decodes in their dtype."""

    def decode_single(self, rel_codes, boxes):
        return super().decode_single(rel_codes.float(), boxes.float())


def _fastrcnn_loss(beta):
    def loss(class_logits, box_regression, labels, regression_targets):
        """torchvision's fastrcnn_loss (cross-entropy, box loss over the sampled RoIs) with
        the box loss's beta as a parameter."""
        labels, regression_targets = torch.cat(labels, 0), torch.cat(regression_targets, 0)
        pos = torch.where(labels > 0)[0]
        box_regression = box_regression.reshape(len(class_logits), -1, 4)
        box_loss = box_regression_loss(box_regression[pos, labels[pos]], regression_targets[pos],
                                       beta) / labels.numel()
        return F.cross_entropy(class_logits, labels), box_loss
    return loss


class GtMasks(NamedTuple):
    """An image's ground-truth masks as the mask loss reads them: the image-sized bitmasks
    and, per instance, its polygons (None for an RLE mask; `polygons` None: bitmasks only)."""
    bitmasks: torch.Tensor
    polygons: Optional[list] = None


def polygon_mask_in_box(polygons, box, size: int) -> torch.Tensor:
    """One instance's polygons rasterized inside `box` on a size x size grid, as detectron2's
    PolygonMasks.crop_and_resize and Detectron's polys_to_mask_wrt_box: the coordinates are
    moved to the box's corner and scaled by size / box side, then pycocotools rasterizes them.
    A box side below 0.1 pixel counts as 0.1 (detectron2; Detectron: 1 pixel)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = size / max(x1 - x0, 0.1), size / max(y1 - y0, 0.1)
    scaled = [np.stack([(p[0::2] - x0) * sx, (p[1::2] - y0) * sy], 1).ravel().tolist()
              for p in polygons]
    rle = mask_utils.merge(mask_utils.frPyObjects(scaled, size, size))
    return torch.from_numpy(mask_utils.decode(rle))


def detectron2_mask_targets(gt_masks, boxes, matched_idxs, size):
    """Each RoI's binary mask target, as detectron2 makes it. An instance with polygons
    (ModelSpec.mask_target "polygon", COCO's annotations) has them rasterized inside the RoI
    (polygon_mask_in_box, detectron2's MASK_FORMAT polygon); any other is read from its
    image-sized mask by the half-pixel-aligned RoIAlign and thresholded at 0.5 (detectron2's
    BitMasks.crop_and_resize). torchvision's project_masks_on_boxes reads it with the
    unaligned RoIAlign and keeps the soft values."""
    polygons = None
    if isinstance(gt_masks, GtMasks):
        gt_masks, polygons = gt_masks
    if polygons is None or all(p is None for p in polygons):  # RLE only: no host round trip
        return _bitmask_targets(gt_masks, boxes, matched_idxs, size)
    out = torch.zeros((len(boxes), size, size))
    from_polygons = torch.zeros(len(boxes), dtype=torch.bool)
    for k, (i, box) in enumerate(zip(matched_idxs.tolist(), boxes.detach().cpu().tolist())):
        if polygons[i] is not None:
            out[k] = polygon_mask_in_box(polygons[i], box, size)
            from_polygons[k] = True
    out = out.to(boxes)  # one copy to the device
    rest = torch.where(~from_polygons)[0].to(boxes.device)
    if len(rest):
        out[rest] = _bitmask_targets(gt_masks, boxes[rest], matched_idxs[rest], size)
    return out


def _bitmask_targets(gt_masks, boxes, matched_idxs, size):
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(rois), rois, (size, size), 1.0, sampling_ratio=0,
                      aligned=True)[:, 0]
    return (crops >= 0.5).to(rois.dtype)


def _with_names(fn, **names):
    """`fn` running with some of the module-level names it calls bound to others."""
    return types.FunctionType(fn.__code__, dict(vars(tv_roi_heads), **names), fn.__name__,
                              fn.__defaults__)


class Detectron2LossRoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's losses: the box loss takes the ModelSpec's
    beta, and the mask loss (torchvision's, per-pixel BCE over the positive RoIs) reads
    detectron2's mask targets.

    RoIHeads.forward calls the module functions `fastrcnn_loss` and `maskrcnn_loss` by name,
    and maskrcnn_loss calls `project_masks_on_boxes`; this runs torchvision's own code with
    those names bound to ours, rather than copying the forward (tests/test_model.py checks
    the losses are ours)."""

    def set_losses(self, box_loss_beta: float):
        mask_loss = _with_names(tv_roi_heads.maskrcnn_loss,
                                project_masks_on_boxes=detectron2_mask_targets)
        self._forward = _with_names(RoIHeads.forward, fastrcnn_loss=_fastrcnn_loss(box_loss_beta),
                                    maskrcnn_loss=mask_loss)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training and targets is not None and self.has_mask():
            # the mask loss reads t["masks"]: hand it the polygons too (GtMasks)
            targets = [{**t, "masks": GtMasks(t["masks"], t.get("polygons"))} if "masks" in t
                       else t for t in targets]
        return self._forward(self, features, proposals, image_shapes, targets)


def use_detectron2_losses(model, box_loss_beta: float, rpn_box_loss_beta: float = None):
    """Swap the detector's RPN, RoI heads and box coders for the subclasses above (same
    parameters). The RPN's beta is the box head's unless given."""
    model.rpn.__class__ = RPN
    model.rpn.box_loss_beta = box_loss_beta if rpn_box_loss_beta is None else rpn_box_loss_beta
    model.rpn.box_coder.__class__ = Fp32BoxCoder
    model.roi_heads.box_coder.__class__ = Fp32BoxCoder
    model.roi_heads.__class__ = Detectron2LossRoIHeads
    model.roi_heads.set_losses(box_loss_beta)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient scaled by `scale` on the way back."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class CascadeBoxPredictor(BoxPredictor):
    """A cascade stage's predictor, detectron2's FastRCNNOutputLayers with CLS_AGNOSTIC_BBOX_REG:
    K+1 class scores and one box (4 deltas) per RoI whatever its class, same inits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x):
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(Detectron2LossRoIHeads):
    """Cascade R-CNN's RoI heads (Cai & Vasconcelos, CVPR 2018) as detectron2's
    CascadeROIHeads computes them, on torchvision's RoIHeads (its stage-0 sampling, pooler,
    mask and keypoint functions).

    Stage k has its own box head and a class-agnostic predictor; its RoIs are the boxes stage
    k-1 predicted (detached, clipped to the image; in training empty ones are dropped), each
    labelled foreground when its IoU with a ground-truth box reaches the stage's threshold
    (0.5, 0.6, 0.7), with no re-sampling: stage 0 samples 512 RoIs per image as the plain
    heads do, the later stages take all of them. Box targets are encoded with the stage's
    weights ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)), so the finer stages see
    finer deltas. Each stage's losses are detectron2's box-head losses (loss_classifier_stageK,
    loss_box_reg_stageK) times its weight (model.cascade_loss_weights; detectron2 has none,
    i.e. all 1), and the pooled features enter every stage with their gradient scaled by
    1 / stages (detectron2's _ScaleGradient), so the backbone gets the stages' mean.
    Inference: the class scores are averaged over the stages (each on its own RoIs), the
    boxes are the last stage's. The mask (and keypoint) head trains on stage 0's sampled
    foreground RoIs and predicts on the final detections, as in detectron2."""

    def set_cascade(self, heads, predictors, ious, reg_weights, loss_weights):
        self.box_head = nn.ModuleList(heads)
        self.box_predictor = nn.ModuleList(predictors)
        self.stage_coders = [Fp32BoxCoder(tuple(w)) for w in reg_weights]
        self.box_coder = self.stage_coders[0]  # stage 0's targets (select_training_samples)
        self.stage_ious = tuple(ious)
        self.stage_loss_weights = tuple(loss_weights)

    def set_losses(self, box_loss_beta: float):
        super().set_losses(box_loss_beta)
        self.box_loss_beta = box_loss_beta
        self._mask_loss = _with_names(tv_roi_heads.maskrcnn_loss,
                                      project_masks_on_boxes=detectron2_mask_targets)

    def _run_stage(self, features, boxes, image_shapes, k):
        x = self.box_roi_pool(features, boxes, image_shapes)
        if self.training:
            x = _ScaleGradient.apply(x, 1.0 / len(self.box_head))
        return self.box_predictor[k](self.box_head[k](x))

    def _next_boxes(self, deltas, boxes, image_shapes, k):
        """Stage k's predicted boxes, as stage k+1's RoIs."""
        pred = self.stage_coders[k].decode_single(deltas.detach(), torch.cat(boxes))
        out = []
        for b, shape in zip(pred.split([len(b) for b in boxes]), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            if self.training:  # detectron2's Boxes.nonempty: both sides above 0
                b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
            out.append(b)
        return out

    def _label(self, boxes, targets, k):
        """Each RoI's class (0: background) and matched ground-truth box at stage k's IoU."""
        matcher = det_utils.Matcher(self.stage_ious[k], self.stage_ious[k],
                                    allow_low_quality_matches=False)
        labels, gt_boxes = [], []
        for b, t in zip(boxes, targets):
            if len(t["boxes"]) == 0 or len(b) == 0:  # (torchvision's Matcher refuses no RoIs)
                labels.append(torch.zeros(len(b), dtype=torch.int64, device=b.device))
                gt_boxes.append(torch.zeros_like(b))
                continue
            idx = matcher(box_ops.box_iou(t["boxes"], b))
            labels.append(torch.where(idx >= 0, t["labels"][idx.clamp(min=0)], 0))
            gt_boxes.append(t["boxes"][idx.clamp(min=0)])
        return labels, gt_boxes

    def _stage_loss(self, class_logits, deltas, labels, targets_enc):
        labels, targets_enc = torch.cat(labels), torch.cat(targets_enc)
        pos = torch.where(labels > 0)[0]
        box_loss = box_regression_loss(deltas[pos], targets_enc[pos],
                                       self.box_loss_beta) / max(labels.numel(), 1)
        return F.cross_entropy(class_logits, labels), box_loss

    def forward(self, features, proposals, image_shapes, targets=None):
        stages, losses, result, sampled = len(self.box_head), {}, [], None
        if self.training:
            if self.has_mask():
                targets = [{**t, "masks": GtMasks(t["masks"], t.get("polygons"))}
                           if "masks" in t else t for t in targets]
            boxes, matched_idxs, labels, enc = self.select_training_samples(proposals, targets)
            sampled = (boxes, matched_idxs, labels)
            for k in range(stages):
                if k > 0:
                    labels, gt = self._label(boxes, targets, k)
                    enc = self.stage_coders[k].encode(gt, boxes)
                class_logits, deltas = self._run_stage(features, boxes, image_shapes, k)
                cls, box = self._stage_loss(class_logits, deltas, labels, enc)
                w = self.stage_loss_weights[k]
                losses[f"loss_classifier_stage{k}"] = w * cls
                losses[f"loss_box_reg_stage{k}"] = w * box
                if k + 1 < stages:
                    boxes = self._next_boxes(deltas, boxes, image_shapes, k)
        else:
            boxes, probs = proposals, 0
            for k in range(stages):
                if k > 0:
                    boxes = self._next_boxes(deltas, boxes, image_shapes, k - 1)
                class_logits, deltas = self._run_stage(features, boxes, image_shapes, k)
                probs = probs + F.softmax(class_logits, -1)
            final = self.stage_coders[-1].decode_single(deltas, torch.cat(boxes))
            result = self._detections(final, probs / stages, [len(b) for b in boxes],
                                      image_shapes)
        losses.update(self._mask_and_keypoints(features, image_shapes, targets, result, sampled))
        return result, losses

    def _detections(self, boxes, scores, per_image, image_shapes):
        """torchvision's postprocess_detections for one class-agnostic box per RoI: every
        class above the score threshold keeps the RoI's box, NMS per class, top-k."""
        out = []
        for b, s, shape in zip(boxes.split(per_image), scores.split(per_image), image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            s = s[:, 1:]  # background is column 0
            roi, cls = torch.where(s > self.score_thresh)
            b, s, labels = b[roi], s[roi, cls], cls + 1
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, s, labels = b[keep], s[keep], labels[keep]
            keep = box_ops.batched_nms(b, s, labels, self.nms_thresh)[:self.detections_per_img]
            out.append({"boxes": b[keep], "labels": labels[keep], "scores": s[keep]})
        return out

    def _mask_and_keypoints(self, features, image_shapes, targets, result, sampled):
        """The mask and keypoint branches of torchvision's RoIHeads.forward: in training on
        stage 0's sampled foreground RoIs, in inference on the detections."""
        losses = {}
        if self.training:
            boxes, matched_idxs, labels = sampled
            pos = [torch.where(l > 0)[0] for l in labels]
            rois = [b[p] for b, p in zip(boxes, pos)]
            pos_matched = [m[p] for m, p in zip(matched_idxs, pos)]
        else:
            rois = [r["boxes"] for r in result]
        if self.has_mask():
            x = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois,
                                                                      image_shapes)))
            if self.training:
                losses["loss_mask"] = self._mask_loss(
                    x, rois, [t["masks"] for t in targets], [t["labels"] for t in targets],
                    pos_matched)
            else:
                for probs, r in zip(tv_roi_heads.maskrcnn_inference(
                        x, [r["labels"] for r in result]), result):
                    r["masks"] = probs
        if self.has_keypoint():
            x = self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(
                features, rois, image_shapes)))
            if self.training:
                losses["loss_keypoint"] = tv_roi_heads.keypointrcnn_loss(
                    x, rois, [t["keypoints"] for t in targets], pos_matched)
            else:
                points, scores = tv_roi_heads.keypointrcnn_inference(x, rois)
                for p, s, r in zip(points, scores, result):
                    r["keypoints"], r["keypoints_scores"] = p, s
        return losses


def make_cascade(model, m, num_classes: int, box_head):
    """Give `model` (whose RoI heads use detectron2's losses) Cascade R-CNN's heads: one
    box head like `box_head()` builds and one class-agnostic predictor per stage of the
    ModelSpec `m`."""
    heads = model.roi_heads
    heads.__class__ = CascadeRoIHeads
    stages = len(m.cascade_ious)
    heads.set_cascade([box_head() for _ in range(stages)],
                      [CascadeBoxPredictor(m.box_head_fc_dim, num_classes) for _ in range(stages)],
                      m.cascade_ious, m.cascade_bbox_reg_weights, m.cascade_loss_weights)
    heads.set_losses(m.box_loss_beta)


class LastStage(nn.Module):
    """The detector's features without an FPN: the backbone's last stage alone (Faster
    R-CNN's conv5 for VGG), as torchvision's detectors take them (`body`, `out_channels`,
    an OrderedDict of maps)."""

    def __init__(self, backbone):
        super().__init__()
        self.body = IntermediateLayerGetter(backbone.body, {backbone.stage_names[-1]: "0"})
        self.out_channels = backbone.stage_channels[-1]

    def forward(self, x):
        return self.body(x)


def build_detector(m, num_classes: int, data) -> nn.Module:
    """`m` is a ModelSpec, `data` a DataSpec (input sizes); num_classes excludes background."""
    backbone = build_backbone(m)
    norm = norm_layer(m.head_norm, m.norm_groups)  # FPN and heads
    freeze_stages(backbone.body, backbone.stage_names, m.freeze_at)
    if m.fpn:
        features = BackboneWithFPN(
            backbone.body,
            return_layers=OrderedDict((n, str(i)) for i, n in enumerate(backbone.stage_names)),
            in_channels_list=backbone.stage_channels,
            out_channels=m.fpn_channels,
            extra_blocks=LastLevelMaxPool(),  # P6 for the RPN, as detectron2's FPN
            norm_layer=norm)
        xavier_init_(features.fpn)  # detectron2's FPN: c2_xavier_fill (torchvision's too)
        levels = ["0", "1", "2", "3"]
        # one anchor size per level, P2..P6
        anchors = Anchors(tuple((s,) for s in m.anchor_sizes),
                          ((0.5, 1.0, 2.0),) * len(m.anchor_sizes))
    else:
        features = LastStage(backbone)
        levels = ["0"]
        anchors = Anchors((tuple(m.anchor_sizes),), ((0.5, 1.0, 2.0),))  # all on one map
    def make_box_head():
        head = FastRCNNConvFCHead((features.out_channels, 7, 7),
                                  [m.box_head_conv_dim] * m.box_head_convs,
                                  [m.box_head_fc_dim] * m.box_head_fcs, norm_layer=norm)
        msra_init_(head)  # detectron2's FastRCNNConvFCHead: MSRA convs, Xavier fc
        for fc in (x for x in head.modules() if isinstance(x, nn.Linear)):
            xavier_init_(fc)
        return head

    # (a cascade replaces this stage by its own heads; built anyway, so the RNG draws of
    # every other part stay those of the plain model)
    box_head = make_box_head()
    mean, std = pixel_normalization(m)
    common = dict(
        min_size=data.train_min_size, max_size=data.train_max_size,
        image_mean=mean, image_std=std,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_train, rpn_post_nms_top_n_train=m.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_test, rpn_post_nms_top_n_test=m.rpn_post_nms_test,
        rpn_batch_size_per_image=m.rpn_batch_per_image,
        box_roi_pool=RoIPooler(levels, 7, m.roi_sampling_ratio, m.roi_align_aligned),
        box_head=box_head,
        box_predictor=BoxPredictor(m.box_head_fc_dim, num_classes),
        box_batch_size_per_image=m.roi_batch_per_image,
        box_detections_per_img=m.detections_per_image,
        box_score_thresh=m.score_thresh,
    )
    if m.arch == "faster_rcnn":
        model = FasterRCNN(features, **common)
    elif m.arch == "keypoint_rcnn":
        model = KeypointRCNN(
            features, keypoint_roi_pool=RoIPooler(levels, m.keypoint_pooler_resolution,
                                                  m.roi_sampling_ratio,
                                                  m.roi_align_aligned),
            keypoint_head=KeypointRCNNHeads(features.out_channels,
                                            [m.keypoint_head_dim] * m.keypoint_head_convs),
            keypoint_predictor=KeypointRCNNPredictor(m.keypoint_head_dim, m.num_keypoints),
            **common)
    else:
        mask_head = MaskRCNNHeads(features.out_channels, [m.mask_head_dim] * m.mask_head_convs, 1,
                                  norm_layer=norm)
        msra_init_(mask_head)
        mask_predictor = MaskPredictor(m.mask_head_dim, num_classes, m.mask_logits_init)
        mask_pool = RoIPooler(levels, 14, m.roi_sampling_ratio, m.roi_align_aligned)
        model = MaskRCNN(features, mask_roi_pool=mask_pool, mask_head=mask_head,
                         mask_predictor=mask_predictor, **common)
    use_detectron2_losses(model, m.box_loss_beta, m.rpn_box_loss_beta)
    if m.roi_heads == "cascade":
        make_cascade(model, m, num_classes, make_box_head)
    model.transform = BatchedPasteTransform(data.train_min_size, data.train_max_size, mean, std)
    model.input_sizes = {True: (data.train_min_size, data.train_max_size),
                         False: (data.test_min_size, data.test_max_size)}
    return model


def paste_masks(masks, boxes, height, width, chunk_pixels=2 ** 26):
    """Paste (N, 1, M, M) mask probabilities into (N, 1, height, width) images at `boxes`.

    torchvision pastes one detection at a time with a Python loop, which made 80% of a
    mini-study evaluation on a GPU (6,000 detections, ~3 ms each). Here every detection of a
    chunk is one grid_sample: each image pixel centre is mapped into its box's mask and read
    bilinearly, zero outside the box. Chunks bound the memory (COCO: 100 x 800 x 1333).
    """
    n = masks.shape[0]
    out = masks.new_zeros((n, 1, height, width))
    if n == 0:
        return out
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype) + 0.5
    step = max(1, chunk_pixels // (height * width))
    for a in range(0, n, step):
        b = boxes[a:a + step].to(masks.dtype)
        x0, y0, x1, y1 = b.unbind(1)
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-3)[:, None] * 2 - 1
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-3)[:, None] * 2 - 1
        k = len(b)
        grid = torch.stack([gx[:, None, :].expand(k, height, width),
                            gy[:, :, None].expand(k, height, width)], dim=3)
        out[a:a + step] = F.grid_sample(masks[a:a + step], grid, mode="bilinear",
                                        padding_mode="zeros", align_corners=False)
    return out


class BatchedPasteTransform(GeneralizedRCNNTransform):
    """torchvision's transform, with the test-time mask pasting batched (paste_masks) and
    the targets' polygons (if any) resized with their image."""

    def resize(self, image, target=None):
        h, w = image.shape[-2:]
        image, target = super().resize(image, target)
        if target is not None and target.get("polygons") is not None:
            sx, sy = image.shape[-1] / w, image.shape[-2] / h  # torchvision's box ratios
            scale = np.array([sx, sy])
            target["polygons"] = [None if polys is None else
                                  [(p.reshape(-1, 2) * scale).ravel() for p in polys]
                                  for polys in target["polygons"]]
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        masks = [r.pop("masks", None) for r in result]
        result = super().postprocess(result, image_shapes, original_image_sizes)
        for r, m, (h, w) in zip(result, masks, original_image_sizes):
            if m is not None:
                r["masks"] = paste_masks(m, r["boxes"], h, w)
        return result


def use_input_sizes(model, train: bool):
    """torchvision's transform holds one size; set the train or the test size on it."""
    min_size, max_size = model.input_sizes[train]
    # a tuple: torchvision draws one size per image in training, with the torch RNG
    # (checkpointed, so resume stays exact); in eval it uses the last one
    model.transform.min_size = tuple(min_size) if isinstance(min_size, tuple) else (min_size,)
    model.transform.max_size = max_size


def load_backbone_weights(model: nn.Module, state: dict, log=print) -> dict:
    """Load a classification checkpoint into the detector's backbone body, and its `box_head.*`
    tensors (VGG's fc6 and fc7, bench.backbones.from_torchvision_vgg) into the box head.

    Returns the key report; raises if any backbone parameter is left at its init, or if the
    box head's tensors do not fit it.
    """
    body = model.backbone.body
    own = body.state_dict()
    matched, shape_mismatch = {}, []
    for k, v in state.items():
        if k in own:
            if own[k].shape == v.shape:
                matched[k] = v
            else:
                shape_mismatch.append(k)
    # BatchNorm's batch counter is bookkeeping, not a weight (FrozenBN has none)
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    head = {k[len("box_head."):]: v for k, v in state.items() if k.startswith("box_head.")}
    unused = [k for k in state if k not in own and not k.startswith("box_head.")]
    body.load_state_dict({**own, **matched})
    log(f"pretrained backbone: {len(matched)} keys matched, {len(unused)} unused in checkpoint "
        f"(e.g. classifier), {len(shape_mismatch)} shape-mismatched, {len(missing)} missing"
        + (f"; {len(head)} box head keys (fc6, fc7)" if head else ""))
    if missing or shape_mismatch:
        raise ValueError("pretrained checkpoint does not cover the backbone: missing "
                         f"{missing[:5]}, shape-mismatched {shape_mismatch[:5]}; it was built for "
                         "another backbone depth/width/norm")
    box_heads = model.roi_heads.box_head
    # a cascade has one box head per stage: each starts from the checkpoint's fc6 and fc7
    for box_head in (box_heads if isinstance(box_heads, nn.ModuleList) else [box_heads]) \
            if head else []:
        mine = box_head.state_dict()
        wrong = [k for k, v in head.items() if k not in mine or mine[k].shape != v.shape]
        if wrong:
            raise ValueError(f"pretrained checkpoint's box head tensors {wrong[:4]} do not fit "
                             f"this box head (model.box_head_convs 0, box_head_fcs 2, "
                             f"box_head_fc_dim as the checkpoint's fc6 and fc7)")
        box_head.load_state_dict({**mine, **head})
    return dict(matched=len(matched), unused=unused, missing=missing, shape_mismatch=shape_mismatch,
                box_head=len(head))
