"""Our ResNet checkpoints (torchvision's layout) under detectron2's ResNet names, and a whole
detectron2 detector's weights in the torchvision engine's model.

Every ImageNet initialization the suite reads (`bench pretrain` checkpoints, torchvision's
weights, Detectron's Caffe2 `.pkl`) comes out of bench.imagenet in torchvision's layout
with an RGB first conv; this renames it for detectron2's `backbone.bottom_up` and turns
the first conv to BGR, the order detectron2 feeds (INPUT.FORMAT BGR).
Pure tensors: tested without detectron2.
"""

import re

import torch

_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.(.+)$")
_NORM = re.compile(r"^bn(\d)\.(.+)$")
_SHORTCUT = re.compile(r"^downsample\.([01])\.(.+)$")


def _rename(key: str):
    """detectron2's name for one of our backbone keys, or None for what it has no place for
    (the classifier, BN's batch counters)."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key.startswith("conv1."):
        return "stem." + key
    if key.startswith("bn1."):
        return "stem.conv1.norm." + key[len("bn1."):]
    m = _BLOCK.match(key)
    if not m:
        raise KeyError(key)
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    if (n := _NORM.match(rest)):
        rest = f"conv{n.group(1)}.norm.{n.group(2)}"
    elif (s := _SHORTCUT.match(rest)):
        rest = ("shortcut." if s.group(1) == "0" else "shortcut.norm.") + s.group(2)
    return f"res{stage}.{block}.{rest}"


def to_detectron2(state: dict, source: str = "checkpoint") -> dict:
    """{detectron2 bottom_up key: tensor}; raises ValueError naming `source` on a key that is
    not part of a ResNet."""
    out = {}
    for key, value in state.items():
        try:
            name = _rename(key)
        except KeyError:
            raise ValueError(f"pretrained {source}: {key!r} is not a ResNet weight; the "
                             f"detectron2 engine loads ResNet backbones only") from None
        if name is None:
            continue
        if name == "stem.conv1.weight":
            value = value.flip(1)  # RGB -> BGR input channels
        out[name] = value
    return out


_D2_BACKBONE = re.compile(r"^backbone\.bottom_up\.(.+)$")
_D2_FPN = re.compile(r"^backbone\.fpn_(lateral|output)(\d)\.(norm\.)?(\w+)$")
# (a cascade's box heads and predictors have their stage's index first: box_head.2.conv1)
_D2_HEAD_CONV = re.compile(
    r"^roi_heads\.(box|mask)_head\.((?:\d+\.)?)(?:conv|mask_fcn)(\d+)\.(norm\.)?(\w+)$")
_D2_BOX_FC = re.compile(r"^roi_heads\.box_head\.((?:\d+\.)?)fc(\d+)\.(\w+)$")
_CLS_SCORE = re.compile(r"^roi_heads\.box_predictor\.(?:\d+\.)?cls_score\.")
_D2_RENAMED = {"proposal_generator.rpn_head.conv.": "rpn.head.conv.0.0.",
               "proposal_generator.rpn_head.objectness_logits.": "rpn.head.cls_logits.",
               "proposal_generator.rpn_head.anchor_deltas.": "rpn.head.bbox_pred.",
               "roi_heads.box_predictor.": "roi_heads.box_predictor.",
               "roi_heads.mask_head.deconv.": "roi_heads.mask_predictor.conv5_mask.",
               "roi_heads.mask_head.predictor.": "roi_heads.mask_predictor.mask_fcn_logits."}


def _our_backbone_names(d2_backbone_keys):
    """{detectron2 bottom_up key: our backbone.body key}, by inverting `_rename`."""
    out = {}
    for key in d2_backbone_keys:
        rest = key[len("backbone.bottom_up."):]
        if rest.startswith("stem.conv1.norm."):
            ours = "bn1." + rest[len("stem.conv1.norm."):]
        elif rest.startswith("stem."):
            ours = rest[len("stem."):]
        else:
            stage, block, tail = rest.split(".", 2)
            tail = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", tail)
            tail = re.sub(r"^shortcut\.norm\.", "downsample.1.", tail)
            tail = re.sub(r"^shortcut\.", "downsample.0.", tail)
            ours = f"layer{int(stage[3:]) - 1}.{block}.{tail}"
        # _rename has no place for BN's batch counters; everything else must round-trip
        assert ours.endswith("num_batches_tracked") or _rename(ours) == rest, (key, ours)
        out[key] = "backbone.body." + ours
    return out


def torchvision_names(keys) -> dict:
    """{detectron2 key: the torchvision engine's key} for the parameters and buffers of a
    detectron2 R-FPN Mask / Faster R-CNN, with standard or cascade RoI heads (bench.engines.torchvision.model.build_detector
    builds the same tensors under these names)."""
    keys = list(keys)
    backbone = _our_backbone_names([k for k in keys if _D2_BACKBONE.match(k)])
    box_convs = max((int(m.group(3)) for k in keys if (m := _D2_HEAD_CONV.match(k))
                     and m.group(1) == "box"), default=0)
    out = {}
    for key in keys:
        if key in backbone:
            name = backbone[key]
        elif (m := _D2_FPN.match(key)):
            blocks = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
            name = (f"backbone.fpn.{blocks}.{int(m.group(2)) - 2}."
                    f"{'1' if m.group(3) else '0'}.{m.group(4)}")
        elif (m := _D2_HEAD_CONV.match(key)):
            name = (f"roi_heads.{m.group(1)}_head.{m.group(2)}{int(m.group(3)) - 1}."
                    f"{'1' if m.group(4) else '0'}.{m.group(5)}")
        elif (m := _D2_BOX_FC.match(key)):
            if m.group(2) != "1":
                raise ValueError(f"{key}: the torchvision engine's box head has one fc layer")
            # torchvision's FastRCNNConvFCHead: the convs, a Flatten, then the fc
            name = f"roi_heads.box_head.{m.group(1)}{box_convs + 1}.{m.group(3)}"
        else:
            prefix = next((p for p in _D2_RENAMED if key.startswith(p)), None)
            if prefix is None:
                raise ValueError(f"{key}: not a weight of detectron2's R-FPN Mask / Faster R-CNN")
            name = _D2_RENAMED[prefix] + key[len(prefix):]
        out[key] = name
    return out


def detector_from_detectron2(state: dict) -> dict:
    """A detectron2 R-FPN Mask / Faster R-CNN state dict (or its gradients) in the torchvision
    engine's layout: renamed (torchvision_names), the first conv turned from BGR to RGB, and
    the background score moved from detectron2's last row to torchvision's first. With it the
    same weights run through both engines, which is how their losses, gradients and
    evaluations are compared (tests/test_detectron2_engine.py)."""
    out = {}
    for key, name in torchvision_names(state).items():
        value = state[key]
        if name == "backbone.body.conv1.weight":
            value = value.flip(1)  # BGR -> RGB input channels
        elif _CLS_SCORE.match(name):
            value = torch.cat([value[-1:], value[:-1]])  # background: last -> first
        out[name] = value
    return out
