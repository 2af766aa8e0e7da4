"""The detectron2 engine: the same recipes trained by detectron2's own trainer into the same
run-dir format. What needs no detectron2 (recipe checks, weight renaming, the parity study,
the one-line answer when it is missing) runs everywhere; training runs when detectron2 is
importable and skips with that reason when it is not."""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import checkpoint, per_image, recipe, schedule
from bench.analysis.bootstrap import Accumulator
from bench.backbones import build_backbone
from bench.engines.detectron2.weights import to_detectron2
from bench.rundir import RunDir
from bench.spec import SpecError
from conftest import REPO, make_coco_layout, write_recipe

HAS_D2 = importlib.util.find_spec("detectron2") is not None
needs_d2 = pytest.mark.skipif(not HAS_D2, reason="detectron2 is not installed (an optional "
                                                 "engine; README: The detectron2 engine)")

# The mini model at the sizes detectron2 can build (R18 is 64 wide there, GN has 32 groups),
# 96 px so that a CPU step is cheap; 40 iterations at batch 2: train rows at 20 and 40.
D2_STUDY = f"""
study: {{study}}
base: {REPO}/recipes/mini/_model.yaml
run:
  engine: {{engine}}
  pretrained: cache:pretrained/d2test-resnet18-w64-GN.pth
  model: {{{{depth: 18, width: 64, norm_groups: 32}}}}
  data: {{{{dataset: shapes-tiny, train_min_size: 96, train_max_size: 96, test_min_size: 96,
          test_max_size: 96}}}}
  solver: {{{{batch: 2, ref_batch: 2, base_lr: 0.08, drops_from_end: [16, 4], warmup_iters: 5}}}}
  eval: {{{{period: 20}}}}
  checkpoint: {{{{period: 20, keep: 1}}}}
vary:
  schedule: [40iter]
compare:
  init: [scratch, imagenet]
"""


def d2_study(tmp_path, engine="detectron2", study="d2test", name="study.yaml"):
    return recipe.load(write_recipe(tmp_path, D2_STUDY.format(study=study, engine=engine), name))


# -- without detectron2: pure data ---------------------------------------------------------

def test_a_run_detectron2_cannot_build_is_a_recipe_error_naming_the_key(tmp_path):
    with pytest.raises(SpecError, match=r"engine detectron2: model.depth 10: detectron2's "
                                        r"ResNets are 18, 34, 50, 101, 152"):
        recipe.load(REPO / "recipes/mini/study.yaml", recipe.parse_overrides(
            ["engine=detectron2"]))
    text = D2_STUDY.format(study="x", engine="detectron2").replace("norm_groups: 32",
                                                                  "norm_groups: 8")
    with pytest.raises(SpecError, match=r"model.norm_groups 8: detectron2's GN has 32 groups"):
        recipe.load(write_recipe(tmp_path, text))


def test_both_engines_runs_differ_in_name_and_id_only_by_the_engine(tmp_path):
    tv, d2 = d2_study(tmp_path, "torchvision", name="a.yaml"), d2_study(tmp_path, name="b.yaml")
    for a, b in zip(tv.runs, d2.runs):
        assert b.name == a.name + "-detectron2" and a.run_id != b.run_id
        assert dataclasses.replace(b, engine="torchvision", name=a.name) == a


@pytest.mark.slow
@pytest.mark.parametrize("depth,norm", [(18, "GN"), (50, "FrozenBN")])
def test_our_resnet_weights_take_detectron2s_names_and_bgr_order(depth, norm):
    spec = recipe.load(REPO / "recipes/parity/pair.yaml").runs[0]
    model = dataclasses.replace(spec.model, depth=depth, norm=norm)
    ours = build_backbone(model).body.state_dict()
    theirs = to_detectron2({**ours, "fc.weight": torch.zeros(1)})
    assert "stem.conv1.norm.weight" in theirs and "res5.1.conv2.norm.bias" in theirs
    assert "res3.0.shortcut.weight" in theirs and "res3.0.shortcut.norm.weight" in theirs
    assert not any("fc." in k or "num_batches_tracked" in k for k in theirs)
    # every tensor but BN's counters has exactly one place
    assert len(theirs) == len([k for k in ours if not k.endswith("num_batches_tracked")])
    assert torch.equal(theirs["stem.conv1.weight"], ours["conv1.weight"][:, [2, 1, 0]])
    assert torch.equal(theirs["res4.0.conv1.weight"], ours["layer3.0.conv1.weight"])
    with pytest.raises(ValueError, match="'head.weight' is not a ResNet weight"):
        to_detectron2({"head.weight": torch.zeros(1)}, "x.pth")


@needs_d2
def test_a_backbone_of_another_shape_is_one_line_naming_the_tensor_in_detectron2s_resnet(
        tmp_path):
    # load_state_dict's size mismatch is a multi-line RuntimeError, which escaped preflight
    from bench import engines
    from bench.engines.detectron2.train import load_backbone_state
    spec = next(s for s in d2_study(tmp_path).runs if s.init == "imagenet")
    state = build_backbone(spec.model).body.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # 3x3 in a ResNet-18
    model = engines.get("detectron2").build_model(spec, 1)
    with pytest.raises(ValueError, match=r"does not fit detectron2's ResNet-18 \(shape of "
                                         r"res2.0.conv1.weight: \(64, 64, 1, 1\)") as e:
        load_backbone_state(model, spec, state, log=lambda m: None)
    assert "\n" not in str(e.value) and "pre-train a matching backbone" in str(e.value)


def test_the_parity_study_runs_every_pair_through_both_engines(tmp_path):
    from bench import parity
    study = recipe.load(REPO / "recipes/parity/pair.yaml")
    parity.check(study)
    # ten seeds of each arm through each engine
    assert sorted(s.engine for s in study.runs) == ["detectron2"] * 20 + ["torchvision"] * 20
    assert sorted({s.seed for s in study.runs}) == list(range(10))
    with pytest.raises(SpecError, match=r"a parity study varies `engine: \[torchvision, "
                                        r"detectron2\]`; this one runs torchvision only"):
        parity.check(recipe.load(REPO / "recipes/mini/study.yaml"))


def test_bench_parity_pools_seeds_and_compares_final_aps_only(tmp_path):
    from bench import parity
    study = recipe.load(REPO / "recipes/parity/pair.yaml",
                        recipe.parse_overrides(["vary.seed=[0, 1, 2]"]))
    final = study.runs[0].solver.max_iter
    ap = {("torchvision", 0): 30.0, ("torchvision", 1): 34.0, ("torchvision", 2): 32.0,
          ("detectron2", 0): 31.0, ("detectron2", 1): 32.0, ("detectron2", 2): 31.5}
    for spec in study.runs:
        rd = RunDir(tmp_path / spec.study / spec.run_id)
        rd.write_spec(spec)
        rd.append_metrics({"type": "train", "iteration": 20, "time": 0.5})
        rd.append_metrics({"type": "eval", "iteration": 360, "bbox/AP": 99.0, "segm/AP": 99.0})
        unfinished = spec.init == "imagenet" and spec.engine == "detectron2" and spec.seed == 1
        if not unfinished:  # its last evaluation is not a final AP
            rd.append_metrics({"type": "eval", "iteration": final,
                               "bbox/AP": ap[spec.engine, spec.seed], "segm/AP": 20.0})
        rd.write_status("running" if unfinished else "done")
    table = parity.rows(study, tmp_path, count=lambda spec: 1000)
    scratch, imagenet = sorted(table, key=lambda row: "imagenet" in row["run"])
    assert "seed" not in scratch["run"] and scratch["seeds"] == "0,1,2"
    assert scratch["box AP tv"] == {"mean": 32.0, "min": 30.0, "max": 34.0, "n": 3, "of": 3}
    assert scratch["box AP tv-d2"] == pytest.approx(32.0 - 31.5)
    assert imagenet["box AP d2"]["n"] == 2 and imagenet["box AP tv-d2"] is None
    text = parity.format_table(table)
    assert "32.0 [30.0-34.0]" in text and "+0.5" in text and "31.2 [31.0-31.5] (2 of 3)" in text
    assert "3/3 done" in text and "2/3 done" in text and "99.0" not in text


@pytest.mark.slow  # bench.cli processes
@pytest.mark.skipif(HAS_D2, reason="detectron2 is installed here")
@pytest.mark.parametrize("cmd", ["run", "parity"])
def test_without_detectron2_asking_for_it_is_one_line_saying_how_to_install_it(tmp_path, cmd):
    path = REPO / "recipes/parity/pair.yaml" if cmd == "parity" else \
        write_recipe(tmp_path, D2_STUDY.format(study="x", engine="detectron2"))
    out = subprocess.run([sys.executable, "-m", "bench.cli", cmd, str(path),
                          "--runs-root", str(tmp_path / "runs")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith(f"bench {cmd}: engine detectron2 needs detectron2")
    assert "pip install --no-build-isolation" in out.stderr
    assert "engine: torchvision, which needs nothing more" in out.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.jsonl"))


def test_a_detectron2_detectors_weights_take_the_torchvision_engines_names():
    # detectron2's names for the parity model's tensors, as its build_model gives them
    # (checked against the real model where detectron2 is installed, below)
    from bench.engines.detectron2.weights import detector_from_detectron2
    d2 = {"backbone.bottom_up.stem.conv1.weight": torch.arange(6.).reshape(1, 3, 1, 2),
          "backbone.bottom_up.stem.conv1.norm.bias": torch.zeros(1),
          "backbone.bottom_up.res3.0.shortcut.weight": torch.zeros(1),
          "backbone.bottom_up.res3.0.shortcut.norm.weight": torch.zeros(1),
          "backbone.bottom_up.res5.1.conv2.norm.weight": torch.zeros(1),
          "backbone.bottom_up.res4.0.conv1.norm.num_batches_tracked": torch.zeros(1),  # BN
          "backbone.fpn_lateral2.weight": torch.zeros(1),
          "backbone.fpn_output5.norm.bias": torch.zeros(1),
          "proposal_generator.rpn_head.anchor_deltas.weight": torch.zeros(1),
          "roi_heads.box_head.conv1.weight": torch.zeros(1),
          "roi_heads.box_head.conv4.norm.weight": torch.zeros(1),
          "roi_heads.box_head.fc1.weight": torch.zeros(1),
          "roi_heads.box_predictor.cls_score.bias": torch.tensor([1., 2., 0.]),  # bg last
          "roi_heads.mask_head.mask_fcn2.norm.bias": torch.zeros(1),
          "roi_heads.mask_head.deconv.weight": torch.zeros(1),
          "roi_heads.mask_head.predictor.bias": torch.zeros(1)}
    ours = detector_from_detectron2(d2)
    assert sorted(ours) == sorted([
        "backbone.body.conv1.weight", "backbone.body.bn1.bias",
        "backbone.body.layer2.0.downsample.0.weight",
        "backbone.body.layer2.0.downsample.1.weight", "backbone.body.layer4.1.bn2.weight",
        "backbone.body.layer3.0.bn1.num_batches_tracked",
        "backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.layer_blocks.3.1.bias",
        "rpn.head.bbox_pred.weight", "roi_heads.box_head.0.0.weight",
        "roi_heads.box_head.3.1.weight", "roi_heads.box_head.5.weight",
        "roi_heads.box_predictor.cls_score.bias", "roi_heads.mask_head.1.1.bias",
        "roi_heads.mask_predictor.conv5_mask.weight",
        "roi_heads.mask_predictor.mask_fcn_logits.bias"])
    assert torch.equal(ours["backbone.body.conv1.weight"],
                       d2["backbone.bottom_up.stem.conv1.weight"][:, [2, 1, 0]])  # BGR -> RGB
    assert ours["roi_heads.box_predictor.cls_score.bias"].tolist() == [0., 1., 2.]  # bg first
    with pytest.raises(ValueError, match="roi_heads.keypoint_head.x: not a weight of "
                                         "detectron2's R-FPN"):
        detector_from_detectron2({"roi_heads.keypoint_head.x": torch.zeros(1)})


# -- with detectron2 -----------------------------------------------------------------------

def _crop(image, target, width):
    """The left `width` columns of an image and its objects (boxes clipped, those left
    under a pixel wide dropped): a non-square input from the square embedded data."""
    boxes = target["boxes"].clone()
    boxes[:, 2] = boxes[:, 2].clamp(max=width)
    keep = boxes[:, 2] - boxes[:, 0] >= 1
    out = dict(target, boxes=boxes[keep], labels=target["labels"][keep])
    if "masks" in target:
        out["masks"] = target["masks"][keep][:, :, :width].contiguous()
    return image[:, :, :width].contiguous(), out


def _one_batch_through_both_engines(arch, images=4, width=96):
    """The loss terms and parameter gradients of one training forward/backward pass of the
    torchvision engine's model and of detectron2's, holding the same weights (detectron2's
    init, mapped) and reading the same images, flips and targets. Both engines' samplers
    draw with torch.randperm; the caller makes it the identity, so both take the same
    anchors and RoIs and every difference left is one of computation. The images are cut to
    128 x `width`: at 96 the padded width over 32 is odd, which is where the engines' P6
    anchor strides once differed."""
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage
    from bench.engines.detectron2.train import LOSS_KEYS, detectron2_cfg
    from bench.engines.detectron2.weights import detector_from_detectron2
    from bench.engines.torchvision.model import build_detector, use_input_sizes
    from bench.engines.torchvision.train import datasets_for
    spec = next(s for s in recipe.load(REPO / "recipes/parity/pair.yaml").runs
                if s.init == "scratch")
    heads = "cascade" if arch.startswith("cascade_") else "standard"
    spec = dataclasses.replace(spec, model=dataclasses.replace(
        spec.model, arch=arch.replace("cascade_", ""), roi_heads=heads))
    train_set, _ = datasets_for(spec)
    classes = len(train_set.cat_ids)
    torch.manual_seed(0)
    theirs = build_model(detectron2_cfg(spec, classes)).train()
    ours = build_detector(spec.model, classes, spec.data).train()
    ours.load_state_dict(detector_from_detectron2(theirs.state_dict()))
    use_input_sizes(ours, train=True)
    batch = [_crop(*train_set.get(i, hflip=i % 2 == 1), width) for i in range(images)]
    inputs = []
    for image, target in batch:
        gt = Instances(tuple(image.shape[1:]), gt_boxes=Boxes(target["boxes"].clone()),
                       gt_classes=target["labels"] - 1)  # detectron2's classes have no background
        if "masks" in target:
            gt.gt_masks = BitMasks(target["masks"].bool())
        inputs.append({"image": image.flip(0), "instances": gt})  # BGR
    # the anchors both engines lay over the same padded batch
    image_list, _ = ours.transform([image.float() / 255 for image, _ in batch])
    features = list(ours.backbone(image_list.tensors).values())
    our_anchors = ours.rpn.anchor_generator(image_list, features)[0]
    their_anchors = torch.cat([a.tensor for a in theirs.proposal_generator.anchor_generator(
        features)])
    assert torch.equal(our_anchors, their_anchors)
    our_losses = ours([image.float() / 255 for image, _ in batch], [dict(t) for _, t in batch])
    with EventStorage(0):
        their_losses = theirs(inputs)
    sum(our_losses.values()).backward()
    sum(their_losses.values()).backward()
    their_grads = detector_from_detectron2({k: p.grad for k, p in theirs.named_parameters()})
    our_grads = {k: p.grad for k, p in ours.named_parameters()}
    their_losses = {LOSS_KEYS[k]: v.item() for k, v in their_losses.items()}
    return {k: v.item() for k, v in our_losses.items()}, their_losses, our_grads, their_grads


@needs_d2
@pytest.mark.parametrize("solver", [{}, {"bias_lr_factor": 2.0, "weight_decay_bias": 0.0},
                                    {"bias_lr_factor": 2.0}, {"weight_decay_bias": 0.0}],
                         ids=["detectron2 defaults", "Detectron's 2x bias LR, no bias decay",
                              "2x bias LR only", "no bias decay only"])
def test_both_engines_optimizers_give_every_parameter_the_same_lr_momentum_and_decay(solver):
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer as d2_optimizer
    from bench.engines.detectron2.train import detectron2_cfg
    from bench.engines.detectron2.weights import torchvision_names
    from bench.engines.torchvision.model import build_detector
    from bench.engines.torchvision.train import build_optimizer
    spec = next(s for s in recipe.load(REPO / "recipes/parity/pair.yaml").runs
                if s.init == "scratch")
    spec = dataclasses.replace(spec, solver=dataclasses.replace(spec.solver, **solver))
    cfg = detectron2_cfg(spec, 8)
    theirs, ours = build_model(cfg), build_detector(spec.model, 8, spec.data)

    def settings(optimizer, model):
        name = {id(p): n for n, p in model.named_parameters()}
        return {name[id(p)]: (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"])
                for g in optimizer.param_groups for p in g["params"]}
    mine = settings(build_optimizer(ours, spec.solver), ours)
    their = settings(d2_optimizer(cfg, theirs), theirs)
    assert mine == {torchvision_names(their)[k]: v for k, v in their.items()}
    assert {decay for _, _, decay, _ in mine.values()} == {1e-4, 0.0}  # norms: no decay
    assert len({lr for lr, _, _, _ in mine.values()}) == (2 if "bias_lr_factor" in solver else 1)


@pytest.mark.slow
@needs_d2
@pytest.mark.parametrize("flip", [False, True])
def test_each_engines_own_data_pipeline_gives_the_same_pixels_boxes_classes_and_masks(
        tmp_path, flip):
    # The loss comparison above feeds both models one batch; this holds what each engine
    # makes of a training image by itself: our CocoDetection.get against detectron2's
    # DatasetMapper under the translated config, the flip decision forced the same way. At
    # the images' own size (as the mini and parity recipes train), where detectron2's
    # ResizeShortestEdge is the identity; a resize is ours inside the model, theirs here.
    import detectron2.data.transforms as T
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper

    from bench.engines.detectron2 import config as d2_config
    from bench.engines.detectron2.data import register
    from bench.engines.torchvision.train import datasets_for

    spec = next(s for s in d2_study(tmp_path).runs if s.init == "imagenet")
    spec = dataclasses.replace(spec, data=dataclasses.replace(
        spec.data, train_min_size=128, train_max_size=128))  # shapes-tiny's own size
    ours, _ = datasets_for(spec)
    theirs = {d["image_id"]: d for d in DatasetCatalog.get(register(spec.data)[0])}
    cfg = get_cfg()
    cfg.merge_from_list([x for key, value in d2_config.flatten(d2_config.translate(spec)).items()
                         if key != "MODEL.WEIGHTS" for x in (key, value)])
    cfg.INPUT.MASK_FORMAT = "bitmask"  # what the engine sets for RLE masks (train._mask_format)
    mapper = DatasetMapper(cfg, is_train=True)
    augs = [a for a in mapper.augmentations.augs if not isinstance(a, T.RandomFlip)]
    mapper.augmentations = T.AugmentationList(augs + [T.RandomFlip(prob=float(flip))])
    assert len(ours) >= 60
    for index in range(len(ours)):
        image, target = ours.get(index, hflip=flip)
        out = mapper(dict(theirs[target["image_id"]]))
        instances = out["instances"]
        assert torch.equal(out["image"][[2, 1, 0]], image)  # theirs BGR, ours RGB
        assert torch.allclose(instances.gt_boxes.tensor, target["boxes"], atol=1e-4)
        assert torch.equal(instances.gt_classes + 1, target["labels"])  # ours: 0 background
        assert torch.equal(instances.gt_masks.tensor.to(torch.uint8), target["masks"])


@pytest.mark.slow
@needs_d2
@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn", "cascade_mask_rcnn"])
def test_the_same_weights_and_images_give_both_engines_the_same_losses_and_gradients(
        arch, monkeypatch):
    # Before SPEC_VERSION 4 the RPN losses differed here (torchvision's rounded anchors).
    monkeypatch.setattr(torch, "randperm",
                        lambda n, *a, device=None, **kw: torch.arange(n, device=device))
    ours, theirs, our_grads, their_grads = _one_batch_through_both_engines(arch)
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert sorted(our_grads) == sorted(their_grads)
    for key, grad in our_grads.items():
        # float32 through GroupNorm: the inputs differ by rounding (x / 255 then normalized,
        # or normalized from 0-255), and GN divides by small standard deviations
        diff = (grad - their_grads[key]).norm() / their_grads[key].norm().clamp(min=1e-12)
        assert diff < 1e-2, (key, diff.item())  # 3e-3 at most measured


def _same_random_detectors(spec, classes):
    """detectron2's model of `spec` and ours with its weights, in eval mode. The random
    model's class scores are made sharp (cls_score x 200) and its masks far from 0.5 (mask
    logits x 1000), so detections are not ties whose order is arbitrary."""
    from detectron2.modeling import build_model
    from bench.engines.detectron2.train import detectron2_cfg
    from bench.engines.detectron2.weights import detector_from_detectron2
    from bench.engines.torchvision.model import build_detector
    cfg = detectron2_cfg(spec, classes)
    torch.manual_seed(0)
    theirs = build_model(cfg).eval()
    with torch.no_grad():
        for p in theirs.roi_heads.box_predictor.modules():
            if getattr(p, "cls_score", None) is not None:
                p.cls_score.weight.mul_(200)
        if cfg.MODEL.MASK_ON:
            theirs.roi_heads.mask_head.predictor.weight.mul_(1000)
    ours = build_detector(spec.model, classes, spec.data).eval()
    ours.load_state_dict(detector_from_detectron2(theirs.state_dict()))
    return cfg, theirs, ours


def _same_detections(mine, their, most):
    """How many of the top detections agree (at least one, at most `most`): scores, classes,
    boxes and, where both have masks, the binary masks."""
    n = min(len(mine["scores"]), len(their), most)
    assert n > 0
    assert torch.allclose(mine["scores"][:n], their.scores[:n], atol=1e-4)
    assert torch.equal(mine["labels"][:n], their.pred_classes[:n] + 1)
    assert torch.allclose(mine["boxes"][:n], their.pred_boxes.tensor[:n], atol=1e-2)
    if "masks" in mine:
        a, b = mine["masks"][:n, 0] > 0.5, their.pred_masks[:n]
        union = (a | b).sum((1, 2))
        overlap = torch.where(union > 0, (a & b).sum((1, 2)) / union.clamp(min=1), 1.0)
        assert overlap.min() > 0.9, overlap  # (both empty: the same mask)
    return n


def _parity_spec(heads, arch="mask_rcnn", **eval_fields):
    spec = next(s for s in recipe.load(REPO / "recipes/parity/pair.yaml").runs
                if s.init == "scratch")
    return dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, arch=arch, roi_heads=heads),
        eval=dataclasses.replace(spec.eval, **eval_fields))


@pytest.mark.slow
@needs_d2
def test_the_same_cascade_weights_give_both_engines_the_same_detections():
    # Inference of Cascade R-CNN: three stages of RoIs, scores averaged over the stages,
    # the last stage's class-agnostic boxes, NMS per class.
    from bench.engines.torchvision.model import use_input_sizes
    from bench.engines.torchvision.train import datasets_for
    spec = _parity_spec("cascade", arch="faster_rcnn")
    _, val_set = datasets_for(spec)
    _, theirs, ours = _same_random_detectors(spec, len(val_set.cat_ids))
    use_input_sizes(ours, train=False)
    compared = 0
    for i in range(3):
        image, _ = val_set.get(i)
        with torch.no_grad():
            mine = ours([image.float() / 255])[0]
            their = theirs([{"image": image.flip(0), "height": image.shape[1],
                             "width": image.shape[2]}])[0]["instances"]
        compared += _same_detections(mine, their, 30)
    assert compared >= 30


@pytest.mark.slow
@needs_d2
@pytest.mark.parametrize("heads", ["standard", "cascade"])
def test_the_same_weights_give_both_engines_the_same_test_time_augmented_detections(heads):
    # detectron2's GeneralizedRCNNWithTTA against ours (bench/engines/torchvision/tta.py) at
    # the image's own size and flipped: the flip's mapping back, the merge NMS and the
    # averaged masks. (Other scales resample pixels, which the engines do differently:
    # PIL on uint8 there, torch on floats here.)
    from detectron2.modeling import GeneralizedRCNNWithTTA
    from bench.engines.torchvision import tta
    from bench.engines.torchvision.train import datasets_for
    spec = _parity_spec(heads, tta=True, tta_min_sizes=(128,), tta_flip=True)
    _, val_set = datasets_for(spec)
    cfg, theirs, ours = _same_random_detectors(spec, len(val_set.cat_ids))
    augmented = GeneralizedRCNNWithTTA(cfg, theirs, batch_size=1)
    compared = 0
    for i in range(3):
        image, _ = val_set.get(i)
        with torch.no_grad():
            mine = tta.detect(ours, image.float() / 255, (128,), 4000, True)
            their = augmented([{"image": image.flip(0), "height": image.shape[1],
                                "width": image.shape[2]}])[0]["instances"]
        compared += _same_detections(mine, their, 20)
    assert compared >= 20


@pytest.mark.slow
@needs_d2
def test_a_detectron2_cascade_run_writes_its_test_time_augmented_row_after_the_last_eval(
        tmp_path):
    spec = next(s for s in d2_study(tmp_path).runs if s.init == "scratch")
    spec = dataclasses.replace(
        spec, model=dataclasses.replace(spec.model, roi_heads="cascade"),
        eval=dataclasses.replace(spec.eval, tta=True, tta_min_sizes=(80, 96), tta_max_size=200),
        solver=dataclasses.replace(spec.solver, max_iter=20, steps=(12, 16)))
    rd = _train(spec, tmp_path / "run")
    rows = rd.read_metrics()
    assert [(r["type"], r["iteration"]) for r in rows if r["type"] != "train"] == \
        [("eval", 20), ("eval_tta", 20)]
    train = next(r for r in rows if r["type"] == "train")
    assert "loss_classifier_stage2" in train and "loss_box_reg_stage0" in train
    assert next(r for r in rows if r["type"] == "eval_tta")["tta"]["min_sizes"] == [80, 96]


def _train(spec, run_dir, engine_module=None):
    from bench.engines import get
    (engine_module or get(spec.engine)).run(spec, run_dir, log=lambda msg: None)
    return RunDir(run_dir)


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory):
    """The scratch run of the test study, trained by each engine."""
    tmp = tmp_path_factory.mktemp("engines")
    out = {}
    for engine in ("torchvision", "detectron2"):
        spec = next(s for s in d2_study(tmp, engine, name=f"{engine}.yaml").runs
                    if s.init == "scratch")
        out[engine] = (spec, _train(spec, tmp / engine))
    return out


@pytest.mark.slow
@needs_d2
def test_detectron2_writes_the_torchvision_engines_rows_keys_and_schedule(both_engines):
    tv_spec, tv = both_engines["torchvision"]
    spec, rd = both_engines["detectron2"]
    assert rd.read_status()["state"] == "done" and rd.read_status()["iteration"] == 40
    assert rd.read_spec() == spec
    rows, tv_rows = rd.read_metrics(), tv.read_metrics()
    assert [(r["type"], r["iteration"]) for r in rows] == \
        [(r["type"], r["iteration"]) for r in tv_rows] == \
        [("train", 20), ("eval", 20), ("train", 40), ("eval", 40)]
    for row, tv_row in zip(rows, tv_rows):
        assert set(row) == set(tv_row)
        assert all(v is None or isinstance(v, (int, float, str)) for v in row.values())
    for row in (r for r in rows if r["type"] == "train"):
        # detectron2's warm-up and step schedule is ours: the LR each logged iteration used
        lr = spec.solver.lr * schedule.lr_factor(spec.solver, row["iteration"] - 1)
        assert row["lr"] == pytest.approx(lr)
        assert all(row[k] > 0 for k in ("loss", "loss_classifier", "loss_mask", "time"))
    for row in (r for r in rows if r["type"] == "eval"):  # per-image results give the AP
        kept = per_image.load(rd.per_image_file(row["iteration"]))
        for task in ("bbox", "segm"):
            assert Accumulator(kept[task]).average_precision() == \
                pytest.approx(row[f"{task}/AP"], abs=1e-6)
    last = rows[-1]
    assert 0 <= last["bbox/AP"] <= 100 and 0 <= last["segm/AP"] <= 100
    assert last["detections"] > 0
    assert [p.name for p in rd.checkpoints.iterdir()] == ["model_0000040.pth"]  # keep: 1


@pytest.mark.slow
@needs_d2
def test_a_detectron2_run_with_detectrons_bias_lr_logs_the_base_lr_and_detectrons_inits(
        tmp_path):
    """With 2x LR on biases the optimizer holds two LRs; the row's lr is the schedule's base
    LR, as the torchvision engine logs it (detectron2's own LRScheduler hook would pick the
    group with the most parameters). The Detectron inits train too."""
    from bench.spec import replace
    spec = next(s for s in d2_study(tmp_path).runs if s.init == "scratch")
    spec = replace(spec, **{"solver.bias_lr_factor": 2.0, "solver.weight_decay_bias": 0.0,
                            "model.conv_init": "xavier", "model.mask_logits_init": "msra"})
    rd = _train(spec, tmp_path / "run")
    rows = [r for r in rd.read_metrics() if r["type"] == "train"]
    assert [r["iteration"] for r in rows] == [20, 40]
    for row in rows:
        assert row["lr"] == pytest.approx(
            spec.solver.lr * schedule.lr_factor(spec.solver, row["iteration"] - 1))
        assert math.isfinite(row["loss"])


@pytest.mark.slow
@needs_d2
def test_a_stopped_detectron2_run_resumes_where_it_stopped(tmp_path, monkeypatch, both_engines):
    from bench import interrupt
    from bench.engines.detectron2 import train as d2train
    spec, whole = both_engines["detectron2"]
    calls = {"n": 0}

    def stop_after_25():
        calls["n"] += 1
        return calls["n"] >= 25
    monkeypatch.setattr(interrupt, "requested", stop_after_25)
    with pytest.raises(interrupt.Stopped):
        _train(spec, tmp_path / "run", d2train)
    rd = RunDir(tmp_path / "run")
    assert rd.read_status()["state"] == "queued" and rd.read_status()["iteration"] == 25
    assert [it for it, _ in checkpoint.list_checkpoints(rd.checkpoints)] == [25]
    monkeypatch.setattr(interrupt, "requested", lambda: False)
    _train(spec, tmp_path / "run", d2train)
    rows = rd.read_metrics()
    assert [(r["type"], r["iteration"]) for r in rows] == \
        [(r["type"], r["iteration"]) for r in whole.read_metrics()]
    assert rows[2]["lr"] == pytest.approx(whole.read_metrics()[2]["lr"])
    assert rd.read_status()["state"] == "done"


@pytest.mark.slow
@needs_d2
def test_a_failed_detectron2_evaluation_keeps_its_checkpoint_and_is_redone(tmp_path,
                                                                          monkeypatch,
                                                                          both_engines):
    from bench.engines.detectron2 import train as d2train
    spec, whole = both_engines["detectron2"]
    first_eval = next(r["iteration"] for r in whole.read_metrics() if r["type"] == "eval")

    def broken(*a, **k):
        raise OSError("image val/5.jpg is unreadable")
    with monkeypatch.context() as m:
        m.setattr(d2train, "inference_on_dataset", broken)
        with pytest.raises(OSError, match="unreadable"):
            _train(spec, tmp_path / "run", d2train)
    rd = RunDir(tmp_path / "run")
    assert [it for it, _ in checkpoint.list_checkpoints(rd.checkpoints)] == [first_eval]
    _train(spec, tmp_path / "run", d2train)
    assert [(r["type"], r["iteration"]) for r in rd.read_metrics()] == \
        [(r["type"], r["iteration"]) for r in whole.read_metrics()]
    assert rd.read_status()["state"] == "done"


@pytest.mark.slow
@needs_d2
def test_the_pretrained_side_starts_from_the_checkpoint_in_detectron2s_resnet(tmp_path):
    from detectron2.modeling import build_model
    from bench.engines.detectron2.train import _load_backbone, detectron2_cfg
    from bench.paths import resolve_cache_path
    spec = next(s for s in d2_study(tmp_path).runs if s.init == "imagenet")
    body = build_backbone(spec.model).body
    file = resolve_cache_path(spec.pretrained)
    file.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": "resnet", "depth": 18, "width": 64, "norm": "GN"}
    torch.save({"backbone": body.state_dict(), "meta": meta}, file)
    model = build_model(detectron2_cfg(spec, num_classes=3))
    _load_backbone(model, spec, log=lambda msg: None)
    loaded = model.backbone.bottom_up
    assert torch.equal(loaded.res5[1].conv2.weight, body.layer4[1].conv2.weight)
    assert torch.equal(loaded.stem.conv1.weight, body.conv1.weight.flip(1))
    # both engines' pre-trained arms start from the same backbone: every tensor the
    # torchvision engine loads, detectron2's model holds too (once mapped back)
    from bench.engines.detectron2.weights import detector_from_detectron2
    from bench.engines.torchvision.model import build_detector, load_backbone_weights
    from bench.imagenet import load_imagenet_backbone
    ours = build_detector(spec.model, 3, spec.data)
    load_backbone_weights(ours, load_imagenet_backbone(spec.pretrained, spec.model,
                                                       log=lambda msg: None),
                          log=lambda msg: None)
    theirs = detector_from_detectron2(model.state_dict())
    body_keys = [k for k in ours.state_dict() if k.startswith("backbone.body.")]
    assert len(body_keys) == 60
    for key in body_keys:
        assert torch.equal(ours.state_dict()[key], theirs[key]), key
    torch.save({"backbone": body.state_dict(), "meta": {**meta, "width": 32}}, file)
    with pytest.raises(ValueError, match="was trained with width=32"):
        _load_backbone(model, spec, log=lambda msg: None)


@pytest.mark.slow
@needs_d2
def test_detectron2_takes_detectrons_inits_when_the_spec_asks_and_its_own_otherwise(tmp_path):
    """model.conv_init and mask_logits_init have no detectron2 config key: the engine redraws
    the weights of the model detectron2 built, and only when the spec is not detectron2's."""
    from detectron2.modeling import build_model
    from bench.engines.detectron2.train import _initialize, detectron2_cfg
    from bench.spec import replace
    spec = next(s for s in d2_study(tmp_path).runs if s.init == "scratch")

    def built(spec):
        torch.manual_seed(0)
        model = build_model(detectron2_cfg(spec, num_classes=3))
        _initialize(model, spec)
        return model
    own = built(spec)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(
        own.state_dict().values(),
        build_model(detectron2_cfg(spec, num_classes=3)).state_dict().values()))
    detectron = built(replace(spec, **{"model.conv_init": "xavier",
                                       "model.mask_logits_init": "msra"}))
    for name, conv in detectron.backbone.bottom_up.named_modules():
        if isinstance(conv, torch.nn.Conv2d):
            bound = (3 / conv.weight[0].numel()) ** 0.5
            assert conv.weight.abs().max() <= bound, name
    stem = detectron.backbone.bottom_up.stem.conv1.weight
    assert stem.std().item() == pytest.approx((1 / stem[0].numel()) ** 0.5, rel=0.1)
    logits = detectron.roi_heads.mask_head.predictor.weight
    assert logits.std().item() == pytest.approx((2 / 3) ** 0.5, rel=0.15)
    assert own.roi_heads.mask_head.predictor.weight.std().item() == pytest.approx(0.001, rel=0.15)


@pytest.mark.slow
@needs_d2
def test_bench_parity_prints_both_engines_side_by_side(tmp_path):
    text = (REPO / "recipes/parity/pair.yaml").read_text()
    path = write_recipe(tmp_path, text.replace("base: ../mini/_model.yaml",
                                                f"base: {REPO}/recipes/mini/_model.yaml"))
    out = subprocess.run([sys.executable, "-m", "bench.cli", "parity", str(path), "--only",
                          "scratch", "--runs-root", str(tmp_path / "runs"),
                          "--set", "vary.schedule=[40iter]", "--set", "vary.seed=[0, 1]",
                          "--set", "solver.drops_from_end=[16, 4]",
                          "--set", "data.dataset=shapes-tiny", "--set", "eval.period=40"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout[out.stdout.index("params tv"):].splitlines()
    scratch = next(line.split() for line in table if "-scratch-" in line)
    assert "seed" not in scratch[0] and scratch[1] == "0,1"  # the seeds pooled in one row
    assert scratch[2] == scratch[3]  # the same parameter count in both engines
    assert json.loads("[" + ",".join(scratch[4:6]) + "]")  # measured s/iter, both
    assert scratch[-4:] == ["2/2", "done", "2/2", "done"]
    assert "mean over the seeds [min-max]" in table[-1]


@pytest.mark.slow
@needs_d2
def test_a_two_process_detectron2_run_trains_under_the_runners_process_group(tmp_path,
                                                                             both_engines):
    path = write_recipe(tmp_path, D2_STUDY.format(study="d2ddp", engine="detectron2"))
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--only",
                          "scratch", "--set", "gpus=2", "--device", "cpu", "--runs-root",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rd = RunDir(next((tmp_path / "runs" / "d2ddp").iterdir()))
    assert rd.read_spec().gpus == 2 and rd.read_status()["state"] == "done"
    _, single = both_engines["detectron2"]
    assert [(r["type"], r["iteration"]) for r in rd.read_metrics()] == \
        [(r["type"], r["iteration"]) for r in single.read_metrics()]
    # rank 0 gathered every process's predictions: the evaluation that detected most (a
    # scratch model 40 iterations in may detect nothing at the end) scored detections on
    # images of both processes' halves of the val set (detectron2 shards it in order)
    best = max((r for r in rd.read_metrics() if r["type"] == "eval"),
               key=lambda r: r["detections"])
    assert best["detections"] > 0
    kept = per_image.load(rd.per_image_file(best["iteration"]))["bbox"]
    half = len(kept["image_ids"]) // 2
    assert (kept["det_image"] < half).any() and (kept["det_image"] >= half).any()


@pytest.mark.slow
@needs_d2
def test_a_shorter_detectron2_schedule_forks_from_the_longer_run(tmp_path):
    text = D2_STUDY.format(study="d2fork", engine="detectron2").replace(
        "schedule: [40iter]", "schedule: [40iter, 60iter]")
    path = write_recipe(tmp_path, text)
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--only",
                          "scratch", "--device", "cpu", "--runs-root", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    runs = {RunDir(p).read_spec().solver.max_iter: RunDir(p)
            for p in (tmp_path / "runs" / "d2fork").iterdir()}
    parent, child = runs[60], runs[40]
    assert child.read_status()["state"] == parent.read_status()["state"] == "done"
    # the child took the parent's rows up to its first LR drop (24) and trained from there
    rows = child.read_metrics()
    assert [r["iteration"] for r in rows if r.get("forked_from")] == [20, 20]
    assert [(r["type"], r["iteration"]) for r in rows] == \
        [("train", 20), ("eval", 20), ("train", 40), ("eval", 40)]
    # after the fork the LR is the child's schedule (both drops by 40), not the parent's
    mine, theirs = child.read_spec().solver, parent.read_spec().solver
    assert schedule.lr_factor(mine, 39) < schedule.lr_factor(theirs, 39)
    assert rows[2]["lr"] == pytest.approx(mine.lr * schedule.lr_factor(mine, 39))


def _speed(tmp_path, *extra):
    path = write_recipe(tmp_path, D2_STUDY.format(study="d2speed", engine="torchvision"))
    return subprocess.run([sys.executable, "-m", "bench.cli", "speed", str(path), "--only",
                           "scratch", "--device", "cpu", "--iters", "1", "--warmup", "0",
                           *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "BENCH_THROUGHPUT": str(tmp_path / "t.csv")})


@pytest.mark.slow
@needs_d2
def test_bench_speed_times_the_same_model_through_detectron2_and_prints_the_ratio(tmp_path):
    out = _speed(tmp_path, "--vs-detectron2", "--record")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "detectron2 / torchvision s/iter:" in out.stdout
    rows = (tmp_path / "t.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[2] for r in rows) == ["detectron2", "torchvision"]


@pytest.mark.slow  # a bench.cli process
@pytest.mark.skipif(HAS_D2, reason="detectron2 is installed here")
def test_bench_speed_vs_detectron2_without_it_is_one_line(tmp_path):
    out = _speed(tmp_path, "--vs-detectron2")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "engine detectron2 needs detectron2" in out.stderr


@pytest.mark.slow
@needs_d2
def test_a_detectron2_run_trains_on_a_nested_subset_of_a_coco_layout_dataset(tmp_path):
    root = make_coco_layout(tmp_path)
    subsets = subprocess.run([sys.executable, "-m", "bench.cli", "subsets", "--annotations",
                              str(root / "annotations/instances_train2017.json"), "--sizes",
                              "16"], capture_output=True, text=True, timeout=300)
    assert subsets.returncode == 0, subsets.stderr
    path = write_recipe(tmp_path, D2_STUDY.format(study="d2coco", engine="detectron2"))
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--only",
                          "scratch", "--device", "cpu", "--coco", str(root),
                          "--set", "data.dataset=coco", "--set", "data.train_images=16",
                          "--set", "vary.schedule=[20iter]", "--runs-root",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rd = RunDir(next((tmp_path / "runs" / "d2coco").iterdir()))
    status = rd.read_status()
    assert status["state"] == "done" and status["train_images_used"] == 16
    assert rd.read_metrics()[-1]["type"] == "eval"


@pytest.mark.slow
@needs_d2
def test_a_detectron2_run_with_loader_workers_ends_when_it_is_done(tmp_path):
    # its loader never runs out and its workers ignore SIGTERM (a Slurm stop must not kill
    # them): the engine must end them itself, or the process never exits
    text = D2_STUDY.format(study="d2workers", engine="detectron2").replace(
        "schedule: [40iter]", "schedule: [20iter]")
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run",
                          str(write_recipe(tmp_path, text)), "--only", "scratch", "--workers",
                          "2", "--device", "cpu", "--runs-root", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done 1," in out.stdout
