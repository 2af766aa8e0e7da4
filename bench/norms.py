"""The normalization switch of the paper: GN, SyncBN, FrozenBN, BN, or none.

One factory, `norm_layer(name, groups)`, gives a callable `channels -> nn.Module` that the
backbone, FPN and heads all take, so "GN in the backbone, FPN and heads" is one recipe key.
"""

from torch import nn
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("GN", "SyncBN", "FrozenBN", "BN", "none")


class _GroupNorm(nn.GroupNorm):
    """GroupNorm taking only the channel count, like the BatchNorm classes do."""

    def __init__(self, channels, groups=32):
        # The paper uses 32 groups; tiny widths (the mini study) need fewer.
        super().__init__(min(groups, channels), channels)


def norm_layer(name: str, groups: int = 32):
    if name == "GN":
        return lambda c: _GroupNorm(c, groups)
    if name == "BN":
        return nn.BatchNorm2d
    if name == "SyncBN":
        # torch's SyncBatchNorm synchronizes only under an initialized process group on
        # CUDA; outside one (a single CPU process) it behaves as BatchNorm2d.
        return nn.SyncBatchNorm
    if name == "FrozenBN":
        return FrozenBatchNorm2d
    if name == "none":
        return None
    raise ValueError(f"unknown norm {name!r}; allowed: {', '.join(NORMS)}")


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d,
                               nn.LayerNorm))


def frozen_norms(model: nn.Module):
    """Names of normalization layers whose statistics or affine parameters do not train."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, FrozenBatchNorm2d):
            out.append(name)
        elif is_norm(m) and any(not p.requires_grad for p in m.parameters(recurse=False)):
            out.append(name)
    return out


def msra_init_(model: nn.Module):
    """Scratch init as in detectron2: He (MSRA) fill for convs, norm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model
