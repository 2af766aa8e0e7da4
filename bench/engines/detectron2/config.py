"""A RunSpec as a detectron2 config: pure data, so it is tested without detectron2.

`translate(spec)` returns the nested dict of detectron2 config keys (detectron2's own names,
its BGR pixel order) that differ from or matter beyond detectron2's defaults; the engine
merges it into `get_cfg()`. Every RunSpec field either maps to a key here or is listed in
NOT_EXPRESSED with the reason, so a translation never silently drops a setting.
"""

from typing import Optional

# RunSpec fields detectron2's config cannot express, and how the engine handles them.
NOT_EXPRESSED = {
    "solver.micro_batch": "detectron2 runs IMS_PER_BATCH / world images per GPU in one pass; "
                          "the engine refuses a spec with more than one pass per GPU",
    "solver.amp": "AMPTrainer (fp16, or bf16 by its precision argument), not a config key",
    "eval.backend": "detectron2's COCOEvaluator uses its own fast COCOeval",
    "checkpoint.keep": "the engine saves through bench.checkpoint (atomic, last K), not "
                       "detectron2's PeriodicCheckpointer, which keeps every checkpoint",
    "model.conv_init": "detectron2's ResNets are MSRA-filled; \"xavier\" is redrawn by the "
                       "engine on the model detectron2 built",
    "model.mask_logits_init": "detectron2's is N(0, 0.001); \"msra\" is redrawn by the engine",
    "model.pixel_mean/std order": "ours are RGB; detectron2 reads BGR (INPUT.FORMAT BGR), so "
                                  "both are reversed here",
}

NORMS = {"GN": "GN", "SyncBN": "SyncBN", "FrozenBN": "FrozenBN", "BN": "BN", "none": ""}


class Untranslatable(ValueError):
    """A spec detectron2 cannot train as written (one line: the field and why)."""


def translate(spec, num_classes: int = 80, train_dataset: str = "", test_dataset: str = "",
              weights: str = "", output_dir: Optional[str] = None) -> dict:
    m, d, s = spec.model, spec.data, spec.solver
    if m.backbone == "vgg":
        raise Untranslatable("model.backbone 'vgg': detectron2 has no VGG backbone (nor the "
                             "single-level Faster R-CNN on conv5); use engine: torchvision")
    if m.backbone != "resnet":
        raise Untranslatable(f"model.backbone {m.backbone!r}: the detectron2 engine builds "
                             f"detectron2's ResNet-FPN only; use engine: torchvision")
    if m.conv5_stride != 16:
        raise Untranslatable(f"model.conv5_stride {m.conv5_stride}: a VGG setting (detectron2's "
                             f"ResNet keeps its strides); drop the key")
    if not m.fpn:
        raise Untranslatable("model.fpn false: the detectron2 engine builds ResNet-FPN only "
                             "(its C4 models put res5 in the RoI head, not on the feature "
                             "map); use engine: torchvision")
    if m.depth not in (18, 34, 50, 101, 152):
        raise Untranslatable(f"model.depth {m.depth}: detectron2's ResNets are 18, 34, 50, 101, "
                             f"152; use engine: torchvision")
    if m.depth < 50 and m.width != 64:
        raise Untranslatable(f"model.width {m.width} at depth {m.depth}: detectron2's R18/R34 "
                             f"are 64 wide (RES2_OUT_CHANNELS 64); use width 64 or "
                             f"engine: torchvision")
    if m.groups > 1 and m.depth < 50:
        raise Untranslatable(f"model.groups {m.groups} at depth {m.depth}: detectron2's R18/R34 "
                             f"have basic blocks, which are not grouped; use depth 50, 101 "
                             f"or 152")
    if not 0 <= m.freeze_at <= 5:
        raise Untranslatable(f"model.freeze_at {m.freeze_at}: detectron2's ResNet has a stem and "
                             f"4 stages; allowed 0..5")
    if m.norm == "GN" and m.norm_groups != 32:
        raise Untranslatable(f"model.norm_groups {m.norm_groups}: detectron2's GN has 32 groups; "
                             f"use norm_groups 32 or engine: torchvision")
    if m.roi_heads == "cascade" and len(m.cascade_ious) > 8:  # (train.LOSS_KEYS logs 8)
        raise Untranslatable(f"model.cascade_ious: {len(m.cascade_ious)} stages; the detectron2 "
                             f"engine logs at most 8; use engine: torchvision")
    if m.roi_heads == "cascade" and any(w != 1 for w in m.cascade_loss_weights):
        raise Untranslatable(f"model.cascade_loss_weights {list(m.cascade_loss_weights)}: "
                             f"detectron2's CascadeROIHeads weighs every stage 1; use [1, 1, 1] "
                             f"or engine: torchvision")
    per_gpu = s.batch // spec.gpus
    if s.micro_batch and s.micro_batch != per_gpu:
        raise Untranslatable(f"solver.micro_batch={s.micro_batch} with {per_gpu} images per "
                             f"GPU: detectron2 runs one pass per GPU; set "
                             f"gpus={s.batch // s.micro_batch} or micro_batch 0")
    norm, head_norm = NORMS[m.norm], NORMS[m.head_norm]
    pooler = "ROIAlignV2" if m.roi_align_aligned else "ROIAlign"
    sizes = d.train_min_size if isinstance(d.train_min_size, tuple) else (d.train_min_size,)
    cfg = {
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "MASK_ON": m.arch == "mask_rcnn",
            "KEYPOINT_ON": m.arch == "keypoint_rcnn",
            "WEIGHTS": weights if spec.init == "imagenet" else "",
            "PIXEL_MEAN": list(reversed(m.pixel_mean)),
            "PIXEL_STD": list(reversed(m.pixel_std)),
            "BACKBONE": {"NAME": "build_resnet_fpn_backbone", "FREEZE_AT": m.freeze_at},
            # detectron2's res2 bottleneck is NUM_GROUPS x WIDTH_PER_GROUP wide: ours is
            # `width` for a ResNet, groups x width_per_group for a ResNeXt
            "RESNETS": {"DEPTH": m.depth, "NORM": norm, "STRIDE_IN_1X1": m.stride_in_1x1,
                        "STEM_OUT_CHANNELS": m.width, "NUM_GROUPS": m.groups,
                        "WIDTH_PER_GROUP": m.width if m.groups == 1 else m.width_per_group,
                        "RES2_OUT_CHANNELS": 4 * m.width if m.depth >= 50 else m.width,
                        "OUT_FEATURES": ["res2", "res3", "res4", "res5"]},
            "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "NORM": head_norm,
                    "OUT_CHANNELS": m.fpn_channels},
            "ANCHOR_GENERATOR": {"SIZES": [[a] for a in m.anchor_sizes],
                                 "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
            "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
                    "PRE_NMS_TOPK_TRAIN": m.rpn_pre_nms_train,
                    "POST_NMS_TOPK_TRAIN": m.rpn_post_nms_train,
                    "PRE_NMS_TOPK_TEST": m.rpn_pre_nms_test,
                    "POST_NMS_TOPK_TEST": m.rpn_post_nms_test,
                    "BATCH_SIZE_PER_IMAGE": m.rpn_batch_per_image,
                    "SMOOTH_L1_BETA": m.box_loss_beta if m.rpn_box_loss_beta is None
                    else m.rpn_box_loss_beta},
            "ROI_HEADS": {"NAME": "CascadeROIHeads" if m.roi_heads == "cascade"
                          else "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"],
                          "NUM_CLASSES": num_classes,
                          "BATCH_SIZE_PER_IMAGE": m.roi_batch_per_image,
                          "SCORE_THRESH_TEST": m.score_thresh},
            "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_CONV": m.box_head_convs,
                             "CONV_DIM": m.box_head_conv_dim, "NUM_FC": m.box_head_fcs,
                             "FC_DIM": m.box_head_fc_dim, "NORM": head_norm,
                             "POOLER_RESOLUTION": 7, "POOLER_TYPE": pooler,
                             "POOLER_SAMPLING_RATIO": m.roi_sampling_ratio,
                             "SMOOTH_L1_BETA": m.box_loss_beta,
                             "CLS_AGNOSTIC_BBOX_REG": m.roi_heads == "cascade"},
            "ROI_BOX_CASCADE_HEAD": {"IOUS": list(m.cascade_ious),
                                     "BBOX_REG_WEIGHTS": [list(w) for w in
                                                          m.cascade_bbox_reg_weights]},
            "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead",
                              "NUM_CONV": m.mask_head_convs, "CONV_DIM": m.mask_head_dim,
                              "NORM": head_norm, "POOLER_RESOLUTION": 14, "POOLER_TYPE": pooler,
                              "POOLER_SAMPLING_RATIO": m.roi_sampling_ratio},
            # detectron2's keypoint head is the same: 8 convs of 512, deconvolution, 2x
            # upsampling, loss normalized by the visible keypoints, no norm (it has none)
            "ROI_KEYPOINT_HEAD": {"NAME": "KRCNNConvDeconvUpsampleHead",
                                  "NUM_KEYPOINTS": m.num_keypoints,
                                  "CONV_DIMS": [m.keypoint_head_dim] * m.keypoint_head_convs,
                                  "POOLER_RESOLUTION": m.keypoint_pooler_resolution,
                                  "POOLER_TYPE": pooler,
                                  "POOLER_SAMPLING_RATIO": m.roi_sampling_ratio,
                                  "NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS": True,
                                  "LOSS_WEIGHT": 1.0, "MIN_KEYPOINTS_PER_IMAGE": 1},
        },
        "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TRAIN": list(sizes),
                  "MIN_SIZE_TRAIN_SAMPLING": "choice", "MAX_SIZE_TRAIN": d.train_max_size,
                  "MIN_SIZE_TEST": d.test_min_size, "MAX_SIZE_TEST": d.test_max_size,
                  "RANDOM_FLIP": "horizontal" if d.hflip else "none",
                  # COCO's masks are polygons; the embedded datasets store RLE bitmaps
                  "MASK_FORMAT": "polygon" if d.dataset == "coco" and m.mask_target == "polygon"
                  else "bitmask"},
        "DATASETS": {"TRAIN": [train_dataset] if train_dataset else [],
                     "TEST": [test_dataset] if test_dataset else []},
        "DATALOADER": {"ASPECT_RATIO_GROUPING": d.aspect_grouping,
                       "FILTER_EMPTY_ANNOTATIONS": True},
        "SOLVER": {"IMS_PER_BATCH": s.batch, "BASE_LR": s.lr, "STEPS": list(s.steps),
                   "MAX_ITER": s.max_iter, "GAMMA": s.gamma, "MOMENTUM": s.momentum,
                   "WEIGHT_DECAY": s.weight_decay, "WEIGHT_DECAY_NORM": s.weight_decay_norm,
                   "BIAS_LR_FACTOR": s.bias_lr_factor, "WEIGHT_DECAY_BIAS": s.weight_decay_bias,
                   "WARMUP_ITERS": s.warmup_iters, "WARMUP_FACTOR": s.warmup_factor,
                   "WARMUP_METHOD": "linear", "CHECKPOINT_PERIOD": spec.checkpoint.period,
                   "AMP": {"ENABLED": s.amp != "off"}},
        "TEST": {"EVAL_PERIOD": spec.eval.period,
                 "DETECTIONS_PER_IMAGE": m.detections_per_image,
                 "PRECISE_BN": {"ENABLED": False},
                 # test-time augmentation (GeneralizedRCNNWithTTA), run once after training
                 "AUG": {"ENABLED": spec.eval.tta, "MIN_SIZES": list(spec.eval.tta_min_sizes),
                         "MAX_SIZE": spec.eval.tta_max_size, "FLIP": spec.eval.tta_flip}},
        "SEED": spec.seed,
    }
    if output_dir is not None:
        cfg["OUTPUT_DIR"] = str(output_dir)
    return cfg


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{"MODEL.RESNETS.DEPTH": 50, ...}: the form detectron2's merge_from_list and the
    comparison with published configs use."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
