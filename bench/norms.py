"""The normalization switch of the paper: GN, SyncBN, FrozenBN, BN, or none.

One factory, `norm_layer(name, groups)`, gives a callable `channels -> nn.Module` that the
backbone, FPN and heads all take, so "GN in the backbone, FPN and heads" is one recipe key.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torchvision.ops import FrozenBatchNorm2d

NORMS = ("GN", "SyncBN", "FrozenBN", "BN", "none")


class _GroupNorm(nn.GroupNorm):
    """GroupNorm taking only the channel count, like the BatchNorm classes do."""

    def __init__(self, channels, groups=32):
        # The paper uses 32 groups; tiny widths (the mini study) need fewer.
        super().__init__(min(groups, channels), channels)


class SyncBatchNorm(nn.BatchNorm2d):
    """SyncBN on CPU processes (gloo), where torch's SyncBatchNorm cannot run.

    torch synchronizes statistics only for GPU tensors, and DDP refuses a model holding its
    SyncBatchNorm on a CPU, so without this the SyncBN runs could not be tested on a CPU.
    This path all-reduces per-channel (sum, sum of squares, count) with a differentiable
    all-reduce (gradients flow back across processes), which weights each process by the
    elements it holds: a process whose head sees zero RoIs contributes nothing, yet still
    joins the collective so that no process waits forever. On GPUs the trainer swaps these
    layers for torch's own (`use_torch_sync_bn`); the parameters and buffers are the same,
    so checkpoints are interchangeable. In one process it is BatchNorm2d.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        if x.is_cuda:
            raise RuntimeError("bench.norms.SyncBatchNorm is the CPU path; on GPUs the trainer "
                               "uses torch's SyncBatchNorm (norms.use_torch_sync_bn)")
        dims = [0] + list(range(2, x.dim()))
        count = x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float32)
        local = torch.cat([x.float().sum(dims), (x.float() ** 2).sum(dims), count])
        total = all_reduce(local, group=dist.group.WORLD)
        c = x.shape[1]
        n = total[-1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        if n.item() == 0:  # every process saw an empty batch: nothing to normalize or track
            # (still through weight and bias, so that DDP sees their zero gradients)
            return x * self.weight.view(shape) + self.bias.view(shape) if self.affine else x
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean ** 2).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else \
                    1.0 / self.num_batches_tracked.item()
                unbiased = var * n / (n - 1) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(m * mean.detach().to(self.running_mean))
                self.running_var.mul_(1 - m).add_(m * unbiased.detach().to(self.running_var))
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def use_torch_sync_bn(module: nn.Module) -> nn.Module:
    """Swap our SyncBatchNorm layers for torch's, whose CUDA kernels sync across GPUs (NCCL).

    Done before the optimizer is built and before DDP wraps the model. Only our layers:
    a plain BN layer a plugin backbone holds stays per-process."""
    for name, child in module.named_children():
        if isinstance(child, SyncBatchNorm):
            torch_bn = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum,
                                        child.affine, child.track_running_stats)
            torch_bn.load_state_dict(child.state_dict())
            setattr(module, name, torch_bn)
        else:
            use_torch_sync_bn(child)
    return module


def norm_layer(name: str, groups: int = 32):
    if name == "GN":
        return lambda c: _GroupNorm(c, groups)
    if name == "BN":
        return nn.BatchNorm2d
    if name == "SyncBN":
        # synchronizes under an initialized process group (a gloo all-reduce on CPUs; the
        # trainer swaps in torch's kernels on GPUs); in a single process it is BatchNorm2d
        return SyncBatchNorm
    if name == "FrozenBN":
        return FrozenBatchNorm2d
    if name == "none":
        return None
    raise ValueError(f"unknown norm {name!r}; allowed: {', '.join(NORMS)}")


def norm_family(name: str) -> str:
    """BN, SyncBN and FrozenBN hold the same tensors (scale, bias, running statistics), so a
    checkpoint of one loads into the others; GN's scale and bias mean something else."""
    return "BN" if name in ("BN", "SyncBN", "FrozenBN") else name


def trainable_norm(name: str) -> str:
    """The norm a backbone is pre-trained with: FrozenBN's statistics are frozen, so the
    classic fine-tuning baseline's backbone was trained with BN (as ImageNet's ResNets)."""
    return "BN" if name == "FrozenBN" else name


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


def xavier_init_(model: nn.Module):
    """detectron2's c2_xavier_fill (Caffe2's XavierFill) for convs and fc layers: uniform
    within sqrt(3 / fan_in), zero bias. Its FPN convs and box-head fc layers use it."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def backbone_init_(model: nn.Module, style: str = "msra"):
    """A backbone's scratch init (ModelSpec.conv_init): norm weight 1 and bias 0, conv biases
    0, conv weights by `style`. "msra": He fill, fan_out (detectron2's c2_msra_fill).
    "xavier": Caffe2's XavierFill, uniform within sqrt(3 / fan_in), what Detectron's GN
    ResNets got (its ConvGN passes no weight_init, and brew's default is Xavier): variance
    1 / fan_in rather than 2 / fan_out, so half where a conv keeps its width and ten times
    more in the stem (3 -> 64 channels, 7 x 7). With a norm after every conv the forward pass
    hardly sees the scale, but the size of an SGD step relative to a weight does."""
    if style not in ("msra", "xavier"):
        raise ValueError(f"model.conv_init {style!r}; allowed: msra, xavier")
    msra_init_(model)
    if style == "xavier":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)  # bound sqrt(3 / fan_in)
    return model


def init_mask_logits_(conv: nn.Conv2d, style: str):
    """ModelSpec.mask_logits_init: "normal", N(0, 0.001) as detectron2; "msra", He fill with
    fan_out = K classes (Detectron's MSRAFill, which ignores the std it is given; with 80
    classes std 0.158, where Detectron's 81 rows gave 0.157)."""
    if style == "normal":
        nn.init.normal_(conv.weight, std=0.001)
    elif style == "msra":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    else:
        raise ValueError(f"model.mask_logits_init {style!r}; allowed: normal, msra")
    nn.init.zeros_(conv.bias)
