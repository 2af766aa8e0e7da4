"""RunSpec -> detectron2 config: our zoo recipes translate to detectron2's published
configs (the values below are read from detectron2's configs/Misc/*.yaml on their
configs/Base-RCNN-FPN.yaml and detectron2/config/defaults.py), and every he2019 run
translates. Pure data: no detectron2 needed."""

import dataclasses

import pytest

from bench import recipe
from bench.engines.detectron2.config import Untranslatable, flatten, translate
from conftest import REPO

BGR_SCRATCH_STD = [57.375, 57.12, 58.395]

# What every Misc GN/SyncBN R50-FPN Mask R-CNN config resolves to (base + defaults)
MISC = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.MASK_ON": True,
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675], "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone", "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.FPN.OUT_CHANNELS": 256,
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000, "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256, "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 1, "MODEL.ROI_BOX_HEAD.CONV_DIM": 256,
    "MODEL.ROI_BOX_HEAD.FC_DIM": 1024, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2", "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": 256, "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14,
    "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02, "SOLVER.STEPS": [210000, 250000],
    "SOLVER.MAX_ITER": 270000, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.WARMUP_FACTOR": 0.001,
    "SOLVER.MOMENTUM": 0.9, "SOLVER.WEIGHT_DECAY": 0.0001, "SOLVER.WEIGHT_DECAY_NORM": 0.0,
    "SOLVER.GAMMA": 0.1, "SOLVER.CHECKPOINT_PERIOD": 5000,
    "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.WEIGHT_DECAY_BIAS": None,
    "INPUT.MIN_SIZE_TRAIN": [640, 672, 704, 736, 768, 800], "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333,
    "DATALOADER.ASPECT_RATIO_GROUPING": True, "TEST.EVAL_PERIOD": 0,
    "TEST.DETECTIONS_PER_IMAGE": 100,
}


def norms(name):
    return {f"MODEL.{k}.NORM": name for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")}


NINE_X = {"SOLVER.IMS_PER_BATCH": 64, "SOLVER.BASE_LR": 0.08, "SOLVER.STEPS": [187500, 197500],
          "SOLVER.MAX_ITER": 202500, "TEST.EVAL_PERIOD": 2500}
PUBLISHED = {
    "Misc/mask_rcnn_R_50_FPN_3x_gn": {
        **MISC, **norms("GN"), "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.BACKBONE.FREEZE_AT": 2, "pretrained": True},
    "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn": {
        **MISC, **norms("GN"), "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.BACKBONE.FREEZE_AT": 0, "pretrained": False},
    "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn": {
        **MISC, **norms("GN"), **NINE_X, "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.PIXEL_STD": BGR_SCRATCH_STD, "MODEL.BACKBONE.FREEZE_AT": 0, "pretrained": False},
    "Misc/mask_rcnn_R_50_FPN_3x_syncbn": {
        **MISC, **norms("SyncBN"), "MODEL.RESNETS.STRIDE_IN_1X1": True,
        "MODEL.BACKBONE.FREEZE_AT": 2, "pretrained": True},
    "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn": {
        **MISC, **norms("SyncBN"), **NINE_X, "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.PIXEL_STD": BGR_SCRATCH_STD, "MODEL.BACKBONE.FREEZE_AT": 0, "pretrained": False},
}
# Known and named: the zoo's SyncBN configs recompute BN statistics before each evaluation
# (TEST.PRECISE_BN); no RunSpec field expresses that yet (recipes/detectron2-zoo says so).
KNOWN = {"Misc/mask_rcnn_R_50_FPN_3x_syncbn": {"TEST.PRECISE_BN.ENABLED"},
         "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn": {"TEST.PRECISE_BN.ENABLED"}}
OURS = {  # (recipe, init) -> the published config it reproduces
    ("r50_gn_3x", "imagenet"): "Misc/mask_rcnn_R_50_FPN_3x_gn",
    ("r50_gn_3x", "scratch"): "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn",
    ("r50_gn_9x", "scratch"): "Misc/scratch_mask_rcnn_R_50_FPN_9x_gn",
    ("r50_syncbn_3x", "imagenet"): "Misc/mask_rcnn_R_50_FPN_3x_syncbn",
    ("r50_syncbn_9x", "scratch"): "Misc/scratch_mask_rcnn_R_50_FPN_9x_syncbn",
}


def _same(a, b):
    if isinstance(b, float) or (isinstance(b, list) and b and isinstance(b[0], float)):
        return a == pytest.approx(b)
    return a == b


@pytest.mark.parametrize("ours, published", sorted(OURS.items()), ids=lambda x: str(x))
def test_our_zoo_recipes_translate_to_detectron2s_published_configs(ours, published):
    name, init = ours
    spec = next(s for s in recipe.load(REPO / f"recipes/detectron2-zoo/{name}.yaml").runs
                if s.init == init)
    got = flatten(translate(spec, weights="R-50.pkl"))
    want = PUBLISHED[published]
    wrong = {k: (got.get(k), v) for k, v in want.items()
             if k != "pretrained" and not _same(got.get(k), v)}
    assert not wrong, f"{name} {init} differs from {published}: (ours, theirs) {wrong}"
    assert bool(got["MODEL.WEIGHTS"]) == want["pretrained"]
    for key in KNOWN.get(published, ()):
        assert key in got  # expressed, with the difference named above


def test_every_he2019_run_translates_and_keeps_its_schedule():
    studies = recipe.load_all([REPO / "recipes/he2019"])
    runs = [s for st in studies for s in st.runs if s.model.backbone != "vgg"]
    assert len(runs) == 100  # and the 4 VGG-16 runs, which it refuses (tests/test_vgg.py)
    for spec in runs:
        cfg = flatten(translate(spec, weights="imagenet.pkl"))
        assert cfg["SOLVER.MAX_ITER"] == spec.solver.max_iter
        assert cfg["SOLVER.STEPS"] == list(spec.solver.steps)
        assert cfg["SOLVER.IMS_PER_BATCH"] == spec.solver.batch == 16
        assert cfg["SOLVER.BASE_LR"] == pytest.approx(spec.solver.lr)
        assert cfg["MODEL.RESNETS.NORM"] == cfg["MODEL.FPN.NORM"] == spec.model.norm
        assert cfg["MODEL.PIXEL_STD"] == list(reversed(spec.model.pixel_std))
        assert (cfg["MODEL.WEIGHTS"] == "") == (spec.init == "scratch")


def test_what_detectron2_cannot_express_is_one_line():
    spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]
    with pytest.raises(Untranslatable, match=r"model.depth 10: detectron2's ResNets are "
                                              r"18, 34, 50, 101, 152"):
        translate(spec)


def _merged_cfg(spec):
    from bench.engines.detectron2.train import detectron2_cfg
    return detectron2_cfg(spec, weights="imagenet.pkl")  # raises on a key detectron2 lacks


@pytest.mark.slow
def test_with_detectron2_every_translation_is_its_config_and_builds_the_published_model():
    pytest.importorskip("detectron2", reason="detectron2 is not installed (an optional engine)")
    from detectron2.modeling import build_model
    studies = recipe.load_all([REPO / "recipes/he2019", REPO / "recipes/detectron2-zoo"])
    for spec in (s for st in studies for s in st.runs if s.model.backbone != "vgg"):
        _merged_cfg(spec)
    ours = next(s for s in recipe.load(REPO / "recipes/detectron2-zoo/r50_gn_3x.yaml").runs
                if s.init == "scratch")
    model = build_model(_merged_cfg(ours))
    # detectron2's own build of Misc/scratch_mask_rcnn_R_50_FPN_3x_gn has this many
    assert sum(p.numel() for p in model.parameters()) == 45_711_152


@pytest.mark.slow
@pytest.mark.parametrize("norm, model", [("GN", {}), ("SyncBN", {}), ("FrozenBN", {}),
                                         ("GN", {"groups": 8, "width_per_group": 4}),
                                         ("FrozenBN", {"groups": 4, "width_per_group": 16,
                                                       "width": 32})],
                         ids=["GN", "SyncBN", "FrozenBN", "X50-8x4d-GN", "X50-4x16d-w32"])
def test_with_detectron2_both_engines_build_the_same_number_of_parameters(norm, model):
    """The same spec is the same network in both engines, FrozenBN's norm-free FPN and
    heads (biased convs) included, and a ResNeXt's grouped bottlenecks (detectron2's
    NUM_GROUPS x WIDTH_PER_GROUP; tests/test_resnext.py: X152 itself)."""
    pytest.importorskip("detectron2", reason="detectron2 is not installed (an optional engine)")
    from detectron2.modeling import build_model
    from bench.engines.torchvision.model import build_detector
    spec = next(s for s in recipe.load(REPO / "recipes/detectron2-zoo/r50_gn_3x.yaml").runs
                if s.init == "imagenet")
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, norm=norm, **model))
    theirs = build_model(_merged_cfg(spec))
    ours = build_detector(spec.model, 80, spec.data)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
