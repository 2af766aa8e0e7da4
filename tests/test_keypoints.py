"""Keypoint R-CNN (the paper's Fig. 6): COCO person keypoints, or the embedded people
stand-in in the same format, trained with detectron2's keypoint head and scored by
pycocotools' OKS evaluation exactly as COCO."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from bench import recipe
from bench.data import people, registry
from bench.data.coco import AnnotationError, CocoDetection, load_coco
from bench.engines.coco_stats import KEYPOINT_STAT_NAMES
from bench.engines.detectron2.config import flatten, translate
from bench.engines.torchvision.evaluate import _append_results, coco_stats
from bench.engines.torchvision.model import build_detector
from bench.preflight import PreflightError, check_keypoint_files
from bench.spec import SpecError
from conftest import REPO, nine_iteration_pair, write_recipe

MINI = recipe.load(REPO / "recipes/mini-keypoints/study.yaml")
PAPER = recipe.load(REPO / "recipes/he2019/keypoint_r50_gn.yaml")


@pytest.fixture(scope="module")
def tiny():
    return registry.resolve("people-tiny")


def test_the_people_set_is_coco_person_keypoints_with_cocos_names_skeleton_and_labels(tiny):
    doc = json.loads(tiny.train_annotations.read_text())
    (cat,) = doc["categories"]
    assert cat["name"] == "person" and len(cat["keypoints"]) == 17
    assert cat["keypoints"][:3] == ["nose", "left_eye", "right_eye"]
    assert cat["keypoints"][-1] == "right_ankle" and [16, 14] in cat["skeleton"]
    assert doc["annotations"]
    for ann in doc["annotations"]:
        k = np.array(ann["keypoints"]).reshape(17, 3)
        assert set(k[:, 2]) <= {0, 1, 2} and ann["num_keypoints"] == int((k[:, 2] > 0).sum())
        assert (k[k[:, 2] == 0, :2] == 0).all()              # unlabelled: 0, 0
        labelled = k[k[:, 2] > 0, :2]
        assert ((labelled >= 0) & (labelled < 128)).all()    # pixel indices in the image
    every = np.concatenate([np.array(a["keypoints"]).reshape(17, 3)[:, 2]
                            for a in doc["annotations"]])
    assert (every == 2).any() and (every == 1).any() and (every == 0).any()


def test_the_people_set_does_not_depend_on_the_number_of_workers(tmp_path):
    from bench.data import synthetic
    cfg = people.PeopleConfig(train_images=6, val_images=2)
    a = synthetic.ensure(cfg, root=tmp_path / "a", workers=1)
    b = synthetic.ensure(cfg, root=tmp_path / "b", workers=2)
    for split in ("train", "val"):
        name = f"annotations/person_keypoints_{split}.json"
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_a_flip_mirrors_x_and_swaps_left_and_right(tiny):
    assert people.flip_permutation(people.KEYPOINTS) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12,
                                                         11, 14, 13, 16, 15]
    ds = CocoDetection(tiny.train_images, tiny.train_annotations, keypoints=17)
    _, plain = ds.get(0)
    img, flipped = ds.get(0, hflip=True)
    w = img.shape[2]
    p, f = plain["keypoints"], flipped["keypoints"]
    # COCO's pixel indices + 0.5: the pixel's centre, as detectron2 loads them
    raw = np.array(ds.coco.imgToAnns[ds.ids[0]][0]["keypoints"]).reshape(17, 3)
    on = raw[:, 2] > 0
    assert torch.allclose(p[0, on, :2], torch.tensor(raw[on, :2] + 0.5, dtype=torch.float32))
    for i, j in enumerate(people.flip_permutation(people.KEYPOINTS)):
        assert torch.equal(f[:, i, 2], p[:, j, 2])
        vis = p[:, j, 2] > 0
        assert torch.allclose(f[vis, i, 0], w - p[vis, j, 0]) and \
            torch.allclose(f[vis, i, 1], p[vis, j, 1])


def test_ground_truth_given_back_as_predictions_scores_100_keypoint_ap(tiny):
    val = CocoDetection(tiny.val_images, tiny.val_annotations, train=False, keypoints=17)
    boxes, segms, kps = [], [], []
    for i in range(len(val)):
        _, t = val.get(i)
        n = len(t["boxes"])
        out = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n),
               "keypoints": t["keypoints"].clone(), "keypoints_scores": torch.ones(n, 17)}
        _append_results(val, t["image_id"], out, boxes, segms, kps)
    stats = coco_stats(val.coco, kps, "keypoints", val.ids)
    assert list(stats) == [f"keypoints/{n}" for n in KEYPOINT_STAT_NAMES]
    assert stats["keypoints/AP"] == pytest.approx(100.0)
    # the +0.5 of the loader is taken off again: COCO's indices exactly
    ann = val.coco.imgToAnns[kps[0]["image_id"]][0]
    assert kps[0]["keypoints"][0::3][:5] == pytest.approx(
        [float(x) if v else -0.5 for x, v in zip(ann["keypoints"][0::3][:5],
                                                 ann["keypoints"][2::3][:5])])


def test_the_keypoint_head_is_detectron2s_8_convs_deconv_and_2x_upsampling():
    m = PAPER.runs[0].model
    assert (m.arch, m.num_keypoints, m.keypoint_head_convs, m.keypoint_head_dim) == \
        ("keypoint_rcnn", 17, 8, 512)
    spec = MINI.runs[0]
    model = build_detector(spec.model, 1, spec.data)
    heads = model.roi_heads
    convs = [x for x in heads.keypoint_head.modules() if isinstance(x, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64] * 8 and all(c.kernel_size == (3, 3)
                                                              for c in convs)
    assert not any(isinstance(x, torch.nn.GroupNorm) for x in heads.keypoint_head.modules())
    assert any(isinstance(x, torch.nn.GroupNorm) for x in heads.box_head.modules())
    deconv = heads.keypoint_predictor.kps_score_lowres
    assert (deconv.kernel_size, deconv.stride, deconv.out_channels) == ((4, 4), (2, 2), 17)
    # the paper's 14x14 RoIs give 56x56 heatmaps; the miniature's 7x7 RoIs (its people are
    # 40-110 px tall) give 28x28, the deconvolution and upsampling each doubling the side
    assert PAPER.runs[0].model.keypoint_pooler_resolution == 14
    assert heads.keypoint_roi_pool.output_size == (7, 7)
    with torch.no_grad():
        out = heads.keypoint_predictor(heads.keypoint_head(torch.zeros(2, 32, 7, 7)))
    assert out.shape == (2, 17, 28, 28)
    paper_sized = build_detector(dataclasses.replace(spec.model, keypoint_pooler_resolution=14),
                                 1, spec.data).roi_heads
    assert paper_sized.keypoint_roi_pool.output_size == (14, 14)


def test_a_keypoint_model_trains_a_step_on_the_people_set(tiny):
    spec = MINI.runs[0]
    ds = CocoDetection(tiny.train_images, tiny.train_annotations, keypoints=17)
    torch.manual_seed(0)  # the init, so the loss check below does not depend on test order
    model = build_detector(spec.model, 1, spec.data).train()
    heatmaps = []
    model.roi_heads.keypoint_predictor.register_forward_hook(
        lambda module, args, out: heatmaps.append(out.shape))
    items = [ds.get(i) for i in range(2)]
    losses = model([img.float() / 255 for img, _ in items], [t for _, t in items])
    assert "loss_keypoint" in losses and "loss_mask" not in losses
    # the loss is taken on the miniature's 28 x 28 heatmaps (7x7 RoIs), and at init it is
    # about a uniform guess over their cells (ln 784 = 6.7; 56 x 56 would give 8.1)
    assert heatmaps and all(tuple(h[1:]) == (17, 28, 28) for h in heatmaps)
    assert abs(losses["loss_keypoint"].item() - np.log(28 * 28)) < 0.5
    sum(losses.values()).backward()


@pytest.mark.slow
def test_bench_speed_times_a_keypoint_model_on_people_with_labelled_keypoints():
    # what `bench plan` needs for the keypoint recipes' GPU-hours: a measurable train step
    from bench import speed
    spec = MINI.runs[0]
    images, targets = speed._synthetic_batch(spec, 2, torch.Generator().manual_seed(0), "cpu")
    for t in targets:
        kps, boxes = t["keypoints"], t["boxes"]
        assert kps.shape == (len(boxes), 17, 3) and (kps[..., 2] == 2).all()
        assert ((kps[..., :2] >= boxes[:, None, :2]) & (kps[..., :2] <= boxes[:, None, 2:])).all()
    row = speed.measure(spec, "cpu", warmup=0, iters=1, log=lambda *_: None)
    assert row["arch"] == "keypoint_rcnn" and float(row["sec_per_iter"]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_detectron2_times_a_keypoint_step_on_the_same_synthetic_people(device):
    # on a GPU `bench speed` times detectron2's twin of every model, keypoint models included
    pytest.importorskip("detectron2")
    from bench import engines, speed
    # the paper's keypoint model (detectron2 has no R10), on the people set's small images
    # and with a narrow keypoint head, so that a CPU step takes seconds
    paper = PAPER.runs[0]
    d = paper.data
    spec = dataclasses.replace(
        paper, data=dataclasses.replace(
            d, dataset="people", train_max_size=128,
            train_min_size=(128,) if isinstance(d.train_min_size, tuple) else 128),
        model=dataclasses.replace(paper.model, keypoint_head_dim=64, roi_batch_per_image=32))
    where = torch.device(device)
    batches = [speed._synthetic_batch(spec, 2, torch.Generator().manual_seed(0), where)]
    step, micro = engines.get("detectron2").train_step(spec, where, 2, batches)
    step(0)  # its keypoint head trains on gt_keypoints scaled with the resized image
    assert micro == 2


def test_detectron2_gets_the_same_keypoint_head():
    cfg = flatten(translate(PAPER.runs[0], num_classes=1))
    assert cfg["MODEL.KEYPOINT_ON"] is True and cfg["MODEL.MASK_ON"] is False
    assert cfg["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"] == [512] * 8
    assert cfg["MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS"] == 17
    assert cfg["MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION"] == 14
    assert cfg["MODEL.ROI_KEYPOINT_HEAD.NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS"] is True
    assert cfg["MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE"] == 1
    # the miniature's head (its R10 has no detectron2 twin) on the paper's model
    mini = MINI.runs[0].model
    small = flatten(translate(dataclasses.replace(PAPER.runs[0], model=dataclasses.replace(
        PAPER.runs[0].model, keypoint_pooler_resolution=mini.keypoint_pooler_resolution,
        keypoint_head_dim=mini.keypoint_head_dim)), num_classes=1))
    assert (small["MODEL.ROI_KEYPOINT_HEAD.POOLER_RESOLUTION"],
            small["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS"]) == (7, [64] * 8)
    pytest.importorskip("detectron2")
    from bench.engines.detectron2.train import detectron2_cfg
    merged = detectron2_cfg(PAPER.runs[0], num_classes=1)  # raises on a key detectron2 lacks
    assert merged.MODEL.ROI_KEYPOINT_HEAD.NAME == "KRCNNConvDeconvUpsampleHead"
    # detectron2's published keypoint configs (COCO-Keypoints/keypoint_rcnn_R_50_FPN_*) set
    # no ROI_KEYPOINT_HEAD key: its defaults are the published head, and ours equal them
    # (the pooler type and sampling ratio are the paper's Detectron RoIAlign here)
    from detectron2.config import get_cfg
    published = get_cfg().MODEL.ROI_KEYPOINT_HEAD
    for key in ("NAME", "NUM_KEYPOINTS", "CONV_DIMS", "POOLER_RESOLUTION", "LOSS_WEIGHT",
                "NORMALIZE_LOSS_BY_VISIBLE_KEYPOINTS", "MIN_KEYPOINTS_PER_IMAGE"):
        assert tuple(np.atleast_1d(merged.MODEL.ROI_KEYPOINT_HEAD[key])) == \
            tuple(np.atleast_1d(published[key])), key
    # the same network in both engines: as many parameters, keypoint head included
    from detectron2.modeling import build_model
    theirs = build_model(merged)
    ours = build_detector(PAPER.runs[0].model, 1, PAPER.runs[0].data)
    assert sum(p.numel() for p in ours.roi_heads.keypoint_head.parameters()) + \
        sum(p.numel() for p in ours.roi_heads.keypoint_predictor.parameters()) == \
        sum(p.numel() for p in theirs.roi_heads.keypoint_head.parameters())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


def test_keypoint_recipes_refuse_data_without_keypoints_in_one_line(tmp_path, tiny):
    body = (REPO / "recipes/mini-keypoints/study.yaml").read_text().replace(
        "dataset: people", "dataset: shapes").replace("base: ../mini/", f"base: {REPO}/recipes/mini/")
    with pytest.raises(SpecError, match="keypoint_rcnn needs keypoint annotations.*'shapes'"):
        recipe.load(write_recipe(tmp_path, body))
    # an instances file where a person_keypoints one belongs
    shapes = registry.resolve("shapes-tiny")
    with pytest.raises(AnnotationError) as e:
        CocoDetection(shapes.val_images, shapes.val_annotations, train=False, keypoints=17)
    assert str(shapes.val_annotations) in str(e.value) and "\n" not in str(e.value)
    # a file with another number of keypoints: preflight names it before training
    doc = json.loads(tiny.val_annotations.read_text())
    doc["categories"][0]["keypoints"] = doc["categories"][0]["keypoints"][:15]
    bad = tmp_path / "person_keypoints_val.json"
    bad.write_text(json.dumps(doc))
    files = dataclasses.replace(tiny, val_annotations=bad)
    with pytest.raises(PreflightError, match="model.num_keypoints=17") as e:
        check_keypoint_files(files, 17)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    for ann in doc["annotations"][:1]:
        ann["keypoints"] = ann["keypoints"][:-3]
    doc["categories"][0]["keypoints"] = list(people.KEYPOINTS)
    bad.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="has 48 keypoint numbers, not 3 x 17"):
        CocoDetection(tiny.val_images, bad, train=False, keypoints=17, coco=load_coco(bad))
    # num_keypoints is what COCOeval ignores people by: it must count the labelled points
    doc = json.loads(tiny.val_annotations.read_text())
    doc["annotations"][0]["num_keypoints"] += 1
    bad.write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="num_keypoints .* labelled keypoints"):
        CocoDetection(tiny.val_images, bad, train=False, keypoints=17, coco=load_coco(bad))
    # a keypoint head of no conv is refused at load, not at the first forward pass
    body = (REPO / "recipes/mini-keypoints/study.yaml").read_text().replace(
        "keypoint_head_convs: 8", "keypoint_head_convs: 0").replace(
        "base: ../mini/", f"base: {REPO}/recipes/mini/")
    with pytest.raises(SpecError, match="model.keypoint_head_convs=0 must be greater than 0"):
        recipe.load(write_recipe(tmp_path, body, "zero.yaml"))


def test_both_engines_train_on_the_same_images_those_with_a_labelled_keypoint(tiny):
    """detectron2 drops images without a labelled keypoint only when its dataset loader is
    told to (MIN_KEYPOINTS_PER_IMAGE); ours drops them in the loader."""
    doc = json.loads(tiny.train_annotations.read_text())
    with_kps = {a["image_id"] for a in doc["annotations"] if a["num_keypoints"] > 0}
    boxed = {a["image_id"] for a in doc["annotations"]}
    ours = CocoDetection(tiny.train_images, tiny.train_annotations, keypoints=17)
    assert set(ours.ids) == with_kps
    pytest.importorskip("detectron2")
    from detectron2.data import get_detection_dataset_dicts

    from bench.engines.detectron2 import data as d2data
    train_name, _ = d2data.register(dataclasses.replace(MINI.runs[0].data,
                                                        dataset="people-tiny"))
    theirs = get_detection_dataset_dicts([train_name], filter_empty=True, min_keypoints=1)
    assert {d["image_id"] for d in theirs} == with_kps
    assert len(with_kps) <= len(boxed)


@pytest.mark.slow
def test_a_keypoint_pair_trains_evaluates_and_draws_its_keypoint_ap(tmp_path):
    from bench import runner
    from bench.analysis import report
    from bench.rundir import RunDir, run_dir_for
    path = write_recipe(tmp_path, nine_iteration_pair("kp", """
  model: {arch: keypoint_rcnn, keypoint_head_dim: 32, keypoint_head_convs: 2}
  data: {dataset: people-tiny}"""))
    study = recipe.load(path)
    scratch = [s for s in study.runs if s.init == "scratch"]
    out = runner.run(scratch, tmp_path / "runs", slots=["cpu0"], progress=False,
                     log=lambda m: None)
    assert out.done == [scratch[0].run_id], out.failed
    rd = RunDir(run_dir_for(scratch[0], tmp_path / "runs"))
    row = [r for r in rd.read_metrics() if r["type"] == "eval"][-1]
    assert {f"keypoints/{n}" for n in KEYPOINT_STAT_NAMES} <= set(row)
    assert "segm/AP" not in row and "bbox/AP" in row
    from bench import per_image
    assert "keypoints" in per_image.load(rd.per_image_file(9))
    written = report.write_study_results(tmp_path / "runs" / "kp", tmp_path / "out",
                                         log=lambda m: None)
    assert tmp_path / "out" / "ap_vs_iterations.png" in written
    table = (tmp_path / "out" / "final_ap.md").read_text()
    assert "keypoint AP scratch" in table and "mask AP" not in table


def test_coco_keypoints_reads_person_keypoints_and_draws_its_own_subsets(tmp_path, monkeypatch,
                                                                         tiny):
    from conftest import make_coco_layout
    root = make_coco_layout(tmp_path)
    for split in ("train", "val"):
        (root / "annotations" / f"person_keypoints_{split}2017.json").write_bytes(
            getattr(tiny, f"{split}_annotations").read_bytes())
    monkeypatch.setenv("BENCH_COCO", str(root))
    boxes, people_files = registry.resolve("coco"), registry.resolve("coco-keypoints")
    assert people_files.train_annotations.name == "person_keypoints_train2017.json"
    assert people_files.train_images == boxes.train_images
    # subsets of the two files never overwrite each other (they hold other images)
    assert people_files.subsets_dir != boxes.subsets_dir
    with pytest.raises(registry.DatasetMissing, match=f"--out {people_files.subsets_dir}"):
        registry.subset_file(people_files, 10)
