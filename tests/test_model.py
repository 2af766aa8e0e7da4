"""The detector as the paper trains it: nothing frozen from scratch; the whole backbone loaded
from the checkpoint when pre-trained; norms in backbone, FPN and heads."""

import math

import pytest
import torch
from torch import nn

from bench import recipe
from bench.backbones import build_backbone
from bench.engines.torchvision.model import build_detector, load_backbone_weights
from bench.imagenet import load_imagenet_backbone
from bench.norms import frozen_norms
from bench.pretrain import Classifier
from bench.spec import RunSpec, SpecError, replace
from conftest import REPO

STUDY = recipe.load(REPO / "recipes/mini/study.yaml")
SCRATCH = next(r for r in STUDY.runs if r.init == "scratch")
IMAGENET = next(r for r in STUDY.runs if r.init == "imagenet")


def detector(spec):
    return build_detector(spec.model, num_classes=8, data=spec.data)


def test_scratch_model_has_no_frozen_parameters_and_no_frozen_norm():
    model = detector(SCRATCH)
    assert all(p.requires_grad for p in model.parameters())
    assert frozen_norms(model) == []


def test_gn_is_in_backbone_fpn_box_head_and_mask_head():
    model = detector(SCRATCH)
    for part in (model.backbone.body, model.backbone.fpn, model.roi_heads.box_head,
                 model.roi_heads.mask_head):
        assert any(isinstance(m, nn.GroupNorm) for m in part.modules()), part.__class__.__name__
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_box_head_is_4conv_1fc():
    head = detector(SCRATCH).roi_heads.box_head
    assert sum(isinstance(m, nn.Conv2d) for m in head.modules()) == 4
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == 1


def test_frozen_bn_switch_exists_for_pretrained_runs():
    spec = replace(IMAGENET, **{"model.norm": "FrozenBN", "model.freeze_at": 2})
    model = detector(spec)
    assert frozen_norms(model)
    assert not model.backbone.body.conv1.weight.requires_grad
    assert not model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert model.backbone.body.layer2[0].conv1.weight.requires_grad


@pytest.fixture
def checkpoint(bench_data):
    """A classifier checkpoint in `bench pretrain`'s format, with non-init weights."""
    torch.manual_seed(1)
    clf = Classifier(build_backbone(IMAGENET.model), num_classes=24)
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p))
    path = bench_data / "pretrained" / "test-backbone.pth"
    path.parent.mkdir(exist_ok=True)
    torch.save({"backbone": clf.body.state_dict(), "meta": {"backbone": "resnet", "depth": 10,
                                                            "width": 32, "norm": "GN"}}, path)
    return "cache:pretrained/test-backbone.pth", clf.body.state_dict()


def test_pretrained_model_loads_every_backbone_weight(checkpoint):
    path, state = checkpoint
    model = detector(IMAGENET)
    report = load_backbone_weights(model, load_imagenet_backbone(path, IMAGENET.model), log=lambda m: None)
    body = model.backbone.body.state_dict()
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert set(body) == set(state)
    for k, v in body.items():
        assert torch.equal(v, state[k]), f"{k} left at its init"


def test_checkpoint_with_another_norm_is_refused(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match="norm='GN'.*model.norm='BN'"):
        load_imagenet_backbone(path, replace(IMAGENET.model, norm="BN"))


def test_missing_checkpoint_says_how_to_make_it():
    with pytest.raises(FileNotFoundError, match="bench pretrain"):
        load_imagenet_backbone("cache:pretrained/nope.pth", IMAGENET.model)


def test_faster_rcnn_has_no_mask_head():
    model = detector(replace(SCRATCH, **{"model.arch": "faster_rcnn"}))
    assert not hasattr(model.roi_heads, "mask_head") or model.roi_heads.mask_head is None


def test_batched_mask_paste_fills_each_box_and_agrees_with_torchvision():
    """Eval pastes all of an image's masks in one grid_sample (bench's paste_masks); it must
    put a mask where torchvision's per-detection loop does (which rounds boxes to whole
    pixels, so they differ by up to a pixel at the border) and fill exactly its box."""
    import torch
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from bench.engines.torchvision.model import paste_masks
    g = torch.Generator().manual_seed(0)
    n, h, w = 40, 128, 160
    m = torch.nn.functional.avg_pool2d(torch.rand(n, 1, 28, 28, generator=g), 5, 1, 2)
    lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
    m = (m - lo) / (hi - lo)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.5])
    boxes = torch.cat([xy, xy + 60 + torch.rand(n, 2, generator=g) * 40], 1)
    ours = paste_masks(m, boxes, h, w, chunk_pixels=h * w * 7) > 0.5   # several chunks
    theirs = paste_masks_in_image(m, boxes, (h, w)) > 0.5
    iou = (ours & theirs).flatten(1).sum(1) / (ours | theirs).flatten(1).sum(1)
    assert iou.min() > 0.93

    ones = paste_masks(torch.ones(1, 1, 28, 28), torch.tensor([[10.0, 20.0, 50.0, 40.0]]), h, w)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[20:40, 10:50] = True                  # pixel centres inside the box
    assert torch.equal(ones[0, 0] >= 0.5, inside)
    assert paste_masks(m[:0], boxes[:0], h, w).shape == (0, 1, h, w)


def test_frozen_stages_freeze_batchnorm_statistics_as_detectron2():
    """freeze_at=2 (detectron2's pre-trained configs): stem and res2 get no gradients and
    their BN layers become FrozenBatchNorm2d, so neither batch statistics nor running-stat
    updates reach them; later stages stay trainable BN."""
    from torchvision.ops import FrozenBatchNorm2d
    m = replace(SCRATCH.model, norm="BN", freeze_at=2)
    body = build_detector(m, num_classes=8, data=SCRATCH.data).backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert all(not isinstance(x, nn.BatchNorm2d) for x in body.layer1.modules())
    assert any(isinstance(x, nn.BatchNorm2d) for x in body.layer2.modules())
    assert not any(p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())
    before = body.bn1.running_mean.clone()
    body.train()
    body(torch.rand(2, 3, 64, 64))
    assert torch.equal(body.bn1.running_mean, before)


def test_r50_fpn_gn_mask_rcnn_has_detectron2s_parameter_count():
    """detectron2's Misc/scratch_mask_rcnn_R_50_FPN_3x_gn for COCO's 80 classes has
    45,711,152 parameters (counted from its build); ours must be the same model."""
    spec = recipe.load(REPO / "recipes/detectron2-zoo/r50_gn_3x.yaml").runs[0]
    model = build_detector(spec.model, num_classes=80, data=spec.data)
    assert sum(p.numel() for p in model.parameters()) == 45_711_152


def test_predictors_never_train_or_use_a_background_box_or_mask():
    """The zero background column/channel the predictors add for torchvision's RoI heads
    gets no gradient and leaves the foreground outputs as they are."""
    from bench.engines.torchvision.model import BoxPredictor, MaskPredictor
    box, mask = BoxPredictor(16, 3), MaskPredictor(8, 3)
    scores, deltas = box(torch.rand(5, 16))
    assert scores.shape == (5, 4) and deltas.shape == (5, 16)
    assert torch.equal(deltas[:, :4], torch.zeros(5, 4))
    logits = mask(torch.rand(5, 8, 14, 14))
    assert logits.shape == (5, 4, 28, 28) and not logits[:, 0].any()
    (deltas[:, :4].sum() + logits[:, 0].sum()).backward()
    assert box.bbox_pred.weight.grad is None or not box.bbox_pred.weight.grad.any()


def test_roi_pooler_matches_torchvision_unaligned_and_shifts_half_a_pixel_aligned():
    """RoIPooler picks the same FPN level per box as torchvision's MultiScaleRoIAlign (so,
    unaligned with ratio 2, it gives the same features), and aligned=True is RoIAlignV2."""
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign, roi_align

    from bench.engines.torchvision.model import RoIPooler
    g = torch.Generator().manual_seed(0)
    feats = OrderedDict((str(i), torch.rand(2, 4, 64 // 2 ** i, 64 // 2 ** i, generator=g))
                        for i in range(4))
    boxes = [torch.tensor([[0.0, 0, 20, 20], [10, 10, 250, 250]]),
             torch.tensor([[5.0, 5, 60, 90], [0, 0, 255, 255], [30, 30, 34, 34]])]
    shapes = [(256, 256), (256, 256)]
    ours = RoIPooler(list(feats), 7, 2, aligned=False)(feats, boxes, shapes)
    theirs = MultiScaleRoIAlign(list(feats), 7, 2)(feats, boxes, shapes)
    assert torch.allclose(ours, theirs)
    aligned = RoIPooler(list(feats), 7, 0, aligned=True)(feats, boxes, shapes)
    small = roi_align(feats["0"], torch.tensor([[0.0, 0, 0, 20, 20]]), 7, spatial_scale=0.25,
                      sampling_ratio=0, aligned=True)       # a 20 px box is pooled from P2
    assert torch.allclose(aligned[0], small[0]) and not torch.allclose(aligned, ours)


def test_torchvision_weights_come_from_torchs_cache_and_say_how_to_get_them(tmp_path,
                                                                            monkeypatch):
    """`pretrained: torchvision:resnet18` reads torchvision's own cache file; offline and
    absent, it fails in one line naming the file and the URL (nothing is downloaded here)."""
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        load_imagenet_backbone("torchvision:resnet18", SCRATCH.model)
    msg = str(e.value)
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(target) in msg and "download.pytorch.org" in msg and "\n" not in msg

    state = torchvision.models.resnet18().state_dict()
    target.parent.mkdir(parents=True)
    torch.save(state, target)
    # (into the network it is: a ResNet-18 of another width is refused, tests/test_resnext.py)
    loaded = load_imagenet_backbone("torchvision:resnet18",
                                    replace(SCRATCH.model, norm="SyncBN", depth=18, width=64))
    assert torch.equal(loaded["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    with pytest.raises(ValueError, match="not torchvision ImageNet weights"):
        load_imagenet_backbone("torchvision:resnet18/NOPE", SCRATCH.model)


@pytest.mark.slow
def test_box_losses_are_detectron2s_l1_and_torchvisions_smooth_l1_at_beta_one_ninth():
    """The RPN and box-head box losses take model.box_loss_beta: 0 (L1, detectron2) by
    default; at 1/9 they are exactly torchvision's own losses."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork
    from bench.engines.torchvision import model as model_mod

    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96)]
    targets = [{"boxes": torch.tensor([[10., 12., 60., 70.], [30., 5., 90., 40.]]),
                "labels": torch.tensor([1, 2]), "masks": torch.zeros(2, 96, 96, dtype=torch.uint8)}]

    def losses(beta, torchvision_own=False):
        m = replace(SCRATCH.model, box_loss_beta=beta)
        torch.manual_seed(1)
        det = build_detector(m, 3, SCRATCH.data).train()
        model_mod.use_input_sizes(det, train=True)
        if torchvision_own:
            det.rpn.__class__, det.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
        torch.manual_seed(2)  # the same RPN and RoI sampling
        return {k: v.item() for k, v in det(images, targets).items()}

    l1, smooth, torchvision = losses(0.0), losses(1 / 9), losses(1 / 9, torchvision_own=True)
    assert smooth == torchvision
    for k in ("loss_classifier", "loss_objectness", "loss_mask"):
        assert l1[k] == smooth[k]
    for k in ("loss_box_reg", "loss_rpn_box_reg"):   # |x| > smooth-L1(x) for small errors
        assert l1[k] > smooth[k] > 0
    assert SCRATCH.model.box_loss_beta == 0.0


def test_imagenet_weights_of_one_norm_never_load_into_the_other(tmp_path):
    """A BN network's scale and bias would load by name into GN layers and mean nothing (and
    a GN one's into BN, with no statistics): refused in one line naming the file. BN,
    SyncBN and FrozenBN share their tensors, so a BN-trained backbone fine-tunes frozen."""
    gn, frozen = SCRATCH.model, replace(SCRATCH.model, norm="FrozenBN")
    bn_state = build_backbone(replace(gn, norm="BN")).body.state_dict()
    gn_state = build_backbone(gn).body.state_dict()
    torch.save(bn_state, tmp_path / "bn.pth")
    torch.save(gn_state, tmp_path / "gn.pth")
    for file, model, message in ((tmp_path / "bn.pth", gn, "holds BatchNorm statistics"),
                                 (tmp_path / "gn.pth", frozen, "holds no BatchNorm statistics")):
        with pytest.raises(ValueError, match=message) as e:
            load_imagenet_backbone(str(file), model)
        assert str(file) in str(e.value) and "\n" not in str(e.value)
    assert load_imagenet_backbone(str(tmp_path / "gn.pth"), gn).keys() == gn_state.keys()

    # `bench pretrain` checkpoints say their norm: a BN one loads into FrozenBN, not into GN
    torch.save({"backbone": bn_state, "meta": {"norm": "BN"}}, tmp_path / "pre.pth")
    state = load_imagenet_backbone(str(tmp_path / "pre.pth"), frozen)
    det = build_detector(frozen, num_classes=8, data=SCRATCH.data)
    assert load_backbone_weights(det, state, log=lambda m: None)["missing"] == []
    with pytest.raises(ValueError, match="trained with norm='BN'"):
        load_imagenet_backbone(str(tmp_path / "pre.pth"), gn)


def test_frozen_bn_freezes_the_backbone_only_and_the_fpn_and_heads_have_biases():
    """The classic fine-tuning baseline: frozen BN in the pre-trained backbone; the FPN and
    heads are new layers, so (as detectron2's Base-RCNN-FPN) no norm and trainable biases."""
    from torchvision.ops import FrozenBatchNorm2d
    det = build_detector(replace(IMAGENET.model, norm="FrozenBN"), num_classes=8,
                         data=IMAGENET.data)
    body = [m for m in det.backbone.body.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert len(body) > 10
    for part in (det.backbone.fpn, det.roi_heads.box_head, det.roi_heads.mask_head):
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in part.modules())
        convs = [m for m in part.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.bias is not None and c.bias.requires_grad for c in convs)
    # with GN, norms everywhere and no conv bias (the norm's bias stands in)
    gn = build_detector(IMAGENET.model, num_classes=8, data=IMAGENET.data)
    assert all(m.bias is None for m in gn.backbone.fpn.modules() if isinstance(m, nn.Conv2d))


def test_scratch_init_is_detectron2s_msra_convs_and_xavier_fpn_and_fc():
    """c2_msra_fill (normal, fan_out) for backbone and head convs; c2_xavier_fill (uniform
    within sqrt(3 / fan_in), zero bias) for the FPN convs and the box head's fc."""
    torch.manual_seed(0)
    det = detector(replace(SCRATCH, model=replace(SCRATCH.model, fpn_channels=256,
                                                  box_head_fc_dim=1024)))
    fc = next(m for m in det.roi_heads.box_head.modules() if isinstance(m, nn.Linear))
    lateral = det.backbone.fpn.inner_blocks[-1][0]
    for layer in (fc, lateral):
        fan_in = layer.weight[0].numel()
        bound = (3 / fan_in) ** 0.5
        assert layer.weight.abs().max() <= bound
        assert layer.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert layer.bias is None or not layer.bias.any()
    conv = det.roi_heads.box_head[0][0]  # the first of the 4 convs
    fan_out = conv.weight.shape[0] * conv.weight[0, 0].numel()
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)


def test_detectrons_inits_xavier_backbone_convs_and_msra_mask_logits_when_asked():
    """model.conv_init xavier: every backbone conv uniform within sqrt(3 / fan_in) (Caffe2's
    XavierFill, which Detectron's GN ResNets got); model.mask_logits_init msra: the 1x1 mask
    logits N(0, sqrt(2 / K)) (Detectron's MSRAFill), not detectron2's N(0, 0.001)."""
    torch.manual_seed(0)
    det = detector(replace(SCRATCH, **{"model.conv_init": "xavier",
                                       "model.mask_logits_init": "msra"}))
    convs = [m for m in det.backbone.body.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        bound = (3 / conv.weight[0].numel()) ** 0.5
        assert conv.weight.abs().max() <= bound
        if conv.weight.numel() > 1000:
            assert conv.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    logits = det.roi_heads.mask_predictor.mask_fcn_logits
    assert logits.weight.std().item() == pytest.approx((2 / 8) ** 0.5, rel=0.1)
    default = detector(SCRATCH).roi_heads.mask_predictor.mask_fcn_logits
    assert default.weight.std().item() == pytest.approx(0.001, rel=0.1)
    with pytest.raises(SpecError, match=r"model\.conv_init: 'he' is not allowed; allowed: "
                                        r"one of msra, xavier"):
        RunSpec.from_dict({"model": {"conv_init": "he"}}, "recipe.yaml:run")


def test_every_backbone_builder_takes_the_specs_conv_init_a_plugins_too():
    from bench.backbones import Backbone, build_backbone, register_backbone
    from bench.norms import msra_init_

    @register_backbone("test-two-convs")
    def two_convs(m):  # a plugin that only knows the suite's default init
        body = nn.Sequential(nn.Conv2d(3, 64, 7), nn.GroupNorm(8, 64), nn.Conv2d(64, 64, 3))
        return Backbone(msra_init_(body), ["0"], [64])
    torch.manual_seed(0)
    spec = replace(SCRATCH.model, backbone="test-two-convs", conv_init="xavier")
    for conv in (build_backbone(spec).body[0], build_backbone(spec).body[2]):
        bound = (3 / conv.weight[0].numel()) ** 0.5
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    stem = build_backbone(replace(spec, conv_init="msra")).body[0].weight
    assert stem.std().item() == pytest.approx((2 / (64 * 49)) ** 0.5, rel=0.1)


def test_mask_targets_are_detectron2s_binary_aligned_crops():
    """A RoI on a mask's exact pixel box gets an all-ones 28x28 target (half-pixel-aligned
    RoIAlign, thresholded at 0.5); torchvision's unaligned soft targets blur its border."""
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    from bench.engines.torchvision.model import detectron2_mask_targets
    mask = torch.zeros(1, 64, 64)
    mask[0, 10:38, 20:48] = 1
    box, idx = torch.tensor([[20., 10., 48., 38.]]), torch.tensor([0])
    ours = detectron2_mask_targets(mask, box, idx, 28)
    assert torch.equal(ours, torch.ones(1, 28, 28))
    soft = project_masks_on_boxes(mask, box, idx, 28)
    assert (soft < 1).any() and ((soft > 0) & (soft < 1)).any()
    half = detectron2_mask_targets(mask, torch.tensor([[6., 10., 34., 38.]]), idx, 28)
    assert set(half.unique().tolist()) == {0.0, 1.0}
    assert half[:, :, :14].sum() == 0 and half[:, :, 14:].all()


def test_a_replaced_pretrained_checkpoint_is_kept_aside(tmp_path, monkeypatch):
    """Pre-training again with other settings writes the same path; the backbone that
    finished runs started from stays on disk under another name."""
    from bench import pretrain
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained/x.pth").write_bytes(b"old weights")
    (tmp_path / "pretrained/x.json").write_text("{}")
    kept = pretrain.set_aside("cache:pretrained/x.pth")
    assert kept.name.startswith("x.replaced-") and kept.read_bytes() == b"old weights"
    assert kept.with_suffix(".json").is_file() and not (tmp_path / "pretrained/x.pth").exists()
    assert pretrain.set_aside("cache:pretrained/x.pth") is None


def test_anchors_are_detectron2s_exact_boxes_not_rounded_to_whole_pixels():
    """detectron2 centres an anchor of area size² and height/width ratio r on every
    stride-th pixel with corners at ±w/2, ±h/2; torchvision rounds the corners (an 8-pixel
    anchor at r = 0.5 became 12 x 6), which changed the positive anchors and RPN targets."""
    import math
    generator = detector(SCRATCH).rpn.anchor_generator
    for size, cell in zip(SCRATCH.model.anchor_sizes, generator.cell_anchors):
        for ratio, box in zip((0.5, 1.0, 2.0), cell):
            w = math.sqrt(size ** 2 / ratio)
            h = ratio * w
            assert box.tolist() == pytest.approx([-w / 2, -h / 2, w / 2, h / 2], abs=1e-5)
    assert generator.cell_anchors[0][0].tolist() != [-6.0, -3.0, 6.0, 3.0]  # torchvision's


def test_anchors_sit_at_strides_of_two_to_the_level_in_fp32_whatever_the_padded_size():
    """An image padded to 128 x 96 has a 2-cell-wide P6 (96 / 32 = 3, halved up): its
    anchors still step 64 pixels, as detectron2's, not 96 // 2 = 48 (torchvision's padded
    size // grid size; COCO's 800 x 1344 batches gave P6 a stride of 61). Features in bf16
    (AMP without GN) leave the anchors in fp32."""
    from torchvision.models.detection.image_list import ImageList
    generator = detector(SCRATCH).rpn.anchor_generator
    images = ImageList(torch.zeros(1, 3, 128, 96), [(128, 96)])
    features = [torch.zeros(1, 1, 128 // s, -(-96 // s), dtype=torch.bfloat16)
                for s in (4, 8, 16, 32, 64)]
    anchors = generator(images, features)[0]
    assert anchors.dtype == torch.float32
    p6 = anchors[-2 * 2 * 3:]  # 2 x 2 cells, 3 ratios each, in row-major order
    centres = (p6[:, :2] + p6[:, 2:]) / 2
    assert sorted(set(centres[:, 0].tolist())) == [0.0, 64.0]
    assert sorted(set(centres[:, 1].tolist())) == [0.0, 64.0]
    assert generator.cell_anchors[-1].dtype == torch.float32


def test_rpn_losses_are_normalized_by_the_anchors_a_batch_may_sample_as_detectron2():
    """detectron2 divides both RPN losses by batch_per_image x images even when an image
    has fewer anchors to sample (torchvision divides by those it sampled)."""
    model = detector(SCRATCH)
    rpn = model.rpn
    per_image = rpn.fg_bg_sampler.batch_size_per_image
    labels = [torch.tensor([1., 0., 0., -1.]), torch.tensor([0., 0., -1., -1.])]  # 5 sampled
    targets = [torch.ones(4, 4), torch.ones(4, 4)]
    objectness, deltas = torch.zeros(8, 1), torch.zeros(8, 4)
    objectness_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    assert objectness_loss.item() == pytest.approx(5 * math.log(2) / (2 * per_image))
    assert box_loss.item() == pytest.approx(4 / (2 * per_image))  # one positive, L1 of 4 ones


def test_box_deltas_are_decoded_in_fp32_as_detectron2():
    model = detector(SCRATCH)
    boxes = [torch.tensor([[10., 20., 50., 90.]])]
    deltas = torch.tensor([[0.1, -0.2, 0.3, 0.05]])
    for coder in (model.rpn.box_coder, model.roi_heads.box_coder):
        half = coder.decode(deltas.to(torch.bfloat16), boxes)
        assert half.dtype == torch.float32
        assert torch.equal(half, coder.decode(deltas.to(torch.bfloat16).float(), boxes))


def test_biases_train_at_bias_lr_factor_with_their_own_decay_as_detectron():
    """Detectron (Caffe2) trains every bias, GroupNorm's beta included, at twice the LR and
    without weight decay; GN's gamma at the LR without decay; conv and fc weights with
    decay. detectron2's BIAS_LR_FACTOR / WEIGHT_DECAY_BIAS express it, and so do we."""
    from bench.engines.torchvision.train import build_optimizer
    solver = replace(SCRATCH.solver, lr=0.02, bias_lr_factor=2.0, weight_decay_bias=0.0)
    det = build_detector(SCRATCH.model, num_classes=8, data=SCRATCH.data)
    setting = {id(p): (g["lr"], g["weight_decay"])
               for g in build_optimizer(det, solver).param_groups for p in g["params"]}
    named = dict(det.named_parameters())
    gn = det.backbone.body.bn1
    assert setting[id(gn.weight)] == (0.02, 0.0)                       # GN gamma
    assert setting[id(gn.bias)] == (0.04, 0.0)                         # GN beta: a bias
    assert setting[id(det.backbone.body.conv1.weight)] == (0.02, 1e-4)
    assert setting[id(named["roi_heads.box_predictor.cls_score.bias"])] == (0.04, 0.0)
    assert setting[id(named["roi_heads.box_predictor.cls_score.weight"])] == (0.02, 1e-4)
    assert len(setting) == len(named)
    # a bias LR alone keeps each kind's decay (detectron2's WEIGHT_DECAY_BIAS None)
    only_lr = {id(p): (g["lr"], g["weight_decay"]) for g in build_optimizer(
        det, replace(solver, weight_decay_bias=None)).param_groups for p in g["params"]}
    assert only_lr[id(gn.bias)] == (0.04, 0.0)
    assert only_lr[id(named["roi_heads.box_predictor.cls_score.bias"])] == (0.04, 1e-4)
    # the defaults keep detectron2's: one LR, biases decayed as weights, norms not
    plain = build_optimizer(det, replace(solver, bias_lr_factor=1.0, weight_decay_bias=None))
    assert [(g["lr"], g["weight_decay"]) for g in plain.param_groups] == [(0.02, 1e-4),
                                                                          (0.02, 0.0)]


def test_a_pretrained_checkpoint_of_another_scratch_init_is_not_reused(tmp_path, monkeypatch):
    """bench pretrain builds its backbone with the run's conv_init: a checkpoint made with
    one init does not count as done for a spec asking for the other (older checkpoints,
    which record none, count as MSRA)."""
    from bench import pretrain
    from bench.spec import PretrainSpec
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    p = PretrainSpec()
    msra, xavier = SCRATCH.model, replace(SCRATCH.model, conv_init="xavier")
    path = "cache:pretrained/init-test.pth"
    file = pretrain.resolve_cache_path(path)
    file.parent.mkdir(parents=True)
    for made, other in ((xavier, msra), (msra, xavier)):
        torch.save({"meta": pretrain.output_meta(made, p)}, file)
        assert pretrain.is_done(path, made, p) and not pretrain.is_done(path, other, p)
    old = {k: v for k, v in pretrain.output_meta(msra, p).items() if k != "conv_init"}
    torch.save({"meta": old}, file)
    assert pretrain.is_done(path, msra, p)
