"""Detectron's Caffe2 ImageNet checkpoints (`R-50.pkl`, `R-50-GN.pkl`, ...) in our layout.

The paper's pre-trained runs start from these files: MSRA's ResNets (stride in the
bottleneck's first 1x1 conv) and FAIR's GN ResNets (stride in the 3x3). They were trained
on BGR images in 0-255 minus a mean, with no division (pixel std 1): Detectron subtracts
[102.9801, 115.9465, 122.7717] (its PIXEL_MEANS), detectron2's catalog [103.53, 116.28,
123.675] for the same files. Our detector reads RGB, so the first conv's input channels are
reversed here; the recipe sets `model.pixel_std: [1, 1, 1]` and one of those means (checked
on load) and, for MSRA's files, `model.stride_in_1x1: true` (reported if not).

FAIR's ResNeXts (`X-101-32x8d.pkl`, `X-101-64x4d.pkl`, `X-152-32x8d-IN5k.pkl`, all BN) have
the same blob names, with a grouped 3x3 conv in branch2b; they stride in the 3x3 (Detectron's
X configs: STRIDE_1X1 False) and Detectron feeds them as the others (std 1). detectron2
re-hosts X-101-32x8d unfused (BN statistics kept) and feeds that copy ImageNet's std
(its X_101_32x8d configs: PIXEL_STD [57.375, 57.120, 58.395]), so a grouped file with BN
statistics is expected with that std instead (inferred from the configs; unverified
against the file itself).

Three kinds of normalization blobs, told apart by their names:
* `gn`: FAIR's GN scale and bias (`*_gn_s`, `*_gn_b`);
* `affine-bn`: Detectron's MSRA files, BN folded into a per-channel scale and bias
  (`*_bn_s`, `*_bn_b`). That is FrozenBN exactly, and nothing else: a BN or SyncBN layer
  that normalizes with batch statistics would no longer compute the pre-trained network,
  so those runs are refused (detectron2's catalog calls it wrong too);
* `bn`: BN with its statistics (`*_bn_rm`/`_riv` or `*_bn_running_mean`/`_var`, as
  detectron2 reads them; detectron2 re-hosts MSRA's R-50.pkl unfused like this), which
  loads into BN, SyncBN and FrozenBN.

Blob names: `conv1_w`, the stem's norm `res_conv1_bn_*` (MSRA) or `conv1_gn_*` (FAIR), then
`res<stage>_<block>_branch{1,2a,2b,2c}_w` with their norms `..._bn_*` / `..._gn_*`;
`pred_*`/`fc1000_*` is the ImageNet classifier; `*_momentum` are solver state. They map
onto torchvision's ResNet names (conv1, bn1, layer1..4, downsample). A file may hold them
bare, under "blobs" (Detectron), or under "model" (detectron2's re-hosted copies).
"""

import pickle
import re

import numpy as np
import torch

# norm blob suffix -> the BatchNorm/GroupNorm tensor it is
_NORM_KINDS = {"bn_s": "weight", "bn_gamma": "weight", "gn_s": "weight",
               "bn_b": "bias", "bn_beta": "bias", "gn_b": "bias",
               "bn_rm": "running_mean", "bn_running_mean": "running_mean",
               "bn_riv": "running_var", "bn_running_var": "running_var"}
_KIND = "|".join(sorted(_NORM_KINDS, key=len, reverse=True))
_BLOCK = re.compile(rf"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|{_KIND})$")
_STEM_NORM = re.compile(rf"^(?:res_conv1|conv1)_({_KIND})$")
_CONV = {"2a": "conv1", "2b": "conv2", "2c": "conv3"}
_NORM = {"2a": "bn1", "2b": "bn2", "2c": "bn3"}
# Caffe2's inputs, in RGB order like ModelSpec.pixel_mean / pixel_std: Detectron's means
# (the he2019 recipes) or detectron2's for the same files (the detectron2-zoo recipes)
EXPECTED_MEANS = ((122.7717, 115.9465, 102.9801), (123.675, 116.28, 103.53))
EXPECTED_STD = (1.0, 1.0, 1.0)
IMAGENET_STD = (58.395, 57.12, 57.375)  # detectron2's re-hosted FAIR/X-101-32x8d.pkl, RGB


class NotACaffe2Checkpoint(ValueError):
    pass


# What a Detectron .pkl may name: numpy arrays, their dtypes and scalars, and plain
# containers. Users download these files and name them by path, and plain pickle.load runs
# whatever a pickle names (os.system, say), so anything else is refused, never called.
_SAFE_GLOBALS = {(module, name)
                 for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                 for name in ("_reconstruct", "scalar")} | {
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
}


class UnsafePickle(ValueError):
    pass


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise UnsafePickle(f"{module}.{name}")
        return super().find_class(module, name)


def read_blobs(path) -> dict:
    """name -> numpy array from a Detectron .pkl, read without running any code it names."""
    with open(path, "rb") as f:
        try:
            data = _ArraysOnly(f, encoding="latin1").load()
        except UnsafePickle as e:
            raise NotACaffe2Checkpoint(
                f"{path} is refused: its pickle calls {e}, which a Detectron checkpoint (numpy "
                f"arrays only) never does; download it again from Detectron's model zoo") from None
        except Exception as e:  # noqa: BLE001 - truncated download, wrong file
            raise NotACaffe2Checkpoint(f"{path} is not a readable pickle ({type(e).__name__}); "
                                       f"download it again") from None
    blobs = data if isinstance(data, dict) else {}
    for wrapper in ("blobs", "model"):
        if isinstance(blobs.get(wrapper), dict):
            blobs = blobs[wrapper]
    if "conv1_w" not in blobs:
        hint = ("its names are detectron2's own (e.g. stem.conv1.weight), not Caffe2's; use "
                "torchvision's ImageNet weights (pretrained: torchvision:resnet50) instead"
                if any(str(k).startswith("stem.") for k in blobs) else
                "expected a Detectron ImageNet checkpoint such as R-50.pkl or R-50-GN.pkl")
        raise NotACaffe2Checkpoint(f"{path} holds no Caffe2 ResNet blobs (no conv1_w): {hint}")
    return {k: np.asarray(v) for k, v in blobs.items() if not k.endswith("_momentum")}


def norm_style(blobs, path="the checkpoint") -> str:
    """'gn', 'affine-bn' or 'bn' (see the module docstring), from the blob names."""
    kinds = {m.group(4) for m in map(_BLOCK.match, blobs) if m and m.group(4) != "w"}
    gn = bool(kinds & {"gn_s", "gn_b"})
    bn = bool(kinds - {"gn_s", "gn_b"})
    if gn == bn:
        raise NotACaffe2Checkpoint(
            f"{path} has {'both BN and GN' if gn else 'no'} normalization blobs in its "
            f"residual blocks; expected MSRA's BN or FAIR's GN ImageNet ResNet (R-50.pkl, "
            f"R-50-GN.pkl), not a model without norms")
    if gn:
        return "gn"
    return "bn" if kinds & {"bn_rm", "bn_running_mean"} else "affine-bn"


def groups(blobs) -> int:
    """The first block's 3x3 conv weight is (out, in / groups, 3, 3) and its input is
    branch2a's output: 1 for a ResNet, 32 for X-152-32x8d; 1 when the blobs do not say."""
    a, b = blobs.get("res2_0_branch2a_w"), blobs.get("res2_0_branch2b_w")
    if a is None or b is None or np.ndim(b) != 4:
        return 1
    return max(1, a.shape[0] // b.shape[1])


def describe(blobs) -> str:
    """'ResNet' or 'ResNeXt 32x8d', for the load log."""
    g = groups(blobs)
    return "ResNet" if g == 1 else \
        f"ResNeXt {g}x{blobs['res2_0_branch2b_w'].shape[1]}d"


def convert(blobs: dict, model_spec, path="the checkpoint", eps: float = 1e-5):
    """Our backbone state_dict from Caffe2 blobs, plus the blob names left unused.

    Folded (affine) BN becomes FrozenBN with running mean 0 and running variance 1 - eps,
    so that FrozenBN's weight * rsqrt(var + eps) is the stored scale exactly.
    """
    style = norm_style(blobs, path)
    norm = model_spec.norm
    grouped = groups(blobs) > 1
    if style == "gn" and norm != "GN" or style != "gn" and norm not in ("BN", "SyncBN", "FrozenBN"):
        have = "GroupNorm (FAIR)" if style == "gn" else "BN (FAIR)" if grouped else "BN (MSRA)"
        gn = ("a GN checkpoint of this ResNeXt (none is public: FAIR's ResNeXts are BN; "
              "`bench pretrain` makes one on the embedded data) or model.norm: FrozenBN"
              if grouped else "a GN checkpoint such as R-50-GN.pkl")
        want = (gn if norm == "GN" else
                "a BN checkpoint such as R-50.pkl" if style == "gn" and norm != "none" else
                "model.norm: " + ("GN" if style == "gn" else "FrozenBN, BN or SyncBN"))
        raise NotACaffe2Checkpoint(f"{path}: its backbone uses {have} but model.norm is {norm}; "
                                   f"use {want}")
    if style == "affine-bn" and norm != "FrozenBN":
        unfused = ("ImageNetPretrained/FAIR/X-101-32x8d.pkl" if grouped else
                   "ImageNetPretrained/MSRA/R-50.pkl")
        raise NotACaffe2Checkpoint(
            f"{path} holds BN folded into a scale and a bias (Detectron's "
            f"{'FAIR' if grouped else 'MSRA'} file), which is right only for frozen BN; "
            f"model.norm is {norm}: use model.norm: FrozenBN, or detectron2's unfused "
            f"{unfused} (with BN statistics)")
    state, unused = {}, []

    def put_norm(prefix, kind, value):
        state[f"{prefix}.{_NORM_KINDS[kind]}"] = torch.from_numpy(value.astype(np.float32))
        if style == "affine-bn":
            state[f"{prefix}.running_mean"] = torch.zeros(value.size)
            state[f"{prefix}.running_var"] = torch.full((value.size,), 1 - eps)

    for name, value in blobs.items():
        if name == "conv1_w":  # BGR -> RGB: reverse the input channels of the first conv
            state["conv1.weight"] = torch.from_numpy(value[:, ::-1].astype(np.float32).copy())
            continue
        stem = _STEM_NORM.match(name)
        if stem:
            put_norm("bn1", stem.group(1), value)
            continue
        m = _BLOCK.match(name)
        if not m:
            unused.append(name)
            continue
        stage, block, branch, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        prefix = f"layer{stage - 1}.{block}"
        if branch == "1":
            conv, norm_name = f"{prefix}.downsample.0", f"{prefix}.downsample.1"
        else:
            conv, norm_name = f"{prefix}.{_CONV[branch]}", f"{prefix}.{_NORM[branch]}"
        if kind == "w":
            state[f"{conv}.weight"] = torch.from_numpy(value.astype(np.float32))
        else:
            put_norm(norm_name, kind, value)
    return state, unused


def check_conventions(path, blobs, model_spec, log=print):
    """The input normalization must be the file's; the stride position should be."""
    style, grouped = norm_style(blobs, path), groups(blobs) > 1
    if grouped and style == "bn":  # detectron2's re-hosted FAIR/X-101-32x8d.pkl
        if tuple(model_spec.pixel_std) != IMAGENET_STD or \
                tuple(model_spec.pixel_mean) != EXPECTED_MEANS[1]:
            raise NotACaffe2Checkpoint(
                f"{path} is a ResNeXt with BN statistics (detectron2's re-hosted "
                f"FAIR/X-101-32x8d.pkl), which detectron2 feeds 0-255 images minus ImageNet's "
                f"mean divided by its std; this run has model.pixel_mean "
                f"{list(model_spec.pixel_mean)} and pixel_std {list(model_spec.pixel_std)}: "
                f"set pixel_mean: {list(EXPECTED_MEANS[1])} and pixel_std: "
                f"{list(IMAGENET_STD)} (the defaults) for the imagenet init")
    elif tuple(model_spec.pixel_std) != EXPECTED_STD or \
            tuple(model_spec.pixel_mean) not in EXPECTED_MEANS:
        raise NotACaffe2Checkpoint(
            f"{path} was trained on 0-255 images minus the mean, std 1; this run normalizes "
            f"with model.pixel_mean {list(model_spec.pixel_mean)} and pixel_std "
            f"{list(model_spec.pixel_std)}: set model.pixel_std: [1, 1, 1] and pixel_mean: "
            f"{list(EXPECTED_MEANS[0])} (Detectron's) or {list(EXPECTED_MEANS[1])} "
            f"(detectron2's) for the imagenet init")
    # MSRA's ResNets stride in the 1x1; FAIR's GN ResNets and its ResNeXts in the 3x3
    msra = style != "gn" and not grouped
    if msra != model_spec.stride_in_1x1:
        kind = "MSRA ResNet" if msra else "FAIR ResNeXt" if grouped else "FAIR ResNet"
        log(f"note: {path} is a {kind}, trained with the stride in "
            f"the {'1x1' if msra else '3x3'} conv, but model.stride_in_1x1 is "
            f"{model_spec.stride_in_1x1} (detectron2's catalog: MSRA models use "
            f"STRIDE_IN_1X1 True); the weights load either way")
