"""Test-time augmentation (the paper's "+ test aug", Fig. 5 and Table 3), as detectron2's
GeneralizedRCNNWithTTA: the final model evaluated once more over several scales and a flip,
in an eval_tta row of its own that the learning curves never read. That it gives detectron2's
detections on the same weights is checked in tests/test_detectron2_engine.py."""

import dataclasses

import pytest
import torch

from bench import recipe
from bench.analysis import report, table
from bench.engines.torchvision import tta
from bench.engines.torchvision.model import build_detector, use_input_sizes
from bench.engines.torchvision.train import train
from bench.rundir import RunDir
from bench.spec import SpecError
from conftest import REPO, nine_iteration_pair, write_recipe

MINI = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]


def _model(**model):
    torch.manual_seed(0)
    m = build_detector(dataclasses.replace(MINI.model, **model), 3, MINI.data).eval()
    with torch.no_grad():  # a random model's scores are all alike: make them differ
        m.roi_heads.box_predictor.cls_score.weight.mul_(50)
    return m


@pytest.mark.parametrize("arch", ["mask_rcnn", "faster_rcnn"])
def test_one_pass_at_the_test_size_without_flip_is_the_plain_model(arch):
    model = _model(arch=arch)
    image = torch.rand(3, 128, 112)
    use_input_sizes(model, train=False)
    with torch.no_grad():
        plain = model([image])[0]
    augmented = tta.detect(model, image, (128,), 128, flip=False)
    assert len(plain["boxes"]) > 0
    for key in plain:
        assert torch.allclose(plain[key], augmented[key], atol=1e-5), key


def test_a_flipped_pass_maps_its_boxes_and_masks_back_onto_the_image():
    # the detections of a flipped image, flipped back, are those of the image flipped: with
    # flip alone on an image and on its mirror, the merged detections are mirror images
    model = _model()
    image = torch.rand(3, 128, 112)
    a = tta.detect(model, image, (128,), 128, flip=True)
    b = tta.detect(model, image.flip(-1), (128,), 128, flip=True)
    order_a, order_b = a["scores"].argsort(), b["scores"].argsort()
    assert torch.allclose(a["scores"][order_a], b["scores"][order_b], atol=1e-5)
    mirrored = b["boxes"][order_b][:, [2, 1, 0, 3]] * torch.tensor([-1., 1, -1, 1]) + \
        torch.tensor([112., 0, 112, 0])
    assert torch.allclose(a["boxes"][order_a], mirrored, atol=1e-3)
    assert torch.allclose(a["masks"][order_a], b["masks"][order_b].flip(-1), atol=1e-4)


def test_more_passes_merge_into_at_most_the_models_detections_per_image():
    model = _model()
    out = tta.detect(model, torch.rand(3, 128, 128), (96, 128, 160), 400, flip=True)
    assert 0 < len(out["boxes"]) <= MINI.model.detections_per_image
    assert out["masks"].shape[-2:] == (128, 128)
    assert (out["boxes"][:, 2] <= 128).all() and (out["boxes"][:, 0] >= 0).all()
    assert (out["scores"][:-1] >= out["scores"][1:]).all()


@pytest.mark.parametrize("extra,message", [
    ("eval: {period: 9, tta: true, tta_min_sizes: []}", "gives no test scale"),
    ("eval: {period: 9, tta: true, tta_max_size: 0}", "eval.tta_max_size=0 must be greater"),
])
def test_a_test_time_augmentation_without_scales_is_one_line(tmp_path, extra, message):
    body = nine_iteration_pair("tta", "  pretrained: x.pth\n").replace(
        "  eval: {period: 9}", f"  {extra}")
    path = write_recipe(tmp_path, body)
    with pytest.raises(SpecError, match=message) as e:
        recipe.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_keypoints_have_no_test_time_augmentation(tmp_path):
    body = (REPO / "recipes/mini-keypoints/study.yaml").read_text().replace(
        "  eval:\n", "  eval:\n    tta: true\n").replace(
        "base: ../mini/_model.yaml", f"base: {REPO}/recipes/mini/_model.yaml")
    with pytest.raises(SpecError, match="eval.tta with model.arch keypoint_rcnn"):
        recipe.load(write_recipe(tmp_path, body))


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tta")
    body = nine_iteration_pair("tta", "  model: {roi_heads: cascade}\n"
                                      "  pretrained: x.pth\n"
                                      "  data: {dataset: shapes-tiny}\n").replace(
        "  eval: {period: 9}",
        "  eval: {period: 9, tta: true, tta_min_sizes: [96, 128], tta_max_size: 200}")
    spec = next(s for s in recipe.load(write_recipe(tmp, body)).runs if s.init == "scratch")
    spec = dataclasses.replace(spec, solver=dataclasses.replace(spec.solver, max_iter=18,
                                                                steps=(12, 16)),
                               eval=dataclasses.replace(spec.eval, period=9))
    return spec, train(spec, tmp / "run", log=lambda m: None)


@pytest.mark.slow
def test_the_last_evaluation_is_repeated_with_augmentation_in_a_row_of_its_own(tta_run):
    spec, rd = tta_run
    rows = [(r["type"], r["iteration"]) for r in rd.read_metrics() if r["type"] != "train"]
    assert rows == [("eval", 9), ("eval", 18), ("eval_tta", 18)]
    augmented = next(r for r in rd.read_metrics() if r["type"] == "eval_tta")
    assert augmented["tta"] == {"min_sizes": [96, 128], "max_size": 200, "flip": True}
    assert "bbox/AP" in augmented and "segm/AP" in augmented
    # the learning curves read the plain evaluations only
    curves = table.load_runs(rd.path.parent, "eval")
    assert sorted(set(curves["iteration"])) == [9, 18]
    assert table.load_runs(rd.path.parent, "eval_tta")["iteration"].unique().tolist() == [18]


@pytest.mark.slow
def test_a_run_killed_during_its_augmented_evaluation_redoes_only_that(tta_run, tmp_path):
    import shutil
    spec, rd = tta_run
    killed = RunDir(tmp_path / "killed")
    shutil.copytree(rd.path, killed.path, ignore=shutil.ignore_patterns("tensorboard"))
    rows = killed.metrics_file.read_text().splitlines()
    killed.metrics_file.write_text("\n".join(r for r in rows if "eval_tta" not in r) + "\n")
    killed.write_status("running", iteration=18)
    before = [r for r in killed.read_metrics() if r["type"] == "eval"]
    train(spec, killed.path, log=lambda m: None)
    after = killed.read_metrics()
    assert [r for r in after if r["type"] == "eval"] == before  # not evaluated again
    assert [r["iteration"] for r in after if r["type"] == "eval_tta"] == [18]
    assert killed.read_status()["state"] == "done"


@pytest.mark.slow
def test_figures_write_the_augmented_numbers_in_tables_of_their_own(tta_run, tmp_path):
    spec, rd = tta_run
    out = tmp_path / "out"
    report.write_study_results(rd.path.parent, out)
    augmented = (out / "final_ap_test_aug.csv").read_text()
    plain = (out / "final_ap.csv").read_text()
    tta_row = next(r for r in rd.read_metrics() if r["type"] == "eval_tta")
    plain_row = [r for r in rd.read_metrics() if r["type"] == "eval"][-1]
    assert f"{tta_row['bbox/AP']:.3f}" in augmented
    assert f"{plain_row['bbox/AP']:.3f}" in plain
