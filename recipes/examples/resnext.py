"""Worked example of adding a backbone: ResNeXt (Xie et al. 2017), 32 groups x 4 channels.

One registered builder is all the suite needs: it gets the run's ModelSpec and returns the
feature body (children named as torchvision's ResNeXt, so its ImageNet weights load by
name) and the channels of the four stages the FPN reads. The recipe next to this file
imports it with `plugins: [resnext.py]`.
"""

from collections import OrderedDict

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from bench.backbones import Backbone, register_backbone
from bench.norms import msra_init_, norm_layer

BLOCKS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
STAGES = ["layer1", "layer2", "layer3", "layer4"]


@register_backbone("resnext")
def resnext(m) -> Backbone:
    if m.depth not in BLOCKS:
        raise ValueError(f"model.depth={m.depth} is not a ResNeXt depth; allowed: 50, 101")
    # torchvision builds the blocks; the recipe's norm (GN, SyncBN, ...) goes in every one
    net = ResNet(Bottleneck, BLOCKS[m.depth], groups=32, width_per_group=4,
                 norm_layer=norm_layer(m.norm, m.norm_groups))
    msra_init_(net)  # the scratch init of every other backbone of the suite
    # keep the feature layers only (no pooling or classifier), under torchvision's names
    names = ["conv1", "bn1", "relu", "maxpool"] + STAGES
    body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return Backbone(body, STAGES, [256, 512, 1024, 2048])
