"""Detectron's Caffe2 ImageNet checkpoints (`R-50.pkl`, `R-50-GN.pkl`, ...) in our layout.

The paper's pre-trained runs start from these files: MSRA's ResNets (BN folded into a
per-channel scale and bias, "affine BN"; stride in the bottleneck's first 1x1 conv) and
FAIR's GN ResNets (stride in the 3x3). Both were trained on BGR images in 0-255 minus the
mean [103.53, 116.28, 123.675], with no division (pixel std 1; detectron2's
ThirdPartyModelCatalog notes). Our detector reads RGB, so the first conv's input channels
are reversed here; the recipe sets `model.pixel_std: [1, 1, 1]` (checked on load) and, for
MSRA's files, `model.stride_in_1x1: true`.

Blob names: `conv1_w`, the stem's norm `res_conv1_bn_{s,b}` (MSRA) or `conv1_gn_{s,b}`
(FAIR), then `res<stage>_<block>_branch{1,2a,2b,2c}_w` with norms `..._bn_{s,b}` or
`..._gn_{s,b}`; `pred_*`/`fc1000_*` is the ImageNet classifier; `*_momentum` are solver
state. They map onto torchvision's ResNet names (conv1, bn1, layer1..4, downsample).
"""

import pickle
import re

import numpy as np
import torch

_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b|gn_s|gn_b)$")
_STEM = {"conv1_w": ("conv1.weight", None), "res_conv1_bn_s": ("bn1", "bn_s"),
         "res_conv1_bn_b": ("bn1", "bn_b"), "conv1_gn_s": ("bn1", "gn_s"),
         "conv1_gn_b": ("bn1", "gn_b")}
_CONV = {"2a": "conv1", "2b": "conv2", "2c": "conv3"}
_NORM = {"2a": "bn1", "2b": "bn2", "2c": "bn3"}
CLASSIFIER = ("pred_w", "pred_b", "fc1000_w", "fc1000_b")
# Caffe2's inputs, in RGB order like ModelSpec.pixel_mean / pixel_std
EXPECTED_MEAN = (123.675, 116.28, 103.53)
EXPECTED_STD = (1.0, 1.0, 1.0)


class NotACaffe2Checkpoint(ValueError):
    pass


def read_blobs(path) -> dict:
    """name -> numpy array from a Detectron .pkl ({"blobs": {...}} or the bare dict)."""
    with open(path, "rb") as f:
        try:
            data = pickle.load(f, encoding="latin1")
        except Exception as e:  # noqa: BLE001 - truncated download, wrong file
            raise NotACaffe2Checkpoint(f"{path} is not a readable pickle ({type(e).__name__}); "
                                       f"download it again") from None
    if isinstance(data, dict) and "__author__" in data and "model" in data:
        raise NotACaffe2Checkpoint(
            f"{path} is a detectron2-format checkpoint, not one of Detectron's Caffe2 ImageNet "
            f"models; point `pretrained` at the Caffe2 file (e.g. ImageNetPretrained/MSRA/"
            f"R-50.pkl) or at a torchvision ResNet state_dict")
    blobs = data.get("blobs", data) if isinstance(data, dict) else None
    if not isinstance(blobs, dict) or not any(k == "conv1_w" for k in blobs):
        raise NotACaffe2Checkpoint(f"{path} holds no Caffe2 ResNet blobs (no conv1_w); expected "
                                   f"a Detectron ImageNet checkpoint such as R-50.pkl")
    return {k: np.asarray(v) for k, v in blobs.items() if not k.endswith("_momentum")}


def norm_style(blobs) -> str:
    """'affine-bn' (MSRA) or 'gn' (FAIR), from the norm blobs present."""
    if any(k.endswith(("_bn_rm", "_bn_riv")) for k in blobs):
        raise NotACaffe2Checkpoint("the checkpoint holds BN running statistics (*_bn_rm); only "
                                   "Detectron's affine-BN (MSRA) and GN (FAIR) ImageNet ResNets "
                                   "are supported")
    gn = any(k.endswith(("_gn_s", "_gn_b")) for k in blobs)
    bn = any(k.endswith(("_bn_s", "_bn_b")) for k in blobs)
    if gn == bn:
        raise NotACaffe2Checkpoint("the checkpoint has " + ("both BN and GN" if gn else "no")
                                   + " normalization blobs; expected MSRA's or FAIR's ResNet")
    return "gn" if gn else "affine-bn"


def convert(blobs: dict, model_spec, eps: float = 1e-5):
    """Our backbone state_dict from Caffe2 blobs, plus the blob names left unused.

    Affine BN becomes BatchNorm/FrozenBN with weight = scale, bias = bias, running mean 0
    and running variance 1 - eps, so that FrozenBN's scale * rsqrt(var + eps) is the stored
    scale exactly (a statistics-free layer: detectron2 warns it is only right frozen).
    """
    style = norm_style(blobs)
    if (model_spec.norm == "GN") != (style == "gn"):
        have = "GroupNorm (FAIR)" if style == "gn" else "affine BN (MSRA)"
        want = ("a GN checkpoint such as R-50-GN.pkl" if model_spec.norm == "GN" else
                "a BN checkpoint such as R-50.pkl, or model.norm: GN")
        raise NotACaffe2Checkpoint(f"the checkpoint's backbone uses {have} but model.norm is "
                                   f"{model_spec.norm}; use {want}")
    state, unused = {}, []

    def put_norm(prefix, kind, value):
        v = torch.from_numpy(value.astype(np.float32))
        if kind in ("gn_s", "bn_s"):
            state[f"{prefix}.weight"] = v
        else:
            state[f"{prefix}.bias"] = v
        if kind.startswith("bn"):
            state[f"{prefix}.running_mean"] = torch.zeros(v.numel())
            state[f"{prefix}.running_var"] = torch.full((v.numel(),), 1 - eps)

    for name, value in blobs.items():
        if name in _STEM:
            key, kind = _STEM[name]
            if kind is None:  # BGR -> RGB: reverse the input channels of the first conv
                state[key] = torch.from_numpy(value[:, ::-1].astype(np.float32).copy())
            else:
                put_norm(key, kind, value)
            continue
        m = _BLOCK.match(name)
        if not m:
            unused.append(name)
            continue
        stage, block, branch, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        prefix = f"layer{stage - 1}.{block}"
        if branch == "1":
            conv, norm = f"{prefix}.downsample.0", f"{prefix}.downsample.1"
        else:
            conv, norm = f"{prefix}.{_CONV[branch]}", f"{prefix}.{_NORM[branch]}"
        if kind == "w":
            state[f"{conv}.weight"] = torch.from_numpy(value.astype(np.float32))
        else:
            put_norm(norm, kind, value)
    return state, unused


def check_conventions(path, blobs, model_spec, log=print):
    """The input normalization must be Caffe2's; the stride position should be the file's."""
    if tuple(model_spec.pixel_std) != EXPECTED_STD or \
            tuple(model_spec.pixel_mean) != EXPECTED_MEAN:
        raise NotACaffe2Checkpoint(
            f"{path} was trained on 0-255 images minus the mean, std 1; this run normalizes "
            f"with model.pixel_mean {list(model_spec.pixel_mean)} and pixel_std "
            f"{list(model_spec.pixel_std)}: set model.pixel_std: [1, 1, 1] and pixel_mean: "
            f"{list(EXPECTED_MEAN)} for the imagenet init (compare.imagenet)")
    msra = norm_style(blobs) == "affine-bn"
    if msra != model_spec.stride_in_1x1:
        log(f"note: {path} is a {'MSRA' if msra else 'FAIR'} ResNet, trained with the stride in "
            f"the {'1x1' if msra else '3x3'} conv, but model.stride_in_1x1 is "
            f"{model_spec.stride_in_1x1} (detectron2's catalog: MSRA models use "
            f"STRIDE_IN_1X1 True); the weights load either way")
