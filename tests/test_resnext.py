"""ResNeXt, the paper's large model (Table 3: X152 = ResNeXt-152 32x8d, FPN, GN), is the
`resnet` backbone with `model.groups` and `model.width_per_group` (detectron2's NUM_GROUPS
and WIDTH_PER_GROUP): torchvision's ResNeXt layout, so its weights load by name, detectron2's
parameter count, FAIR's Caffe2 ResNeXt checkpoints converted like the ResNets, and a
checkpoint of another depth or width refused in one line before any training."""

import dataclasses
import importlib.util
import json

import pytest
import torch
import torchvision
from torch import nn

from bench import preflight, recipe
from bench.backbones import ResNet, build_backbone
from bench.engines.detectron2.config import Untranslatable, flatten, translate
from bench.engines.torchvision.model import build_detector, load_backbone_weights
from bench.imagenet import load_imagenet_backbone
from bench.spec import DataSpec, ModelSpec, SpecError
from conftest import REPO, SHIPPED_RECIPE_DIRS, nine_iteration_pair, write_recipe
from test_caffe2_checkpoints import CAFFE2_INPUT, caffe2_blobs, write_pkl

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (an optional "
                                                 "engine; README: The detectron2 engine)")

X152 = dict(depth=152, groups=32, width_per_group=8)   # the paper's X152
X101 = dict(depth=101, groups=32, width_per_group=8)   # torchvision's resnext101_32x8d
# A ResNeXt the CPU trains in seconds: 4 groups of 4 channels in res2 at a 16-wide stem
TINY_X = dict(depth=50, width=16, groups=4, width_per_group=4, norm_groups=4)
# detectron2 0.6 (02b5c4e), build_model on our translation of the he2019 R101-FPN GN scratch
# run with X152's three keys: its Mask R-CNN X152-FPN GN for COCO's 80 classes (the backbone
# body alone: 120,323,392)
X152_MASK_RCNN_PARAMETERS = 142_526_512


def _he2019_scratch(**model):
    spec = next(s for s in recipe.load(REPO / "recipes/he2019/r101_gn.yaml").runs
                if s.init == "scratch")
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, **model))


def _trained_looking(net):
    """Norms that are not the identity, so that a wrongly loaded one shows."""
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    return net.eval()


def test_x101_32x8d_is_torchvisions_resnext101_32x8d_through_the_imagenet_path(tmp_path):
    torch.manual_seed(0)
    theirs = _trained_looking(torchvision.models.resnext101_32x8d())
    file = tmp_path / "resnext101_32x8d.pth"
    torch.save(theirs.state_dict(), file)
    spec = ModelSpec(**X101, norm="FrozenBN")   # BN weights: a FrozenBN / BN / SyncBN run
    model = build_detector(spec, 3, DataSpec())
    report = load_backbone_weights(model, load_imagenet_backbone(str(file), spec,
                                                                 log=lambda m: None),
                                   log=lambda m: None)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    # only the classifier and FrozenBN's absent batch counters are left over
    assert {k for k in report["unused"] if not k.endswith("num_batches_tracked")} == \
        {"fc.weight", "fc.bias"}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        c5 = theirs.layer4(theirs.layer3(theirs.layer2(theirs.layer1(
            theirs.maxpool(theirs.relu(theirs.bn1(theirs.conv1(x))))))))
        ours = model.backbone.body.eval()(x)   # C2..C5 by stage name
        torch.testing.assert_close(list(ours.values())[-1], c5, rtol=1e-4, atol=1e-4)


def test_a_resnext_stage_has_groups_x_width_per_group_x_2_to_the_i_channels_at_any_stem():
    for width in (64, 48, 16):
        net = ResNet(50, width, groups=4, width_per_group=6)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4]
        assert [s[0].conv2.weight.shape[0] for s in stages] == [24, 48, 96, 192]
        assert all(s[0].conv2.groups == 4 for s in stages)
        assert net.out_channels == [4 * width * 2 ** i for i in range(4)]


def test_x152_32x8d_has_detectron2s_parameter_count():
    spec = _he2019_scratch(**X152)
    ours = build_detector(spec.model, 80, spec.data)
    assert sum(p.numel() for p in ours.parameters()) == X152_MASK_RCNN_PARAMETERS
    assert all(m.groups == 32 for n, m in ours.backbone.body.named_modules()
               if n.endswith("conv2"))


@needs_d2
@pytest.mark.slow
def test_with_detectron2_x152_32x8d_is_the_same_network_in_both_engines():
    from detectron2.modeling import build_model
    from bench.engines.detectron2.train import detectron2_cfg
    spec = _he2019_scratch(**X152)
    theirs = build_model(detectron2_cfg(spec, weights="X-152-32x8d.pkl"))
    assert sum(p.numel() for p in theirs.parameters()) == X152_MASK_RCNN_PARAMETERS
    # and our ResNeXt weights fill detectron2's ResNeXt, every tensor in its place
    from bench.engines.detectron2.train import load_backbone_state
    # (detectron2's GN has 32 groups: 8 groups of 4 make res2 32 wide)
    tiny = dataclasses.replace(spec, pretrained="tiny-x.pth", model=dataclasses.replace(
        spec.model, depth=50, width=32, groups=8, width_per_group=4))
    model = build_model(detectron2_cfg(tiny, weights="tiny-x.pth"))
    body = build_backbone(tiny.model).body
    load_backbone_state(model, tiny, body.state_dict(), log=lambda m: None)
    assert torch.equal(model.backbone.bottom_up.res4[5].conv2.weight, body.layer3[5].conv2.weight)
    assert model.backbone.bottom_up.res4[5].conv2.groups == 8


def test_the_detectron2_translation_says_num_groups_and_width_per_group():
    """As detectron2's COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml says them
    (its res2 bottleneck: NUM_GROUPS x WIDTH_PER_GROUP = 256 channels; stem and res2 output
    as a ResNet's)."""
    cfg = flatten(translate(_he2019_scratch(**X101)))
    assert {k: cfg[f"MODEL.RESNETS.{k}"] for k in ("DEPTH", "NUM_GROUPS", "WIDTH_PER_GROUP",
                                                   "STEM_OUT_CHANNELS", "RES2_OUT_CHANNELS",
                                                   "STRIDE_IN_1X1")} == \
        {"DEPTH": 101, "NUM_GROUPS": 32, "WIDTH_PER_GROUP": 8, "STEM_OUT_CHANNELS": 64,
         "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False}
    # a ResNet's stays as before: one group as wide as the stem
    plain = flatten(translate(_he2019_scratch()))
    assert (plain["MODEL.RESNETS.NUM_GROUPS"], plain["MODEL.RESNETS.WIDTH_PER_GROUP"]) == (1, 64)
    with pytest.raises(Untranslatable, match="model.groups 4 at depth 18"):
        translate(_he2019_scratch(depth=18, groups=4, width_per_group=4))


def test_groups_need_bottlenecks_and_width_per_group_needs_groups(tmp_path):
    for model, fix in (("{depth: 18, groups: 32, width_per_group: 4}", "needs bottleneck blocks"),
                       ("{depth: 50, width_per_group: 8}", "set model.groups > 1")):
        text = nine_iteration_pair("x", f"  model: {model}\n  data: {{dataset: shapes-tiny}}")
        with pytest.raises(SpecError, match=fix) as e:
            recipe.load(write_recipe(tmp_path, text))
        assert "\n" not in str(e.value)


def test_existing_run_ids_are_unchanged_and_a_resnext_is_named_as_one(tmp_path):
    """The two new fields are hashed only away from their defaults, so every shipped run
    keeps the id in tests/golden/plan.json; X152 runs get their own ids and say what they
    are in their names."""
    golden = {r["run_id"] for r in json.loads((REPO / "tests/golden/plan.json").read_text())}
    shipped = [s for d in SHIPPED_RECIPE_DIRS for st in recipe.load_all([d]) for s in st.runs]
    assert len(shipped) == len(golden) and {s.run_id for s in shipped} == golden
    x152 = _he2019_scratch(**X152)
    assert x152.identity() != _he2019_scratch().identity()
    text = nine_iteration_pair("x", "  model: {depth: 152, groups: 32, width_per_group: 8}")
    names = {s.name for s in recipe.load(write_recipe(tmp_path, text)).runs}
    assert all("-resnext152-32x8d-" in n for n in names)
    # and the plan, the speed table and the analysis (from spec.yaml alone) show it so
    from bench.analysis.table import backbone_label
    assert x152.model.backbone_name == backbone_label(x152.to_dict()["model"]) == \
        "resnext152-32x8d"
    assert backbone_label({"backbone": "resnet", "depth": 101}) == "resnet101"  # older specs


# -- a checkpoint of another width: one line, before training --------------------------

@pytest.fixture(scope="module")
def x101_32x8d_file(tmp_path_factory):
    file = tmp_path_factory.mktemp("ckpt") / "resnext101_32x8d.pth"
    torch.save(torchvision.models.resnext101_32x8d().state_dict(), file)
    return file


@pytest.mark.parametrize("model, fix", [
    (dict(depth=101, groups=32, width_per_group=4), "set model.width_per_group: 8"),
    (dict(depth=101), "set model.groups: 32, model.width_per_group: 8"),
    (dict(depth=152, groups=32, width_per_group=8), "set model.depth: 101"),
], ids=["into-32x4d", "into-R101", "into-X152"])
def test_a_resnext_checkpoint_of_another_shape_is_one_line_naming_the_file_and_the_fix(
        x101_32x8d_file, model, fix):
    with pytest.raises(ValueError) as e:
        load_imagenet_backbone(str(x101_32x8d_file), ModelSpec(**model, norm="FrozenBN"))
    message = str(e.value)
    assert str(x101_32x8d_file) in message and "a ResNeXt-101 32x8d" in message
    assert fix in message and "\n" not in message


def test_a_resnet_checkpoint_into_a_resnext_recipe_is_one_line(tmp_path):
    file = tmp_path / "resnet101.pth"
    torch.save(torchvision.models.resnet101().state_dict(), file)
    with pytest.raises(ValueError, match=r"is, by its tensor shapes, a ResNet-101; this run "
                                         r"builds a ResNeXt-101 32x8d: set model.groups: 1"):
        load_imagenet_backbone(str(file), ModelSpec(**X101, norm="SyncBN"))
    # and torchvision's BN ResNeXt into a GN run says no GN ResNeXt is public
    torch.save(torchvision.models.resnext50_32x4d().state_dict(), file)
    with pytest.raises(ValueError, match="none is public"):
        load_imagenet_backbone(str(file), ModelSpec(depth=50, groups=32, width_per_group=4))


@pytest.mark.slow
def test_preflight_refuses_a_checkpoint_of_other_groups_before_any_training(tmp_path):
    # 4 groups of 4 and 8 groups of 2 are both 16 channels wide: only the 3x3 convs differ
    other = dataclasses.replace(ModelSpec(**TINY_X), groups=8, width_per_group=2)
    file = tmp_path / "x50-8x2d.pth"
    torch.save(build_backbone(other).body.state_dict(), file)
    text = nine_iteration_pair("x", f"""
  pretrained: {file}
  model: {{depth: 50, width: 16, groups: 4, width_per_group: 4, norm_groups: 4}}
  data: {{dataset: shapes-tiny}}""")
    study = recipe.load(write_recipe(tmp_path, text))
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check([study], study.runs, tmp_path / "runs")
    message = str(e.value)
    assert str(file) in message and "ResNeXt-50 8x2d" in message
    assert "set model.groups: 8, model.width_per_group: 2" in message and "\n" not in message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pth"))


# -- FAIR's Caffe2 ResNeXts (X-101-32x8d.pkl, X-152-32x8d-IN5k.pkl) ----------------------

def _caffe2_resnext():
    """A ResNeXt laid out as FAIR's: stride in the 3x3, BN (trained-looking)."""
    torch.manual_seed(0)
    return _trained_looking(ResNet(50, 8, nn.BatchNorm2d, groups=4, width_per_group=2))


def test_a_caffe2_resnext_computes_what_it_computed_in_caffe2(tmp_path):
    net = _caffe2_resnext()
    path = write_pkl(tmp_path / "X-152-32x8d-IN5k.pkl", caffe2_blobs(net, "bn"))
    spec = ModelSpec(depth=50, width=8, groups=4, width_per_group=2, norm="FrozenBN",
                     **CAFFE2_INPUT)
    messages = []
    state = load_imagenet_backbone(str(path), spec, log=messages.append)
    assert "ResNeXt 4x2d" in messages[-1]
    assert not any(m.startswith("note:") for m in messages)  # FAIR's: stride in the 3x3
    ours = build_backbone(spec).body
    ours.load_state_dict(state, strict=False)
    bgr = torch.rand(1, 3, 64, 64) * 255 - torch.tensor([103.53, 116.28, 123.675])[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(bgr.flip(1)), net(bgr), rtol=1e-4, atol=1e-4)


def test_caffe2_resnext_conventions_are_one_line_errors_naming_the_fix(tmp_path):
    net = _caffe2_resnext()
    folded = write_pkl(tmp_path / "X-101-32x8d.pkl", caffe2_blobs(net, "bn"))
    rehosted = write_pkl(tmp_path / "d2-X-101-32x8d.pkl", caffe2_blobs(net, "bn-stats"), "model")
    x = dict(depth=50, width=8, groups=4, width_per_group=2, norm_groups=4)
    cases = [
        (folded, ModelSpec(**x, norm="GN", **CAFFE2_INPUT), "none is public"),
        (folded, ModelSpec(**x, norm="SyncBN", **CAFFE2_INPUT), "FAIR/X-101-32x8d.pkl"),
        # detectron2's unfused copy is fed ImageNet's std (its X_101_32x8d configs)
        (rehosted, ModelSpec(**x, norm="SyncBN", **CAFFE2_INPUT), "pixel_std: [58.395"),
        (folded, ModelSpec(**{**x, "groups": 1, "width_per_group": 64}, norm="FrozenBN",
                           **CAFFE2_INPUT), "set model.groups: 4, model.width_per_group: 2"),
    ]
    for path, spec, fix in cases:
        with pytest.raises(ValueError) as e:
            load_imagenet_backbone(str(path), spec, log=lambda m: None)
        assert fix in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
    # with the defaults (ImageNet's mean and std) it loads
    load_imagenet_backbone(str(rehosted), ModelSpec(**x, norm="SyncBN"), log=lambda m: None)


# -- bench pretrain -----------------------------------------------------------------------

@pytest.mark.slow
def test_bench_pretrain_trains_a_resnext_that_loads_into_its_detector(tmp_path, monkeypatch):
    from bench import pretrain
    from bench.spec import PretrainSpec
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    spec = ModelSpec(**TINY_X, norm="GN")
    p = PretrainSpec(source="shapes-cls-tiny", epochs=1, batch=16, lr=0.01)
    meta = pretrain.pretrain(spec, p, "cache:pretrained/x.pth", log=lambda m: None)
    assert (meta["groups"], meta["width_per_group"]) == (4, 4)
    assert pretrain.is_done("cache:pretrained/x.pth", spec, p)
    assert not pretrain.is_done("cache:pretrained/x.pth",
                                dataclasses.replace(spec, width_per_group=2), p)
    model = build_detector(spec, 3, DataSpec())
    report = load_backbone_weights(model, load_imagenet_backbone("cache:pretrained/x.pth", spec),
                                   log=lambda m: None)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    with pytest.raises(ValueError, match="was trained with groups=4.*model.groups=1"):
        load_imagenet_backbone("cache:pretrained/x.pth",
                               dataclasses.replace(spec, groups=1, width_per_group=64))


def test_grouped_convs_on_a_vgg_are_refused_in_one_line():
    vgg = recipe.load(REPO / "recipes/mini-vgg/study.yaml").runs[0]
    spec = dataclasses.replace(vgg, model=dataclasses.replace(vgg.model, groups=32))
    with pytest.raises(ValueError, match="model.groups / width_per_group are ResNeXt's"):
        build_detector(spec.model, 3, spec.data)
