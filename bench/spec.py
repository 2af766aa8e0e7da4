"""RunSpec: one fully resolved run, the contract between recipes, runner and engines.

Every field exists because a recipe or the paper needs it. Defaults are the paper's COCO
baseline (detectron2's Base-RCNN-FPN with the GN/SyncBN settings of its Misc configs);
the mini recipes override the sizes that make a CPU run affordable. A RunSpec is frozen;
its hash (over the values that differ from these defaults, labels aside) is its identity:
same spec, same run dir. README "Model fidelity" lists each default with its source.
"""

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple, Union

Norm = Literal["GN", "SyncBN", "FrozenBN", "BN", "none"]


# Bump when a default value changes meaning (see RunSpec.identity); adding a field whose
# default keeps the old behaviour needs no bump.
# 2: box losses became L1 (model.box_loss_beta 0, was torchvision's 1/9)
# 3: the torchvision engine took detectron2's Xavier init for the FPN and the box-head fc,
#    its binary, aligned mask targets, and FrozenBN in the backbone only (no norm after it)
# 4: the torchvision engine's anchors are detectron2's (unrounded corners, strides of 2^level
#    whatever the padded size, fp32), its RPN losses are normalized by batch-per-image x
#    images, and box deltas are decoded in fp32 (bench/engines/torchvision/model.py)
#    The evaluation that batches only images of one size (bench/engines/torchvision/
#    evaluate.py) kept version 4: it changes no embedded-data result (every image there is
#    128 x 128, so the batches are the same), and no COCO run can carry a version-4 id
#    from before it (version 4 and this fix landed the same day, on a machine without GPU).
#    model.mask_target's default "polygon" kept version 4 for the same reasons: the embedded
#    data's masks are RLE, which takes the bitmask path as before, and no COCO run exists.
SPEC_VERSION = 4

# The only fields a pair may set per side: conventions of how a published config fine-tunes
# (detectron2's pre-trained GN/SyncBN configs freeze the stem and res2, its scratch ones do
# not) and the input conventions of the checkpoint the pre-trained side loads (Detectron's
# Caffe2 models expect pixel std 1; MSRA's stride in the 1x1). Everything else is shared by
# construction (recipes enforce it; the analysis pairs runs by the rest of spec.yaml).
PER_INIT_FIELDS = ("model.freeze_at", "model.pixel_mean", "model.pixel_std",
                   "model.stride_in_1x1")


def _non_default(obj) -> dict:
    """The fields of dataclass `obj` that differ from their defaults, recursively."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = _non_default(value)
            if sub:
                out[f.name] = sub
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if value != default:
            out[f.name] = value
    return out


class SpecError(ValueError):
    """A recipe or spec value is wrong; the message names the file, the key and the fix."""


def backbone_label(model: dict) -> str:
    """resnet50, vgg16, vgg16-c5s8 for a VGG without pool4 (conv5 at stride 8), or
    resnext152-32x8d for grouped bottlenecks, from a model section (ModelSpec's fields, or
    spec.yaml's: specs written before model.groups or model.conv5_stride existed have none,
    which means the default)."""
    if model["backbone"] == "resnet" and model.get("groups", 1) > 1:
        return f"resnext{model['depth']}-{model['groups']}x{model['width_per_group']}d"
    stride = model.get("conv5_stride", 16)
    return f"{model['backbone']}{model['depth']}" + (f"-c5s{stride}" if stride != 16 else "")


@dataclass(frozen=True)
class ModelSpec:
    arch: Literal["mask_rcnn", "faster_rcnn", "keypoint_rcnn"] = "mask_rcnn"
    backbone: str = "resnet"            # a name registered in bench.backbones
    depth: int = 50
    width: int = 64                     # stem width; stage widths double from it
    # ResNeXt: bottlenecks whose 3x3 conv has `groups` groups of width_per_group channels
    # in res2, doubling per stage (detectron2's RESNETS.NUM_GROUPS, WIDTH_PER_GROUP; the
    # paper's X152 is depth 152, groups 32, width_per_group 8). 1 group: a ResNet, whose
    # bottleneck is `width` wide (width_per_group then stays at detectron2's default 64).
    groups: int = 1
    width_per_group: int = 64
    norm: Norm = "GN"                   # in backbone, FPN and heads (the paper's switch);
                                        # FrozenBN: the backbone only (head_norm)
    norm_groups: int = 32               # GN groups (paper: 32)
    # Bottlenecks stride in their first 1x1 conv (MSRA's Caffe2 ResNets, detectron2's
    # STRIDE_IN_1X1 True) or in the 3x3 (torchvision, FAIR's GN ResNets, every scratch config)
    stride_in_1x1: bool = False
    # Input normalization, RGB order, 0-255 units: (image - mean) / std. The default is
    # ImageNet's, which is detectron2's scratch pixel std [57.375, 57.12, 58.395] in BGR.
    # Detectron's Caffe2 ImageNet checkpoints (R-50.pkl, R-50-GN.pkl) expect std [1, 1, 1].
    pixel_mean: Tuple[float, ...] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, ...] = (58.395, 57.12, 57.375)
    freeze_at: int = 0                  # 0: nothing frozen (required for scratch)
    # FPN on C2..C5 (the paper's R-FPN models), or false: the RPN and the RoI heads on the
    # last stage's map alone (its VGG-16 Faster R-CNN, on conv5), every anchor size there
    fpn: bool = True
    # VGG only: conv5's stride, 16 as in Faster R-CNN (a pool after each of conv1..conv4), or
    # 8 without the pool after conv4 (a miniature's small images: objects as many conv5
    # cells wide as COCO's at 800 px and stride 16)
    conv5_stride: int = 16
    fpn_channels: int = 256
    anchor_sizes: Tuple[int, ...] = (32, 64, 128, 256, 512)   # one per FPN level P2..P6
    rpn_pre_nms_train: int = 2000       # per FPN level (detectron2 PRE_NMS_TOPK_TRAIN)
    rpn_post_nms_train: int = 1000      # per image (detectron2 POST_NMS_TOPK_TRAIN)
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_per_image: int = 256
    box_head_convs: int = 4             # the paper's 4conv+1fc box head
    box_head_conv_dim: int = 256
    box_head_fc_dim: int = 1024
    box_head_fcs: int = 1               # fc layers after the convs (VGG-16's fc6, fc7: 2)
    roi_batch_per_image: int = 512
    # Box regression loss of the box head (and of the RPN unless rpn_box_loss_beta is set):
    # smooth L1 with this beta; 0 is L1, detectron2's default (SMOOTH_L1_BETA 0.0).
    # torchvision's own models use 1/9; Detectron (Caffe2) 1/9 in the RPN, 1.0 in the head.
    box_loss_beta: float = 0.0
    rpn_box_loss_beta: Optional[float] = None   # None: box_loss_beta
    # RoI heads: "standard" (one box head) or "cascade", Cascade R-CNN as detectron2's
    # CascadeROIHeads (bench/engines/torchvision/model.py): one box head and class-agnostic
    # predictor per stage, stage k's RoIs labelled at IoU cascade_ious[k] (the first is the
    # plain heads' 0.5), its box deltas encoded with cascade_bbox_reg_weights[k]
    # (detectron2's ROI_BOX_CASCADE_HEAD defaults), its losses times cascade_loss_weights[k]
    # (detectron2 weighs every stage 1; the Cascade R-CNN authors' Detectron code used
    # 1, 0.5, 0.25)
    roi_heads: Literal["standard", "cascade"] = "standard"
    cascade_ious: Tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_bbox_reg_weights: Tuple[Tuple[float, ...], ...] = (
        (10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
    cascade_loss_weights: Tuple[float, ...] = (1.0, 1.0, 1.0)
    mask_head_convs: int = 4
    mask_head_dim: int = 256
    # Keypoint R-CNN's head, detectron2's KRCNNConvDeconvUpsampleHead (= torchvision's
    # KeypointRCNNHeads + Predictor): 8 3x3 convs of 512 on RoIs of keypoint_pooler_resolution
    # (14x14, detectron2's ROI_KEYPOINT_HEAD.POOLER_RESOLUTION), no norm (neither Detectron nor
    # detectron2 has a GN keypoint head), a 4x4 stride-2 deconvolution and a 2x bilinear
    # upsampling to heatmaps 4x the RoI's side (56x56), one per keypoint
    num_keypoints: int = 17
    keypoint_head_convs: int = 8
    keypoint_head_dim: int = 512
    keypoint_pooler_resolution: int = 14
    # RoI pooling as detectron2's FPN configs (POOLER_TYPE ROIAlignV2, POOLER_SAMPLING_RATIO 0):
    # the half-pixel-aligned RoIAlign, adaptive sampling; 7x7 for boxes, 14x14 for masks
    roi_align_aligned: bool = True
    roi_sampling_ratio: int = 0
    # Initialization of what a run does not load. The backbone's convs (scratch arm): "msra"
    # (He fill, fan_out: detectron2's ResNets) or "xavier" (Caffe2's XavierFill, uniform
    # within sqrt(3 / fan_in): Detectron's GN ResNets, whose ConvGN passes no fill, so
    # brew's default applies). The mask head's 1x1 logits conv: "normal" (N(0, 0.001),
    # detectron2) or "msra" (Detectron's MRCNN.CONV_INIT MSRAFill, std sqrt(2 / fan_out)).
    conv_init: Literal["msra", "xavier"] = "msra"
    mask_logits_init: Literal["normal", "msra"] = "normal"
    # Mask targets of polygon annotations (COCO's): "polygon" rasterizes each RoI's polygons
    # inside its box at 28 x 28, as detectron2 (PolygonMasks.crop_and_resize) and Detectron
    # (polys_to_mask_wrt_box) do; "bitmask" reads the image-sized mask with RoIAlign
    # (detectron2's MASK_FORMAT bitmask). RLE annotations (the embedded data) always take the
    # bitmask path.
    mask_target: Literal["polygon", "bitmask"] = "polygon"
    detections_per_image: int = 100
    score_thresh: float = 0.05

    @property
    def backbone_name(self) -> str:
        """How run names, plans and speed rows show the backbone (backbone_label)."""
        return backbone_label(dataclasses.asdict(self))

    @property
    def detector_name(self) -> str:
        """mask_rcnn, or cascade_mask_rcnn with Cascade R-CNN's heads: how run names and
        plans show the detector (bench/analysis/table.py reads spec.yaml alike)."""
        return self.arch if self.roi_heads == "standard" else f"{self.roi_heads}_{self.arch}"

    @property
    def head_norm(self) -> str:
        """The norm of the FPN and the heads. FrozenBN, the classic fine-tuning baseline
        (detectron2's Base-RCNN-FPN), freezes the pre-trained backbone's statistics; the
        FPN and heads are new layers with nothing to freeze, so they get no norm and convs
        with a bias (a frozen BN there would be a fixed scale with no trainable bias)."""
        return "none" if self.norm == "FrozenBN" else self.norm


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "coco"               # "coco" or an embedded dataset (bench.data.registry)
    train_images: Optional[int] = None  # None: the whole training set; else a nested subset
    subset_seed: int = 0
    # Shorter side in training: one size (the paper: 800) or a list to draw from per image
    # (detectron2's Base-RCNN-FPN: 640..800). A list is hashed as a list, a single size as
    # before, so existing run ids do not change.
    train_min_size: Union[int, Tuple[int, ...]] = 800
    train_max_size: int = 1333
    test_min_size: int = 800
    test_max_size: int = 1333
    hflip: bool = True
    # Batch landscape and portrait images apart (detectron2's ASPECT_RATIO_GROUPING), so a
    # forward pass pads less; see bench.data.sampler.
    aspect_grouping: bool = False


@dataclass(frozen=True)
class SolverSpec:
    # Inputs (set in recipes)
    schedule: str = "1x"                # "1x".."9x", "0.5x", or "<N>iter" for an explicit length
    batch: int = 16                     # images per iteration, all GPUs together
    # Images per forward pass (detectron2's images per GPU); 0: all of a GPU's share of the
    # batch at once. A GPU with more than this accumulates gradients over several passes.
    # Each pass's losses are normalized over its own images (and SyncBN's statistics span
    # one pass on every GPU), so the paper's 8 GPUs x 2 images equals 1 GPU x 8 passes of 2.
    micro_batch: int = 0
    base_lr: float = 0.02               # at ref_batch; scaled linearly with batch
    ref_batch: int = 16
    unit_iters: int = 90_000            # length of 1x at ref_batch
    drops_from_end: Tuple[int, ...] = (60_000, 20_000)   # at ref_batch, see bench.schedule
    warmup_iters: int = 1000            # detectron2 default, kept when the batch changes
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0      # detectron2 default: no decay on norm parameters
    # Every parameter named `bias` (conv, fc and norm biases, GN's beta too) trains at
    # bias_lr_factor x the LR with weight_decay_bias (None: weight_decay, or
    # weight_decay_norm for a norm's bias), as detectron2's BIAS_LR_FACTOR /
    # WEIGHT_DECAY_BIAS; Detectron (Caffe2) used 2x and 0
    bias_lr_factor: float = 1.0
    weight_decay_bias: Optional[float] = None
    gamma: float = 0.1
    # Mixed precision on a GPU (torch.autocast): bf16, or fp16 with a gradient scaler.
    amp: Literal["off", "bf16", "fp16"] = "off"
    # Resolved by bench.schedule at expansion; a recipe may not set them.
    max_iter: int = 0
    steps: Tuple[int, ...] = ()
    lr: float = 0.0


@dataclass(frozen=True)
class EvalSpec:
    period: int = 0                     # iterations between evals; 0: only at the end
    # COCOeval implementation: pycocotools (the reference) or faster-coco-eval (same stats,
    # C++; an optional package)
    backend: Literal["pycocotools", "faster-coco-eval"] = "pycocotools"
    # detectron2's EVAL_PERIOD is in iterations too; evals at 0 are skipped.
    # Test-time augmentation, detectron2's TEST.AUG (GeneralizedRCNNWithTTA): after the last
    # plain evaluation the final model is evaluated once more, each image at every shorter
    # side in tta_min_sizes (the longer at most tta_max_size) and, with tta_flip, flipped
    # too; the boxes of all passes are merged by one NMS per class and each kept detection's
    # mask is the mean of its mask probabilities over the passes. Its stats go in an
    # "eval_tta" row, never in the "eval" rows the learning curves draw.
    tta: bool = False
    tta_min_sizes: Tuple[int, ...] = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
    tta_max_size: int = 4000
    tta_flip: bool = True


@dataclass(frozen=True)
class CheckpointSpec:
    period: int = 5000
    keep: int = 3                       # last K periodic checkpoints kept


@dataclass(frozen=True)
class RunSpec:
    study: str = ""                     # label: which study listed this run
    name: str = ""                      # label: human-readable, unique within the study
    engine: Literal["torchvision", "detectron2"] = "torchvision"
    init: Literal["scratch", "imagenet"] = "scratch"
    pretrained: Optional[str] = None    # checkpoint used when init == "imagenet"
    seed: int = 0
    gpus: int = 1                       # GPUs (or CPU slots) one run occupies
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    solver: SolverSpec = field(default_factory=SolverSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    plugins: Tuple[str, ...] = ()       # label: user code the run imports (bench/plugins.py)

    LABELS = ("study", "name", "plugins")

    def to_dict(self):
        return dataclasses.asdict(self)

    def identity(self) -> str:
        """Hash of everything that changes what is trained (not the labels).

        Only values that differ from their defaults are hashed, with SPEC_VERSION: a field
        added later with a default that keeps the old behaviour leaves every run id (and so
        every run dir) as it was; changing what a default means requires a new SPEC_VERSION.
        """
        d = _non_default(self)
        for k in self.LABELS:
            d.pop(k, None)
        blob = json.dumps({"spec_version": SPEC_VERSION, **d}, sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def run_id(self) -> str:
        return f"{self.name}-{self.identity()}"

    @classmethod
    def from_dict(cls, d, where="spec"):
        return from_dict(cls, d, where)


@dataclass(frozen=True)
class PretrainSpec:
    """Classification pre-training of a run's backbone on the embedded source set, our
    stand-in for ImageNet (`bench pretrain`). The backbone is the run's own model spec, so
    the checkpoint has the same depth, width and normalization as the runs that load it."""
    source: Literal["shapes-cls", "shapes-cls-tiny"] = "shapes-cls"
    epochs: int = 8
    batch: int = 128
    lr: float = 0.1                     # peak LR, cosine decay to 0 after a linear warm-up
    warmup_epochs: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 5e-5
    label_smoothing: float = 0.1
    seed: int = 0


# --------------------------------------------------------------------------- validation

def _describe(tp):
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, Tuple):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp, value, where):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is typing.Union:
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(arg, value, where)
                except SpecError:
                    pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise SpecError(f"{where}: {value!r} is not allowed; allowed: {_describe(tp)}")
    elif origin in (tuple, Tuple):
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(typing.get_args(tp)[0], v, f"{where}[{i}]")
                         for i, v in enumerate(value))
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise SpecError(f"{where}: {value!r} has the wrong type; expected {_describe(tp)}")


def from_dict(cls, d, where):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected a mapping of {cls.__name__} fields, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def replace(obj, **changes):
    """dataclasses.replace that also takes dotted keys: replace(spec, **{"model.norm": "BN"})."""
    nested = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    out = {}
    for head, value in nested.items():
        current = getattr(obj, head)
        out[head] = replace(current, **value) if isinstance(value, dict) and \
            dataclasses.is_dataclass(current) else value
    return dataclasses.replace(obj, **out)


def pixel_normalization(m):
    """ModelSpec's pixel mean and std (RGB, 0-255) as torchvision's transform takes them, for
    images scaled to [0, 1] (the detector's and the backbone pre-training's input)."""
    return tuple(v / 255 for v in m.pixel_mean), tuple(v / 255 for v in m.pixel_std)
