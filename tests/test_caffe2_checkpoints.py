"""Detectron's Caffe2 ImageNet checkpoints load into our backbone and compute what they
computed in Caffe2: MSRA's R-50 (stride in the 1x1; BN folded into scale and bias, or
unfused with its statistics as detectron2 re-hosts it) and FAIR's R-50-GN, fed BGR 0-255
images there and RGB here. The test writes each kind of file with the real blob names from
a network whose outputs it knows."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from bench.backbones import ResNet, build_backbone
from bench.caffe2 import NotACaffe2Checkpoint
from bench.engines.torchvision.model import build_detector, load_backbone_weights
from bench.imagenet import load_imagenet_backbone
from bench.norms import norm_layer
from bench.spec import DataSpec, ModelSpec

CAFFE2_INPUT = dict(pixel_mean=(123.675, 116.28, 103.53), pixel_std=(1.0, 1.0, 1.0))
BRANCH = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}


def caffe2_blobs(net: ResNet, style: str) -> dict:
    """The blobs Detectron would have saved for `net`, a network fed BGR images: GN scale and
    bias (FAIR, "gn"), BN folded into a scale and a bias (MSRA, "bn"), or BN unfused with its
    statistics ("bn-stats"); a classifier; solver momenta."""
    eps = 1e-5

    def norm(prefix, module):
        if style == "gn":
            return {f"{prefix}_gn_s": module.weight.detach().numpy(),
                    f"{prefix}_gn_b": module.bias.detach().numpy()}
        if style == "bn-stats":
            return {f"{prefix}_bn_s": module.weight.detach().numpy(),
                    f"{prefix}_bn_b": module.bias.detach().numpy(),
                    f"{prefix}_bn_rm": module.running_mean.numpy(),
                    f"{prefix}_bn_riv": module.running_var.numpy()}
        scale = module.weight / torch.sqrt(module.running_var + eps)
        return {f"{prefix}_bn_s": scale.detach().numpy(),
                f"{prefix}_bn_b": (module.bias - module.running_mean * scale).detach().numpy()}

    blobs = {"conv1_w": net.conv1.weight.detach().numpy(),
             "conv1_w_momentum": net.conv1.weight.detach().numpy() * 0}
    blobs.update(norm("conv1" if style == "gn" else "res_conv1", net.bn1))
    for stage in range(1, 5):
        for i, block in enumerate(getattr(net, f"layer{stage}")):
            p = f"res{stage + 1}_{i}"
            for conv, branch in BRANCH.items():
                blobs[f"{p}_{branch}_w"] = getattr(block, conv).weight.detach().numpy()
                blobs.update(norm(f"{p}_{branch}", getattr(block, "bn" + conv[-1])))
            if block.downsample is not None:
                blobs[f"{p}_branch1_w"] = block.downsample[0].weight.detach().numpy()
                blobs.update(norm(f"{p}_branch1", block.downsample[1]))
    blobs["pred_w"] = torch.randn(1000, net.out_channels[-1]).numpy()
    blobs["pred_b"] = torch.zeros(1000).numpy()
    return blobs


def reference_net(style: str) -> ResNet:
    torch.manual_seed(0)
    net = ResNet(50, width=8, norm=norm_layer("GN", 4) if style == "gn" else nn.BatchNorm2d,
                 stride_in_1x1=style != "gn")
    for m in net.modules():  # trained-looking norms, not the identity init
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def write_pkl(path, blobs, wrap="blobs"):
    """Detectron wraps blobs in "blobs"; detectron2's re-hosted copies in "model"."""
    with open(path, "wb") as f:
        pickle.dump({wrap: blobs, "__author__": "test"} if wrap else blobs, f)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("style,norm,wrap", [("bn", "FrozenBN", "blobs"),
                                             ("bn-stats", "SyncBN", "model"),
                                             ("bn-stats", "FrozenBN", None),
                                             ("gn", "GN", "blobs")],
                         ids=["msra-folded-frozenbn", "msra-unfused-syncbn-detectron2-wrapper",
                              "msra-unfused-frozenbn-bare-dict", "fair-gn"])
def test_a_caffe2_checkpoint_computes_what_it_computed_in_caffe2(tmp_path, style, norm, wrap):
    net = reference_net(style)
    path = write_pkl(tmp_path / "R-50.pkl", caffe2_blobs(net, style), wrap)
    spec = ModelSpec(depth=50, width=8, norm=norm, norm_groups=4, stride_in_1x1=style != "gn",
                     **CAFFE2_INPUT)
    messages = []
    state = load_imagenet_backbone(str(path), spec, log=messages.append)
    assert "BGR->RGB" in messages[0] and "pred_w" in messages[0]  # what was left unused
    ours = build_backbone(spec).body
    ours.load_state_dict(state, strict=False)
    ours.eval()

    bgr = torch.rand(2, 3, 64, 64) * 255 - torch.tensor([103.53, 116.28, 123.675])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(ours(bgr.flip(1)), net(bgr), rtol=1e-4, atol=1e-4)

    # and through the detector's loader: every backbone tensor matched, none missing
    report = load_backbone_weights(build_detector(spec, 3, DataSpec()), state,
                                   log=messages.append)
    assert report["missing"] == [] and report["shape_mismatch"] == []


def test_wrong_conventions_are_one_line_errors_naming_the_fix(tmp_path):
    gn = write_pkl(tmp_path / "R-50-GN.pkl", caffe2_blobs(reference_net("gn"), "gn"))
    msra = write_pkl(tmp_path / "R-50.pkl", caffe2_blobs(reference_net("bn"), "bn"))
    base = dict(depth=50, width=8, norm_groups=4)

    cases = [
        (gn, ModelSpec(**base, norm="GN"), "pixel_std: [1, 1, 1]"),      # ImageNet std kept
        (gn, ModelSpec(**base, norm="SyncBN", **CAFFE2_INPUT), "model.norm is SyncBN"),
        (msra, ModelSpec(**base, norm="GN", **CAFFE2_INPUT), "GN checkpoint such as R-50-GN"),
        (msra, ModelSpec(**base, norm="none", **CAFFE2_INPUT), "FrozenBN, BN or SyncBN"),
        # folded BN is FrozenBN exactly; batch statistics would change what it computes
        (msra, ModelSpec(**base, norm="SyncBN", **CAFFE2_INPUT), "right only for frozen BN"),
    ]
    for path, spec, fix in cases:
        with pytest.raises(NotACaffe2Checkpoint) as e:
            load_imagenet_backbone(str(path), spec, log=lambda m: None)
        assert fix in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)

    broken = tmp_path / "broken.pkl"
    broken.write_bytes(msra.read_bytes()[:1000])
    d2 = write_pkl(tmp_path / "d2.pkl", {"stem.conv1.weight": torch.zeros(1).numpy()}, "model")
    for path, fix in ((broken, "download it again"), (d2, "torchvision:resnet50")):
        with pytest.raises(NotACaffe2Checkpoint, match=fix):
            load_imagenet_backbone(str(path), ModelSpec(**base, norm="FrozenBN", **CAFFE2_INPUT))


def test_a_checkpoint_missing_a_stage_fails_and_a_stride_mismatch_is_reported(tmp_path):
    blobs = caffe2_blobs(reference_net("bn"), "bn")
    notes = []
    spec = ModelSpec(depth=50, width=8, norm="FrozenBN", **CAFFE2_INPUT)   # stride in the 3x3
    state = load_imagenet_backbone(str(write_pkl(tmp_path / "a.pkl", blobs)), spec,
                                   log=notes.append)
    assert any("MSRA" in n and "STRIDE_IN_1X1" in n for n in notes)
    load_backbone_weights(build_detector(spec, 3, DataSpec()), state, log=notes.append)

    cut = {k: v for k, v in blobs.items() if not k.startswith("res5_")}
    state = load_imagenet_backbone(str(write_pkl(tmp_path / "b.pkl", cut)), spec, log=notes.append)
    with pytest.raises(ValueError, match="does not cover the backbone"):
        load_backbone_weights(build_detector(spec, 3, DataSpec()), state, log=notes.append)


def test_every_recipe_that_loads_a_caffe2_file_normalizes_as_it_was_trained():
    """The he2019 recipes subtract Detectron's means, the detectron2-zoo recipes detectron2's
    for the same files; both are Caffe2's 0-255 BGR minus a mean, std 1, and load."""
    from bench import recipe
    from bench.caffe2 import check_conventions
    from conftest import REPO
    studies = recipe.load_all([REPO / "recipes/he2019", REPO / "recipes/detectron2-zoo"])
    runs = [s for st in studies for s in st.runs
            if s.init == "imagenet" and s.pretrained.endswith(".pkl")]
    assert {s.study for s in runs} >= {"he2019-r50-gn", "he2019-less-data-1k"}
    for spec in runs:
        blobs = {"res2_0_branch2a_gn_s" if spec.model.norm == "GN" else "res2_0_branch2a_bn_s":
                 np.zeros(1)}
        check_conventions(spec.pretrained, blobs, spec.model, log=lambda msg: None)


class _RunsCode:
    """What a tampered .pkl can hold: unpickling it calls a function of the file's choice."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file


def test_a_pkl_that_would_run_code_is_refused_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    blobs = caffe2_blobs(reference_net("gn"), "gn")
    tampered = write_pkl(tmp_path / "R-50-GN.pkl", {**blobs, "payload": _RunsCode(marker)})
    with pytest.raises(NotACaffe2Checkpoint) as e:
        load_imagenet_backbone(str(tampered), ModelSpec(depth=50, width=8, norm_groups=4,
                                                        norm="GN", **CAFFE2_INPUT))
    assert not marker.exists()
    message = str(e.value)
    assert str(tampered) in message and "refused" in message and ".open" in message
    assert "\n" not in message and "download it again" in message
