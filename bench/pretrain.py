"""`bench pretrain`: train a run's backbone as a classifier on the embedded source set.

This is our ImageNet pre-training: the same backbone builder, depth, width and norm as the
detection runs that load it (GN backbone for GN runs, as the paper requires), a global
average pool and a linear classifier on top. The classifier is dropped when the detector
loads the checkpoint.
"""

import dataclasses
import json
import math
import time

import torch
from torch import nn
from torchvision import datasets, transforms

from bench.backbones import build_backbone
from bench.data import synthetic
from bench.norms import trainable_norm
from bench.paths import resolve_cache_path
from bench.rundir import atomic_write_text, code_version
from bench.spec import pixel_normalization

SOURCES = {
    "shapes-cls": synthetic.SourceConfig(),
    "shapes-cls-tiny": synthetic.SourceConfig(train_per_class=8, val_per_class=2),
}


class Classifier(nn.Module):
    """The backbone, a global average pool and a linear classifier; or, with `fc_dim` (a VGG),
    VGG's own classifier: the last map pooled to 7 x 7 and two fc layers (fc6, fc7) before the
    linear one, laid out as the detector's fc-only box head, which Faster R-CNN initializes
    from them (bench.backbones.from_torchvision_vgg does the same for torchvision's VGG)."""

    def __init__(self, backbone, num_classes, fc_dim: int = 0):
        super().__init__()
        self.body = backbone.body
        channels = backbone.stage_channels[-1]
        self.box_head = None
        if fc_dim:
            self.box_head = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                                          nn.Linear(channels * 49, fc_dim), nn.ReLU(inplace=True),
                                          nn.Linear(fc_dim, fc_dim), nn.ReLU(inplace=True))
            channels = fc_dim
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.body(x)
        return self.head(self.box_head(x) if self.box_head is not None else x.mean(dim=(2, 3)))

    def backbone_state(self) -> dict:
        """What the detector loads: the body, and fc6 / fc7 under the box head's names (its
        Sequential is Flatten, fc, ReLU, fc, ReLU: keys 1.* and 3.*; ours has the pool first)."""
        state = dict(self.body.state_dict())
        if self.box_head is not None:
            for ours, theirs in (("2", "1"), ("4", "3")):
                for leaf in ("weight", "bias"):
                    state[f"box_head.{theirs}.{leaf}"] = getattr(self.box_head[int(ours)], leaf)
        return {k: v.detach() for k, v in state.items()}


def vgg_fc_dim(model_spec) -> int:
    """A VGG's box head is its classifier's fc6 and fc7 (Faster R-CNN): pre-train them too."""
    if model_spec.backbone == "vgg" and model_spec.box_head_convs == 0 \
            and model_spec.box_head_fcs == 2:
        return model_spec.box_head_fc_dim
    return 0


def _loader(root, train, batch, seed, workers, normalization):
    """`normalization`: the (mean, std) the detector will feed the backbone with."""
    tf = [transforms.RandomHorizontalFlip()] if train else []
    tf += [transforms.ToTensor(), transforms.Normalize(*normalization)]
    ds = datasets.ImageFolder(str(root / ("train" if train else "val")), transforms.Compose(tf))
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=train, generator=g,
                                       num_workers=workers, drop_last=train,
                                       persistent_workers=workers > 0), len(ds.classes)


@torch.no_grad()
def accuracy(model, loader, device="cpu"):
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    model.train()
    return 100.0 * correct / max(total, 1)


def output_meta(model_spec, p):
    """What identifies a pre-trained checkpoint: the backbone and every pre-training setting."""
    meta = {"backbone": model_spec.backbone, "depth": model_spec.depth,
            "width": model_spec.width, "norm": trainable_norm(model_spec.norm),
            "norm_groups": model_spec.norm_groups, "pretrain": dataclasses.asdict(p)}
    if vgg_fc_dim(model_spec):  # (absent otherwise: older checkpoints stay valid)
        meta["box_head_fc_dim"] = vgg_fc_dim(model_spec)
    if model_spec.conv_init != "msra":  # (absent at the default: older checkpoints stay valid)
        meta["conv_init"] = model_spec.conv_init
    if model_spec.conv5_stride != 16:  # a VGG without pool4 learns other filters
        meta["conv5_stride"] = model_spec.conv5_stride
    if model_spec.groups != 1:  # a ResNeXt (absent for a ResNet: older checkpoints stay valid)
        meta.update(groups=model_spec.groups, width_per_group=model_spec.width_per_group)
    return meta


def is_done(path: str, model_spec, p) -> bool:
    file = resolve_cache_path(path)
    if not file.is_file():
        return False
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True).get("meta", {})
    except Exception:  # noqa: BLE001 - unreadable means redo
        return False
    want = output_meta(model_spec, p)
    return (all(meta.get(k) == v for k, v in want.items())
            and meta.get("conv_init", "msra") == model_spec.conv_init
            and meta.get("groups", 1) == model_spec.groups
            and meta.get("conv5_stride", 16) == model_spec.conv5_stride)


def set_aside(path: str):
    """Rename an existing checkpoint at `path` (and its .json) out of the way as a new one
    takes its place, so the backbone that finished runs started from is never lost; returns
    the new name, or None when there was none."""
    file = resolve_cache_path(path)
    if not file.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(file.stat().st_mtime))
    kept = file.with_name(f"{file.stem}.replaced-{stamp}{file.suffix}")
    file.rename(kept)
    if file.with_suffix(".json").is_file():
        file.with_suffix(".json").rename(kept.with_suffix(".json"))
    return kept


def run_command(studies, device, workers: int, force: bool):
    """`bench pretrain`: each backbone the studies name as their imagenet init, once, unless
    already made (`force`: again). `device()` is asked only when something is trained;
    `workers` < 0: 4 loader processes on a GPU, none on a CPU."""
    done = set()
    for study in studies:
        if study.pretrain is None:
            print(f"{study.path}: no `pretrain:` section; its imagenet init comes from elsewhere")
            continue
        for spec in study.runs:
            if spec.init != "imagenet" or spec.pretrained in done:
                continue
            done.add(spec.pretrained)
            if not force and is_done(spec.pretrained, spec.model, study.pretrain):
                print(f"{spec.pretrained}: already pre-trained, skipped (--force to redo)")
                continue
            on = device()
            pretrain(spec.model, study.pretrain, spec.pretrained, device=on,
                     workers=workers if workers >= 0 else (4 if on == "cuda" else 0))


def pretrain(model_spec, p, out_path: str, device="cpu", workers=0, log=print) -> dict:
    """Train the backbone as a classifier on the source set; `workers` loader processes keep a
    GPU fed (the data order and flips come from seeded generators either way)."""
    torch.manual_seed(p.seed)
    root = synthetic.ensure(SOURCES[p.source], log=log)
    train_loader, num_classes = _loader(root, True, p.batch, p.seed, workers,
                                        pixel_normalization(model_spec))
    val_loader, _ = _loader(root, False, 256, p.seed, workers, pixel_normalization(model_spec))
    trained = dataclasses.replace(model_spec, norm=trainable_norm(model_spec.norm))
    model = Classifier(build_backbone(trained), num_classes, vgg_fc_dim(model_spec)).to(device)
    decay, no_decay = [], []
    for m in model.modules():
        for prm in m.parameters(recurse=False):
            (no_decay if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) else decay).append(prm)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": p.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=p.lr, momentum=p.momentum,
                          nesterov=True)
    total = p.epochs * len(train_loader)
    warm = max(1, int(p.warmup_epochs * len(train_loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, total - warm))))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
    t0 = time.time()
    for epoch in range(p.epochs):
        running = 0.0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        log(f"pretrain epoch {epoch + 1}/{p.epochs}: loss {running / len(train_loader):.3f} "
            f"({time.time() - t0:.0f}s)")
    top1 = accuracy(model, val_loader, device)
    model.cpu()
    meta = {**output_meta(model_spec, p), "val_top1": top1, "num_classes": num_classes,
            "seconds": time.time() - t0, "device": str(device), "code_version": code_version()}
    file = resolve_cache_path(out_path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    torch.save({"backbone": model.backbone_state(), "meta": meta}, tmp)
    old = set_aside(out_path)
    if old:  # the backbone finished runs may have started from is never lost
        log(f"{out_path}: the checkpoint there was pre-trained otherwise; kept as {old}")
    tmp.replace(file)
    atomic_write_text(file.with_suffix(".json"), json.dumps(meta, indent=1))
    log(f"pretrained backbone saved to {file}: source val top-1 {top1:.1f}%")
    return meta
