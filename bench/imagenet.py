"""ImageNet (or stand-in) initializations for the backbone, for every engine.

Each engine gets the weights in torchvision's ResNet layout (RGB first conv) and renames
them where it must (bench/engines/detectron2/weights.py). Accepted: a checkpoint written
by `bench pretrain` ({"backbone": state_dict, "meta": ...}), a plain torchvision ResNet
state_dict, or one of Detectron's Caffe2 ImageNet `.pkl` models
(converted by bench.caffe2). Paths may start with `cache:` (the data cache) or be
`torchvision:NAME[/WEIGHTS]`: torchvision's ImageNet weights from torch's hub cache,
downloaded there first when the network allows (never during training: `bench run` loads
every checkpoint before it starts) and unless BENCH_OFFLINE=1. A ResNet or ResNeXt checkpoint
whose tensor shapes say it is another depth, stem width or group layout than the run's is
refused here, naming the model keys that fit it.
"""

import os
import socket

import torch

from bench import caffe2
from bench.norms import norm_family
from bench.paths import resolve_cache_path, torchvision_weights


def _download_torchvision(path: str):
    url, file = torchvision_weights(path)
    if os.environ.get("BENCH_OFFLINE") == "1":
        reason = "BENCH_OFFLINE=1"
    else:
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)  # a blocked network fails in seconds, not hours
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(file), progress=False)
            return
        except Exception as e:  # noqa: BLE001 - any network failure: one line below
            reason = f"{type(e).__name__}: {e}"
        finally:
            socket.setdefaulttimeout(old)
    raise FileNotFoundError(f"pretrained {path}: {file} is not in torch's cache and was not "
                            f"downloaded ({reason}); fetch {url} to that path")


def load_imagenet_backbone(path: str, model_spec, log=print) -> dict:
    if not path:
        raise ValueError("init is 'imagenet' but `pretrained` is empty; set pretrained: PATH")
    file = resolve_cache_path(path)
    if not file.is_file() and path.startswith("torchvision:"):
        _download_torchvision(path)
    if not file.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} not found at {file}; create it with "
                                f"`bench pretrain RECIPE` (or `make mini`), or point `pretrained` "
                                f"at an existing file")
    if file.suffix == ".pkl":  # Detectron's Caffe2 ImageNet models
        blobs = caffe2.read_blobs(file)
        caffe2.check_conventions(path, blobs, model_spec, log=log)
        state, unused = caffe2.convert(blobs, model_spec, path)
        _check_resnet_layout(path, state, model_spec)
        log(f"pretrained {path}: Caffe2 {caffe2.norm_style(blobs, path)} "
            f"{caffe2.describe(blobs)}, {len(state)} tensors converted (BGR->RGB first conv), "
            f"{len(unused)} blobs unused ({', '.join(unused[:4])}"
            f"{'...' if len(unused) > 4 else ''})")
        return state
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"pretrained checkpoint {file} is unreadable ({type(e).__name__}); "
                         f"delete it and rerun `bench pretrain`") from None
    if isinstance(obj, dict) and "backbone" in obj:
        meta = obj.get("meta", {})
        # (`bench pretrain` records groups and width_per_group only for a ResNeXt, and
        # conv5_stride only for a VGG without pool4: absent, they are the defaults)
        meta = {"groups": 1, "width_per_group": 64, "conv5_stride": 16, **meta}
        for key in ("backbone", "depth", "width", "groups", "width_per_group", "norm",
                    "conv5_stride"):
            if key not in meta:
                continue
            same = (norm_family(meta[key]) == norm_family(model_spec.norm) if key == "norm"
                    else meta[key] == getattr(model_spec, key))
            if not same:
                raise ValueError(f"pretrained checkpoint {file} was trained with {key}="
                                 f"{meta[key]!r}, but this run has model.{key}="
                                 f"{getattr(model_spec, key)!r}; pre-train a matching backbone")
        _check_resnet_layout(file, obj["backbone"], model_spec)
        return obj["backbone"]
    if not (isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values())):
        raise ValueError(f"pretrained checkpoint {file} holds a {type(obj).__name__}, not a "
                         f"state dict of tensors; point `pretrained` at a backbone checkpoint")
    _check_norm_statistics(file, obj, model_spec.norm, model_spec.groups)
    state = _in_backbone_layout(file, obj, model_spec)
    _check_resnet_layout(file, state, model_spec)
    return state


def _check_resnet_layout(file, state: dict, model_spec):
    """A ResNet / ResNeXt checkpoint of another depth, stem width, group count or group width
    than the run's would fail as a list of mismatched keys, or, where only the groups
    differ, in the middle of loading; refuse it here in one line that names the network
    its tensor shapes describe and the model keys that build it."""
    from bench.backbones import resnet_layout, resnet_name
    m = model_spec
    if m.backbone != "resnet":  # a plugin's layout is its own
        return
    have = resnet_layout(state)
    want = {"width": m.width, "depth": m.depth, "groups": m.groups,
            "bottleneck_width": m.groups * m.width_per_group if m.groups > 1 else m.width}
    if m.depth < 50:
        want.pop("bottleneck_width")
    differ = [k for k in want if k in have and have[k] != want[k]]
    if not differ:
        return
    run = resnet_name(m.depth, m.groups, m.width_per_group, m.width)
    if have.get("depth") is None and "blocks" in have:
        what = f"a ResNet with {have['blocks']} blocks per stage, which no model.depth builds"
        fix = ""
    elif have.get("groups") == 1 and have.get("bottleneck_width", have.get("width")) != \
            have.get("width"):
        what = (f"a wide ResNet (its res2 bottleneck is {have['bottleneck_width']} wide at a "
                f"{have['width']}-wide stem), which model.backbone resnet cannot build")
        fix = ""
    else:
        g = have.get("groups", m.groups)
        keys = {"depth": have.get("depth", m.depth), "width": have.get("width", m.width),
                "groups": g, "width_per_group": have.get("width_per_group", 64) if g > 1 else 64}
        what = "a " + resnet_name(keys["depth"], g, keys["width_per_group"], keys["width"])
        fix = "set " + ", ".join(f"model.{k}: {v}" for k, v in keys.items()
                                 if v != getattr(m, k)) + " to fine-tune that network, or "
    raise ValueError(f"pretrained checkpoint {file} is, by its tensor shapes, {what}; this run "
                     f"builds a {run}: {fix}point `pretrained` at a {run} checkpoint")


def _in_backbone_layout(file, state: dict, model_spec) -> dict:
    """A torchvision state dict in the run's backbone's names: ResNets are already; a VGG's
    `features.N` / `classifier.N` keys are renamed (bench.backbones.from_torchvision_vgg). A
    checkpoint of the other family is refused here, naming the file, not as missing keys."""
    is_vgg = any(k.startswith("features.") for k in state)
    is_resnet = any(k.startswith(("layer1.", "conv1.")) for k in state)
    if model_spec.backbone == "vgg":
        if not is_vgg:
            raise ValueError(f"pretrained checkpoint {file} is not a torchvision VGG (no "
                             f"`features.*` keys{'; it is a ResNet' if is_resnet else ''}), but "
                             f"this run has model.backbone 'vgg'; use torchvision:vgg{model_spec.depth} "
                             f"or a `bench pretrain` checkpoint of this backbone")
        if norm_family(model_spec.norm) == "GN":
            raise ValueError(f"pretrained checkpoint {file} is a torchvision VGG, which has no "
                             f"GN version, but this run has model.norm 'GN'; use model.norm "
                             f"'none' (vgg16) or BN / FrozenBN (vgg16_bn), or a `bench "
                             f"pretrain` checkpoint")
        from bench.backbones import from_torchvision_vgg
        return from_torchvision_vgg(state, model_spec)
    if is_vgg and not is_resnet:
        raise ValueError(f"pretrained checkpoint {file} is a torchvision VGG (`features.*` keys), "
                         f"but this run has model.backbone {model_spec.backbone!r}; point "
                         f"`pretrained` at a {model_spec.backbone} checkpoint, or set "
                         f"model.backbone: vgg and model.fpn: false")
    return state


def _check_norm_statistics(file, state: dict, norm: str, groups: int = 1):
    """A plain state dict says nothing of its norm but whether it holds BN statistics. Loaded
    into the other kind, the scale and bias would load by name and mean nothing (a BN
    network's into GN layers), so refuse before training."""
    has_stats = any(k.endswith(("running_mean", "running_var")) for k in state)
    if norm_family(norm) == "GN" and has_stats:
        gn_model = ("a GN ImageNet model (e.g. Detectron's R-50-GN.pkl)" if groups == 1 else
                    "a GN ImageNet ResNeXt (none is public: Detectron's and torchvision's "
                    "are BN; `bench pretrain` makes one on the embedded data)")
        raise ValueError(f"pretrained checkpoint {file} holds BatchNorm statistics, but this run "
                         f"has model.norm='GN'; use {gn_model} or model.norm FrozenBN / "
                         f"SyncBN / BN")
    if norm == "none" and has_stats:
        raise ValueError(f"pretrained checkpoint {file} holds BatchNorm statistics (a network "
                         f"with BN, e.g. vgg16_bn), but this run has model.norm 'none'; use a "
                         f"checkpoint without BN (torchvision:vgg16) or model.norm: FrozenBN")
    if norm_family(norm) == "BN" and not has_stats:
        raise ValueError(f"pretrained checkpoint {file} holds no BatchNorm statistics (a GN "
                         f"model?), but this run has model.norm={norm!r}; use a BN ImageNet "
                         f"model (e.g. torchvision:resnet50) or model.norm: GN")
