"""Backbone registry: adding a backbone is one registered builder plus one recipe file.

A builder takes the run's ModelSpec and returns a `Backbone`: the feature body (whose
named children produce the C2..C5 maps) and their channel counts. The detection engines
put the FPN on top; `bench pretrain` puts a classifier on top. Weight names follow
torchvision's ResNet (conv1, bn1, layer1..layer4), so its ImageNet checkpoints, ResNeXts
included (`resnet` with model.groups > 1), load as is.
A builder initializes its body for training from scratch with the MSRA fill (`msra_init_`);
`build_backbone` redraws it when the spec's `model.conv_init` asks for another.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from bench.norms import backbone_init_, norm_layer

BACKBONES: Dict[str, Callable] = {}


@dataclass
class Backbone:
    body: nn.Module
    stage_names: List[str]     # children of `body` that output C2..C5, in order
    stage_channels: List[int]  # their channel counts


def register_backbone(name: str):
    """Decorator: `@register_backbone("my_net")` makes `backbone: my_net` valid in recipes."""
    def wrap(fn):
        # A plugin must not silently replace a backbone (e.g. the built-in `resnet` that
        # other studies of the same command use); the same builder registered twice is fine.
        known = BACKBONES.get(name)
        if known is not None and (known.__module__, known.__qualname__) != \
                (fn.__module__, fn.__qualname__):
            raise ValueError(f"backbone {name!r} is already registered by {known.__module__}; "
                             f"register the new one under another name")
        BACKBONES[name] = fn
        return fn
    return wrap


def build_backbone(model_spec) -> Backbone:
    try:
        builder = BACKBONES[model_spec.backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {model_spec.backbone!r}; registered: "
                         f"{', '.join(sorted(BACKBONES))}") from None
    if model_spec.conv5_stride != 16 and model_spec.backbone != "vgg":
        raise ValueError(f"model.conv5_stride={model_spec.conv5_stride} is VGG's (backbone vgg); "
                         f"backbone {model_spec.backbone!r} keeps its own strides: drop the key")
    backbone = builder(model_spec)
    if model_spec.conv_init != "msra":
        # here, not in each builder, so that no builder (a plugin's) can drop the field;
        # builders keep the suite's default MSRA init themselves, which this leaves as drawn
        backbone_init_(backbone.body, model_spec.conv_init)
    return backbone


# depth -> (block, blocks per stage); 10 is the mini study's one-block-per-stage ResNet.
RESNET_DEPTHS = {10: (BasicBlock, [1, 1, 1, 1]), 18: (BasicBlock, [2, 2, 2, 2]),
                 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
                 101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}


class ResNet(nn.Module):
    """torchvision's ResNet layout with a configurable stem width (torchvision fixes 64).

    Written here only because torchvision's class hard-codes the widths; its blocks are reused.
    Bottlenecks stride in the 3x3 conv (detectron2's STRIDE_IN_1X1=False, as in the GN
    configs) or, with `stride_in_1x1`, in the first 1x1 as MSRA's Caffe2 ResNets do.
    With `groups` > 1 the bottlenecks are ResNeXt's: the 3x3 conv of stage i has
    groups x width_per_group x 2^i channels in `groups` groups (detectron2's NUM_GROUPS x
    WIDTH_PER_GROUP, whatever the stem width), the stage still outputs 4 x width x 2^i.
    """

    def __init__(self, depth=50, width=64, norm=None, stride_in_1x1=False, groups=1,
                 width_per_group=64):
        super().__init__()
        self.stride_in_1x1 = stride_in_1x1
        self.groups, self.width_per_group = groups, width_per_group
        block, layers = RESNET_DEPTHS[depth]
        norm = norm or nn.BatchNorm2d
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, blocks in enumerate(layers):
            setattr(self, f"layer{i + 1}",
                    self._make_layer(block, width * 2 ** i, blocks, 1 if i == 0 else 2, norm,
                                     width_per_group * 2 ** i))
        self.out_channels = [width * 2 ** i * block.expansion for i in range(4)]

    def _make_layer(self, block, planes, blocks, stride, norm, group_width):
        grouped = {}
        if self.groups > 1:
            # torchvision sizes the 3x3 conv as int(planes * base_width / 64) * groups, i.e.
            # relative to its fixed 64-wide stem; this base_width gives `group_width` channels
            # per group at any stem width (the half keeps float rounding from truncating one
            # channel short, e.g. at width 48)
            grouped = dict(groups=self.groups, base_width=64 * (group_width + 0.5) / planes)
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                norm(planes * block.expansion))
        out = [block(self.inplanes, planes, stride, downsample, norm_layer=norm, **grouped)]
        if self.stride_in_1x1 and block is Bottleneck and stride != 1:
            out[0].conv1.stride, out[0].conv2.stride = (stride, stride), (1, 1)
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes, norm_layer=norm, **grouped)
                for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_backbone("resnet")
def resnet(model_spec) -> Backbone:
    """ResNet, or ResNeXt with `model.groups` > 1 (one builder, as detectron2 has one)."""
    m = model_spec
    if m.depth not in RESNET_DEPTHS:
        raise ValueError(f"model.depth={m.depth} is not a ResNet depth; allowed: "
                         f"{', '.join(map(str, RESNET_DEPTHS))}")
    if m.stride_in_1x1 and m.depth < 50:
        raise ValueError(f"model.stride_in_1x1 needs bottleneck blocks (depth >= 50), not "
                         f"depth {m.depth}")
    if m.groups < 1 or m.width_per_group < 1:
        raise ValueError(f"model.groups {m.groups} and model.width_per_group "
                         f"{m.width_per_group} must be positive")
    if m.groups > 1 and m.depth < 50:
        raise ValueError(f"model.groups={m.groups} needs bottleneck blocks (ResNeXt: depth 50, "
                         f"101 or 152), not depth {m.depth}'s basic blocks")
    if m.groups == 1 and m.width_per_group != 64:
        # a plain ResNet's bottleneck is model.width wide; the field would be silently ignored
        raise ValueError(f"model.width_per_group={m.width_per_group} sizes grouped (ResNeXt) "
                         f"bottlenecks only; set model.groups > 1 (e.g. 32 with "
                         f"width_per_group 8 for X-101-32x8d), or drop width_per_group")
    net = ResNet(m.depth, m.width, norm_layer(m.norm, m.norm_groups), m.stride_in_1x1,
                 m.groups, m.width_per_group)
    backbone_init_(net)  # MSRA; build_backbone applies another model.conv_init
    return Backbone(net, ["layer1", "layer2", "layer3", "layer4"], net.out_channels)


def resnet_name(depth: int, groups: int = 1, width_per_group: int = 64, width: int = 64) -> str:
    """How papers and model zoos name the network: ResNet-101, ResNeXt-152 32x8d."""
    name = (f"ResNeXt-{depth} {groups}x{width_per_group}d" if groups > 1 else
            f"ResNet-{depth}")
    return name + (f" (stem {width} wide)" if width != 64 else "")


def resnet_layout(state: dict) -> dict:
    """What a ResNet state dict in torchvision's names was built as, read from its tensor
    shapes: {"width", "blocks", "depth", "bottleneck", "groups", "width_per_group",
    "bottleneck_width"}; keys that cannot be read (a stage missing) are left out, so that
    the loader's key report names what is missing instead."""
    out = {}
    if "conv1.weight" in state:
        out["width"] = state["conv1.weight"].shape[0]
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.")
               and k.split(".")[1].isdigit()}
        blocks.append(len(ids))
    if all(blocks):
        out["blocks"] = blocks
        out["depth"] = next((d for d, (_, b) in RESNET_DEPTHS.items() if b == blocks
                             and (d >= 50) == ("layer1.0.conv3.weight" in state)), None)
    conv2 = state.get("layer1.0.conv2.weight")
    if "layer1.0.conv3.weight" in state and conv2 is not None:
        # a grouped 3x3 conv's weight is (out, in / groups, 3, 3), and in == out here
        out["bottleneck"] = True
        out["bottleneck_width"] = conv2.shape[0]
        out["groups"] = conv2.shape[0] // conv2.shape[1]
        out["width_per_group"] = conv2.shape[1] if out["groups"] > 1 else 64
    elif "layer1.0.conv1.weight" in state:
        out["bottleneck"] = False
        out["groups"], out["width_per_group"] = 1, 64
    return out


# depth -> 3x3 convs in each of the five blocks (torchvision's VGG configurations A, B, D, E)
VGG_DEPTHS = {11: [1, 1, 2, 2, 2], 13: [2, 2, 2, 2, 2], 16: [2, 2, 3, 3, 3],
              19: [2, 2, 4, 4, 4]}


class VGG(nn.Module):
    """VGG's convolutional body as Faster R-CNN uses it: five blocks of 3x3 convs, each
    followed by its norm (none in the paper's VGG-16 study) and a ReLU, and a 2x2 max-pool
    after each of the first four blocks only, so conv5 comes out at stride 16, the feature
    map of the original Faster R-CNN and of Detectron's VGG16 body (`conv5_stride` 8: no pool
    after conv4, for a miniature's small images; the same weights). Block widths double from
    `width` up to 8x (torchvision's 64 .. 512).

    Written here because torchvision's VGG is one flat `features` Sequential, whose blocks
    cannot be returned or frozen by name; `torchvision_names` maps its keys onto ours."""

    def __init__(self, depth=16, width=64, norm=None, conv5_stride=16):
        super().__init__()
        cin, self.out_channels = 3, []
        for b, convs in enumerate(VGG_DEPTHS[depth]):
            cout = width * 2 ** min(b, 3)
            layers = []
            for _ in range(convs):
                layers.append(nn.Conv2d(cin, cout, 3, padding=1))  # with a bias, as torchvision
                layers += [norm(cout)] if norm is not None else []
                layers.append(nn.ReLU(inplace=True))
                cin = cout
            if b < 3 or (b == 3 and conv5_stride == 16):  # no pool4: conv5 at stride 8
                layers.append(nn.MaxPool2d(2, 2))
            setattr(self, f"conv{b + 1}", nn.Sequential(*layers))
            self.out_channels.append(cout)

    @staticmethod
    def torchvision_names(depth: int, with_norm: bool) -> Dict[str, str]:
        """{torchvision's key prefix: ours} for every conv and norm of the body: torchvision's
        `features` runs conv, [norm,] ReLU per conv and a pool per block, all in one index."""
        names, tv = {}, 0
        for b, convs in enumerate(VGG_DEPTHS[depth]):
            j = 0
            for _ in range(convs):
                names[f"features.{tv}"] = f"conv{b + 1}.{j}"
                if with_norm:
                    names[f"features.{tv + 1}"] = f"conv{b + 1}.{j + 1}"
                step = 3 if with_norm else 2
                tv, j = tv + step, j + step
            tv += 1  # the block's pool (torchvision pools after conv5 too; we do not)
        return names

    def forward(self, x):
        for b in range(1, 6):
            x = getattr(self, f"conv{b}")(x)
        return x


@register_backbone("vgg")
def vgg(model_spec) -> Backbone:
    if model_spec.depth not in VGG_DEPTHS:
        raise ValueError(f"model.depth={model_spec.depth} is not a VGG depth; allowed: "
                         f"{', '.join(map(str, VGG_DEPTHS))}")
    if model_spec.fpn:
        raise ValueError(f"model.backbone vgg has no stride-32 stage for an FPN (conv5 is at "
                         f"stride {model_spec.conv5_stride}: Faster R-CNN's single map); set "
                         f"model.fpn: false")
    if model_spec.groups != 1 or model_spec.width_per_group != 64:
        raise ValueError("model.groups / width_per_group are ResNeXt's (backbone resnet); VGG "
                         "has plain convs: leave them at 1 / 64")
    if model_spec.conv5_stride not in (8, 16):
        raise ValueError(f"model.conv5_stride={model_spec.conv5_stride}: VGG's conv5 is at stride "
                         f"16 (Faster R-CNN) or 8 (no pool after conv4)")
    net = VGG(model_spec.depth, model_spec.width, norm_layer(model_spec.norm,
                                                             model_spec.norm_groups),
              model_spec.conv5_stride)
    backbone_init_(net)  # MSRA, as the paper's VGG-16 from scratch; biases 0
    # conv1 is the stem (model.freeze_at 1 freezes it, 2 conv1 and conv2, as Detectron's VGG16)
    return Backbone(net, ["conv2", "conv3", "conv4", "conv5"], net.out_channels[1:])


def from_torchvision_vgg(state: dict, model_spec) -> Dict[str, object]:
    """A torchvision VGG state dict (`features.N.*`, `classifier.N.*`) in the `vgg` backbone's
    names; its first two classifier layers (fc6, fc7) become the box head's two fc layers
    (`box_head.1.*`, `box_head.3.*`), which Faster R-CNN initializes from them."""
    # (the layout follows the checkpoint: vgg16_bn's indices count its BN layers)
    with_bn = any(k.endswith("running_mean") for k in state)
    names = VGG.torchvision_names(model_spec.depth, with_bn)
    names.update({"classifier.0": "box_head.1", "classifier.3": "box_head.3"})
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in names:
            out[f"{names[prefix]}.{leaf}"] = value
    return out
