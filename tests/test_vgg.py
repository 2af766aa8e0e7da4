"""The paper's VGG-16 without normalization (Sec. 5.1): Faster R-CNN on conv5 of a VGG body,
no FPN, fc6 and fc7 in the box head; ImageNet weights from torchvision's VGG-16, fc6 and fc7
included."""

import dataclasses

import pytest
import torch
import torchvision
from torchvision.models.detection.image_list import ImageList

from bench import recipe
from bench.backbones import VGG, build_backbone, from_torchvision_vgg
from bench.engines.detectron2.config import Untranslatable, translate
from bench.engines.torchvision.model import build_detector, load_backbone_weights
from bench.imagenet import load_imagenet_backbone
from bench.spec import SpecError
from conftest import REPO, write_recipe

MINI = recipe.load(REPO / "recipes/mini-vgg/study.yaml")
PAPER = recipe.load(REPO / "recipes/he2019/vgg16_nobn.yaml")


def _small(**model):
    """The mini VGG's spec with some model fields changed."""
    spec = MINI.runs[0]
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, **model))


def test_the_papers_vgg16_is_faster_rcnn_on_conv5_with_no_norm_and_fc6_fc7():
    scratch, imagenet = (next(s for s in PAPER.runs if s.init == i and s.solver.schedule == "9x")
                         for i in ("scratch", "imagenet"))
    m = scratch.model
    assert (m.arch, m.backbone, m.depth, m.width, m.norm, m.fpn) == \
        ("faster_rcnn", "vgg", 16, 64, "none", False)
    assert (m.box_head_convs, m.box_head_fcs, m.box_head_fc_dim) == (0, 2, 4096)
    assert m.conv_init == "msra" and scratch.solver.base_lr == 0.02
    assert imagenet.model.freeze_at == 2 and imagenet.pretrained == "torchvision:vgg16"
    assert sorted({s.solver.schedule for s in PAPER.runs}) == ["11x", "9x"]
    # torchvision's VGG-16 body with Faster R-CNN's cut: 13 convs, no norm, conv5 at stride 16
    body = VGG(16, 64, None)
    convs = [x for x in body.modules() if isinstance(x, torch.nn.Conv2d)]
    assert len(convs) == 13 and body.out_channels == [64, 128, 256, 512, 512]
    assert not any(isinstance(x, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))
                   for x in body.modules())
    assert body(torch.zeros(1, 3, 64, 96)).shape == (1, 512, 4, 6)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvisions_vgg16_weights_compute_the_same_conv5_in_our_body(batch_norm):
    torch.manual_seed(0)
    theirs = (torchvision.models.vgg16_bn if batch_norm else torchvision.models.vgg16)().eval()
    spec = _small(width=64, norm="BN" if batch_norm else "none")
    state = from_torchvision_vgg(theirs.state_dict(), spec.model)
    ours = VGG(16, 64, torch.nn.BatchNorm2d if batch_norm else None).eval()
    missing, unexpected = ours.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("box_head.")}, strict=True)
    assert not missing and not unexpected
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        # Faster R-CNN's conv5_3: torchvision's features without the last max-pool
        assert torch.allclose(ours(x), theirs.features[:-1](x), atol=1e-5)
    # fc6 and fc7 become the box head's two fc layers
    assert torch.equal(state["box_head.1.weight"], theirs.classifier[0].weight)
    assert torch.equal(state["box_head.3.bias"], theirs.classifier[3].bias)


def test_a_pretrained_vgg_fills_the_body_and_the_box_heads_fc6_and_fc7():
    spec = _small(width=16)  # 16 .. 128 channels, as the VGG built below
    model = build_detector(spec.model, 8, spec.data)
    head = model.roi_heads.box_head
    fcs = [x for x in head.modules() if isinstance(x, torch.nn.Linear)]
    assert [tuple(f.weight.shape) for f in fcs] == [(256, 128 * 49), (256, 256)]
    # a torchvision-layout VGG of this spec's widths (16 .. 128), every tensor a distinct value
    body = VGG(16, 16, None)
    tv = {}
    for theirs, ours in VGG.torchvision_names(16, False).items():
        for leaf in ("weight", "bias"):
            tv[f"{theirs}.{leaf}"] = torch.full_like(body.state_dict()[f"{ours}.{leaf}"],
                                                     len(tv) + 1.0)
    tv.update({"classifier.0.weight": torch.full((256, 128 * 49), -1.0),
               "classifier.0.bias": torch.full((256,), -2.0),
               "classifier.3.weight": torch.full((256, 256), -3.0),
               "classifier.3.bias": torch.full((256,), -4.0),
               "classifier.6.weight": torch.zeros(1000, 256),
               "classifier.6.bias": torch.zeros(1000)})
    report = load_backbone_weights(model, from_torchvision_vgg(tv, spec.model), log=lambda m: None)
    assert report["missing"] == [] and report["box_head"] == 4
    assert float(model.backbone.body["conv5"][4].bias[0]) == tv["features.28.bias"][0]
    assert float(fcs[0].bias[0]) == -2.0 and float(fcs[1].weight[0, 0]) == -3.0


def test_the_mini_vgg_trains_a_step_with_one_feature_map_and_every_anchor_on_it():
    spec = _small()
    model = build_detector(spec.model, 8, spec.data).train()
    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]  # 5 sizes x 3 ratios
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 60, 70], [70, 64, 120, 110]]),
                "labels": torch.tensor([1, 3])}] * 2
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    assert model.backbone.body["conv1"][0].weight.grad.abs().sum() > 0


def test_a_vgg_without_pool4_puts_conv5_at_stride_8_with_the_same_weights():
    # a miniature's 128-px images: conv5 16 x 16 instead of 8 x 8, the same tensors to load
    sixteen, eight = VGG(16, 16, None), VGG(16, 16, None, conv5_stride=8)
    assert sixteen.state_dict().keys() == eight.state_dict().keys()
    x = torch.zeros(1, 3, 128, 128)
    assert sixteen(x).shape == (1, 128, 8, 8) and eight(x).shape == (1, 128, 16, 16)
    model = build_detector(_small(conv5_stride=8).model, 8, MINI.runs[0].data).eval()
    with torch.no_grad():
        features = list(model.backbone(x).values())
        assert features[0].shape[-2:] == (16, 16)
        # the RPN's anchors and the RoI pooler follow the map: every size on an 8-px grid
        anchors = model.rpn.anchor_generator(ImageList(x, [(128, 128)]), features)[0]
        centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        assert len(anchors) == 16 * 16 * model.rpn.anchor_generator.num_anchors_per_location()[0]
        assert torch.allclose(centres, (centres / 8).round() * 8, atol=1e-4)
        assert sorted(centres[:, 0].round().unique().tolist()) == [8.0 * i for i in range(16)]
        box = torch.tensor([[8.0, 16.0, 56.0, 40.0]])
        conv5 = torch.rand_like(features[0])
        pooled = model.roi_heads.box_roi_pool({"0": conv5}, [box], [(128, 128)])
        assert torch.equal(pooled, torchvision.ops.roi_align(
            conv5, [box], (7, 7), spatial_scale=1 / 8, sampling_ratio=0, aligned=True))
    with pytest.raises(ValueError, match="conv5_stride=4: VGG's conv5 is at stride 16"):
        build_backbone(_small(conv5_stride=4).model)
    resnet = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]
    with pytest.raises(ValueError, match="conv5_stride=8 is VGG's .*drop the key"):
        build_backbone(dataclasses.replace(resnet.model, conv5_stride=8))
    with pytest.raises(Untranslatable, match="conv5_stride 8: a VGG setting"):  # either engine
        translate(dataclasses.replace(resnet, model=dataclasses.replace(
            resnet.model, conv5_stride=8, depth=50, width=64)))
    # runs, plans and tables tell the two apart (a stride-16 VGG keeps its old name)
    from bench.analysis.table import backbone_label
    eight_spec = _small(conv5_stride=8)
    assert eight_spec.model.backbone_name == backbone_label(eight_spec.to_dict()["model"]) \
        == "vgg16-c5s8"
    assert recipe.run_name(eight_spec).startswith("faster_rcnn-vgg16-c5s8-none-")
    assert backbone_label({"backbone": "vgg", "depth": 16}) == "vgg16"
    assert _small(conv5_stride=16).model.backbone_name == "vgg16"
    assert all(s.name.startswith("faster_rcnn-vgg16-none-") for s in PAPER.runs)
    # the paper's VGG-16 keeps Faster R-CNN's stride 16
    assert all(s.model.conv5_stride == 16 for s in PAPER.runs)


def test_a_vgg_pretrained_with_pool4_is_not_reused_for_one_without(tmp_path, monkeypatch):
    # the pooling changes what the filters learn: `bench pretrain` makes the stride-8 body its
    # own checkpoint (older stride-16 ones, which record no stride, stay valid)
    from bench import pretrain
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    p = MINI.pretrain
    eight, sixteen = _small(conv5_stride=8).model, _small(conv5_stride=16).model
    path = "cache:pretrained/vgg-test.pth"
    file = pretrain.resolve_cache_path(path)
    file.parent.mkdir(parents=True)
    for made, other in ((eight, sixteen), (sixteen, eight)):
        torch.save({"meta": pretrain.output_meta(made, p)}, file)
        assert pretrain.is_done(path, made, p) and not pretrain.is_done(path, other, p)
    assert "conv5_stride" not in pretrain.output_meta(sixteen, p)
    # nor does a run load it: the tensors have the same shapes, the filters do not fit
    body = VGG(16, sixteen.width, None).state_dict()
    torch.save({"backbone": body, "meta": pretrain.output_meta(sixteen, p)}, file)
    assert load_imagenet_backbone(path, sixteen).keys() == body.keys()
    with pytest.raises(ValueError, match="conv5_stride=16, but this run has model.conv5_stride=8"):
        load_imagenet_backbone(path, eight)


def test_vgg_checkpoints_and_resnet_recipes_refuse_each_other_in_one_line(tmp_path):
    vgg_file, resnet_file, bn_file = (tmp_path / n for n in ("vgg.pth", "r.pth", "bn.pth"))
    torch.save({"features.0.weight": torch.zeros(16, 3, 3, 3)}, vgg_file)
    torch.save({"conv1.weight": torch.zeros(32, 3, 7, 7), "layer1.0.conv1.weight":
                torch.zeros(1)}, resnet_file)
    torch.save({"features.0.weight": torch.zeros(16, 3, 3, 3),
                "features.1.running_mean": torch.zeros(16)}, bn_file)
    resnet_spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0].model
    with pytest.raises(ValueError) as e:
        load_imagenet_backbone(str(vgg_file), resnet_spec)
    assert str(vgg_file) in str(e.value) and "model.backbone 'resnet'" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="it is a ResNet") as e:
        load_imagenet_backbone(str(resnet_file), _small().model)
    assert str(resnet_file) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="holds BatchNorm statistics.*model.norm 'none'"):
        load_imagenet_backbone(str(bn_file), _small().model)
    with pytest.raises(ValueError, match="no GN version") as e:
        load_imagenet_backbone(str(vgg_file), _small(norm="GN").model)
    assert str(vgg_file) in str(e.value) and "\n" not in str(e.value)


def test_vgg_needs_fpn_false_and_the_detectron2_engine_says_it_has_no_vgg(tmp_path):
    body = (REPO / "recipes/mini-vgg/study.yaml").read_text().replace("fpn: false", "fpn: true")
    with pytest.raises(SpecError, match="conv5 is at stride 8.*set model.fpn: false"):
        recipe.load(write_recipe(tmp_path, body))
    with pytest.raises(Untranslatable, match="detectron2 has no VGG backbone") as e:
        translate(PAPER.runs[0])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not a VGG depth"):
        build_backbone(_small(depth=15).model)


@pytest.mark.slow
def test_pretraining_a_vgg_pretrains_fc6_and_fc7_for_the_box_head(tmp_path, monkeypatch):
    from bench import pretrain
    from bench.spec import PretrainSpec
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    spec = _small()
    meta = pretrain.pretrain(spec.model, PretrainSpec(source="shapes-cls-tiny", epochs=1,
                                                      batch=16, lr=0.01),
                             "cache:pretrained/v.pth", log=lambda m: None)
    assert meta["box_head_fc_dim"] == 256
    state = load_imagenet_backbone("cache:pretrained/v.pth", spec.model)
    assert {k for k in state if k.startswith("box_head.")} == {
        "box_head.1.weight", "box_head.1.bias", "box_head.3.weight", "box_head.3.bias"}
    model = build_detector(spec.model, 8, spec.data)
    report = load_backbone_weights(model, state, log=lambda m: None)
    assert report["box_head"] == 4 and not report["missing"]
    assert torch.equal(model.roi_heads.box_head[3].weight, state["box_head.3.weight"])
