"""Cascade R-CNN (Fig. 5, Table 3): three box stages at IoU 0.5 / 0.6 / 0.7, each with its own
box head and class-agnostic regression, in the torchvision engine and translated to
detectron2's CascadeROIHeads. That both engines compute the same losses, gradients and
detections from the same weights is checked in tests/test_detectron2_engine.py."""

import dataclasses

import pytest
import torch
from torch import nn

from bench import recipe
from bench.engines.detectron2.config import Untranslatable, flatten, translate
from bench.engines.torchvision.model import CascadeRoIHeads, build_detector
from bench.spec import SpecError
from conftest import REPO, write_recipe

MINI = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]


def _spec(**model):
    return dataclasses.replace(MINI, model=dataclasses.replace(
        MINI.model, roi_heads="cascade", **model))


def _batch():
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    masks = torch.zeros(2, 128, 128, dtype=torch.uint8)
    masks[0, 10:70, 10:60] = 1
    masks[1, 40:120, 30:100] = 1
    targets = [{"boxes": torch.tensor([[10., 10, 60, 70], [30, 40, 100, 120]]),
                "labels": torch.tensor([1, 2]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 128, 128, dtype=torch.uint8)}]  # no object at all
    return images, targets


def test_a_cascade_has_three_box_heads_each_with_class_agnostic_regression():
    spec = _spec()
    model = build_detector(spec.model, 5, spec.data)
    heads = model.roi_heads
    assert isinstance(heads, CascadeRoIHeads)
    assert len(heads.box_head) == len(heads.box_predictor) == 3
    assert heads.stage_ious == (0.5, 0.6, 0.7)
    assert [c.weights for c in heads.stage_coders] == [(10., 10., 5., 5.), (20., 20., 10., 10.),
                                                       (30., 30., 15., 15.)]
    for predictor in heads.box_predictor:
        assert predictor.bbox_pred.out_features == 4      # one box per RoI, whatever its class
        assert predictor.cls_score.out_features == 6      # 5 classes and background
    # the stages do not share weights, and each head is the plain model's 4conv+1fc head
    plain = build_detector(MINI.model, 5, MINI.data).roi_heads.box_head
    assert heads.box_head[0] is not heads.box_head[1]
    assert all(sum(p.numel() for p in h.parameters()) == sum(p.numel() for p in plain.parameters())
               for h in heads.box_head)


def test_a_cascade_trains_every_stage_and_its_losses_are_weighted_per_stage():
    torch.manual_seed(0)
    spec = _spec()
    model = build_detector(spec.model, 3, spec.data).train()
    images, targets = _batch()
    torch.manual_seed(1)
    losses = model(images, targets)
    assert sorted(losses) == sorted(
        ["loss_objectness", "loss_rpn_box_reg", "loss_mask"]
        + [f"loss_{kind}_stage{k}" for k in range(3) for kind in ("classifier", "box_reg")])
    sum(losses.values()).backward()
    for k in range(3):  # every stage's head and predictor learns
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in model.roi_heads.box_predictor[k].parameters())
    # the Cascade R-CNN authors' stage weights 1, 0.5, 0.25 scale the same losses
    torch.manual_seed(0)
    weighted = build_detector(_spec(cascade_loss_weights=(1.0, 0.5, 0.25)).model, 3,
                              spec.data).train()
    torch.manual_seed(1)
    other = weighted(images, targets)
    for k, w in enumerate((1.0, 0.5, 0.25)):
        for kind in ("classifier", "box_reg"):
            key = f"loss_{kind}_stage{k}"
            assert other[key].item() == pytest.approx(w * losses[key].item(), rel=1e-5)


def test_the_backbone_gets_each_stages_gradient_divided_by_the_number_of_stages():
    # detectron2 scales the pooled features' gradient by 1 / stages: stage 0's classifier
    # loss reaches the features with a third of what the same head gives them in the plain
    # model (same weights, same sampled RoIs)
    torch.manual_seed(0)
    cascade = build_detector(_spec(arch="faster_rcnn").model, 3, MINI.data).train().roi_heads
    plain = build_detector(dataclasses.replace(MINI.model, arch="faster_rcnn"), 3,
                           MINI.data).train().roi_heads
    plain.box_head.load_state_dict(cascade.box_head[0].state_dict())
    plain.box_predictor.cls_score.load_state_dict(cascade.box_predictor[0].cls_score.state_dict())
    proposals = [torch.tensor([[10., 10, 60, 70], [30, 40, 100, 120], [5, 5, 20, 20]])]
    targets = [{"boxes": torch.tensor([[10., 10, 60, 70]]), "labels": torch.tensor([1])}]
    grads = []
    for heads, key in ((cascade, "loss_classifier_stage0"), (plain, "loss_classifier")):
        heads.box_roi_pool.featmap_names = ["0"]
        features = {"0": torch.randn(1, 32, 32, 32, generator=torch.Generator().manual_seed(3),
                                     requires_grad=True)}
        torch.manual_seed(2)
        _, losses = heads(features, proposals, [(128, 128)], targets)
        losses[key].backward()
        grads.append(features["0"].grad)
    assert grads[1].abs().sum() > 0
    assert torch.allclose(3 * grads[0], grads[1], atol=1e-7)


def test_a_cascade_detects_with_masks_and_averages_the_stages_scores():
    torch.manual_seed(0)
    spec = _spec()
    model = build_detector(spec.model, 3, spec.data).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])[0]
    assert len(out["boxes"]) > 0
    assert out["masks"].shape == (len(out["boxes"]), 1, 128, 128)
    assert out["scores"].min() > spec.model.score_thresh
    assert (out["labels"] >= 1).all() and (out["labels"] <= 3).all()


def test_cascade_runs_are_named_apart_from_the_plain_ones(tmp_path):
    path = write_recipe(tmp_path, f"""
study: casc
base: {REPO / 'recipes/mini/_model.yaml'}
run: {{model: {{roi_heads: cascade}}}}
vary: {{schedule: [2x]}}
compare: {{init: [scratch, imagenet]}}
""")
    run = recipe.load(path).runs[0]
    assert run.name.startswith("cascade_mask_rcnn-resnet10-GN-scratch-2x")


@pytest.mark.parametrize("model,message", [
    ({"cascade_ious": [0.5, 0.6]}, "model.cascade_bbox_reg_weights has 3 stages but "
                                   "model.cascade_ious has 2"),
    ({"cascade_ious": [0.6, 0.7, 0.8]}, "the first at 0.5"),
    ({"cascade_ious": [0.5, 0.6, 1.2]}, "each IoU must be between 0 and 1"),
    ({"cascade_bbox_reg_weights": [[10, 10, 5], [20, 20, 10, 10], [30, 30, 15, 15]]},
     "each stage needs 4 positive weights"),
    ({"cascade_loss_weights": [1, -1, 1]}, "must not be negative"),
])
def test_a_malformed_cascade_is_one_line_naming_the_key(tmp_path, model, message):
    fields = ", ".join(f"{k}: {v}" for k, v in model.items())
    path = write_recipe(tmp_path, f"""
study: casc
base: {REPO / 'recipes/mini/_model.yaml'}
run: {{model: {{roi_heads: cascade, {fields}}}}}
vary: {{schedule: [2x]}}
compare: {{init: [scratch, imagenet]}}
""")
    with pytest.raises(SpecError, match=message) as e:
        recipe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_detectron2_gets_its_cascade_heads_and_refuses_stage_weights_it_cannot_express():
    spec = next(s for s in recipe.load(REPO / "recipes/parity/pair.yaml").runs)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, roi_heads="cascade"))
    cfg = flatten(translate(spec))
    # as detectron2's configs/Misc/cascade_mask_rcnn_R_50_FPN_3x.yaml and its defaults
    assert cfg["MODEL.ROI_HEADS.NAME"] == "CascadeROIHeads"
    assert cfg["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"] is True
    assert cfg["MODEL.ROI_BOX_CASCADE_HEAD.IOUS"] == [0.5, 0.6, 0.7]
    assert cfg["MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS"] == [
        [10, 10, 5, 5], [20, 20, 10, 10], [30, 30, 15, 15]]
    plain = flatten(translate(dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, roi_heads="standard"))))
    assert plain["MODEL.ROI_HEADS.NAME"] == "StandardROIHeads"
    assert plain["MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG"] is False
    weighted = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, cascade_loss_weights=(1.0, 0.5, 0.25)))
    with pytest.raises(Untranslatable, match="weighs every stage 1"):
        translate(weighted)


def test_a_vgg_cascade_starts_every_stages_fc6_fc7_from_the_checkpoint():
    from bench.engines.torchvision.model import load_backbone_weights
    vgg = recipe.load(REPO / "recipes/mini-vgg/study.yaml").runs[0]
    spec = dataclasses.replace(vgg, model=dataclasses.replace(vgg.model, roi_heads="cascade"))
    model = build_detector(spec.model, 3, spec.data)
    body = model.backbone.body.state_dict()
    head = {f"box_head.{k}": torch.full_like(v, 0.5)
            for k, v in model.roi_heads.box_head[0].state_dict().items()}
    load_backbone_weights(model, {**body, **head}, log=lambda *_: None)
    for stage in model.roi_heads.box_head:
        assert all((p == 0.5).all() for p in stage.parameters())
    assert isinstance(model.roi_heads.box_head, nn.ModuleList)

