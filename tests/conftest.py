"""Shared fixtures: a throwaway data cache and runs root, and a tiny study that uses the real
mini model base (tests go through the same code paths as `make mini`)."""

import os
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401 - the real-Slurm fixture, for every test

REPO = Path(__file__).resolve().parents[1]
# The recipe folders the suite ships: tests that plan "every recipe" plan these, so a user's
# own recipes/<folder>/ never breaks `make test`.
SHIPPED_RECIPE_DIRS = [REPO / "recipes" / d
                       for d in ("detectron2-zoo", "examples", "he2019", "mini", "mini-cascade", "mini-keypoints",
                                 "mini-vgg", "mini-voc", "parity")]

TINY_RECIPE = f"""
study: tiny
base: {REPO}/recipes/mini/_model.yaml
run:
  pretrained: cache:pretrained/tiny-resnet10-w32-GN.pth
  data: {{dataset: shapes-tiny}}
  solver: {{batch: 2, ref_batch: 2, base_lr: 0.08, unit_iters: 9, drops_from_end: [6, 2], warmup_iters: 3}}
  eval: {{period: 9}}
  checkpoint: {{period: 9, keep: 2}}
vary:
  schedule: [1x, 2x]
  train_images: [24, null]
compare:
  init: [scratch, imagenet]
pretrain: {{source: shapes-cls-tiny, epochs: 1, batch: 16}}
"""


def nine_iteration_pair(study, run_extra):
    """A study of one 1x pair (9 iterations at batch 2, one eval and checkpoint at the end)
    on the mini model base; `run_extra` adds YAML lines under `run:` (2-space indented)."""
    return f"""
study: {study}
base: {REPO}/recipes/mini/_model.yaml
run:
{run_extra.rstrip()}
  solver: {{batch: 2, ref_batch: 2, base_lr: 0.08, unit_iters: 9, drops_from_end: [6, 2], warmup_iters: 3}}
  eval: {{period: 9}}
  checkpoint: {{period: 9, keep: 1}}
vary:
  schedule: [1x]
compare:
  init: [scratch, imagenet]
"""


@pytest.fixture(scope="session", autouse=True)
def bench_data(tmp_path_factory):
    """Every test writes its datasets and checkpoints into one temporary cache."""
    path = tmp_path_factory.mktemp("bench-data")
    old = os.environ.get("BENCH_DATA")
    os.environ["BENCH_DATA"] = str(path)
    yield path
    if old is None:
        os.environ.pop("BENCH_DATA", None)
    else:
        os.environ["BENCH_DATA"] = old


@pytest.fixture
def tiny_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def write_recipe(tmp_path, text, name="study.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def make_coco_layout(dest):
    """A COCO 2017 layout (train2017/, val2017/, annotations/instances_*2017.json) holding
    the embedded shapes-tiny dataset: the COCO code path on data the suite generates."""
    import shutil

    from bench.data import registry, synthetic
    src = synthetic.ensure(registry.EMBEDDED["shapes-tiny"])
    root = Path(dest) / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(src / "annotations/instances_train.json",
                root / "annotations/instances_train2017.json")
    shutil.copy(src / "annotations/instances_val.json",
                root / "annotations/instances_val2017.json")
    (root / "train2017").symlink_to(src / "train")
    (root / "val2017").symlink_to(src / "val")
    return root


def scratch_study(unit_iters, extra=""):
    """A study whose scratch runs need no checkpoint (the tests take only those)."""
    return f"""
study: slurmtest
base: {REPO}/recipes/mini/_model.yaml
run:
  pretrained: cache:pretrained/none.pth
  data: {{dataset: shapes-tiny}}
  solver: {{batch: 2, ref_batch: 2, base_lr: 0.08, unit_iters: {unit_iters}, drops_from_end: [6, 2], warmup_iters: 3}}
  eval: {{period: {unit_iters}}}
  checkpoint: {{period: {unit_iters}, keep: 3}}
vary:
  schedule: [1x]
compare:
  init: [scratch, imagenet]
{extra}"""


# A 1x scratch / pre-trained pair at 1 and 2 processes (DDP, multi-node tests)
TWO_LAYOUTS = f"""
study: ddp
base: {REPO}/recipes/mini/_model.yaml
run:
  pretrained: cache:pretrained/unused.pth
  data: {{dataset: shapes-tiny, aspect_grouping: true}}
  solver: {{batch: 2, micro_batch: 1, ref_batch: 2, base_lr: 0.08, unit_iters: 9, drops_from_end: [6, 2],
            warmup_iters: 3}}
  eval: {{period: 9}}
  checkpoint: {{period: 9, keep: 1}}
vary:
  schedule: [1x]
  gpus: [1, 2]
compare:
  init: [scratch, imagenet]
"""


@pytest.fixture(scope="module")
def gt_and_detections():
    """Noisy detections made from the tiny val set's ground truth: jittered boxes and masks,
    random scores, misses and false positives, so every stat is something other than 0/100."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from bench.data import registry
    from bench.data.coco import load_coco
    files = registry.resolve("shapes-tiny")
    gt = load_coco(files.val_annotations)
    rng = np.random.default_rng(0)
    boxes, segms = [], []
    for ann in gt.dataset["annotations"]:
        if rng.random() < 0.2:
            continue                                          # a miss
        img = gt.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
        box = [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]]
        score = float(rng.uniform(0.05, 1))
        cat = ann["category_id"] if rng.random() < 0.9 else gt.getCatIds()[0]
        boxes.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box,
                      "score": score})
        m = gt.annToMask(ann)
        m = np.roll(m, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        segms.append({"image_id": ann["image_id"], "category_id": cat, "segmentation": rle,
                      "score": score})
        if rng.random() < 0.3:                                # a false positive
            fp = [float(rng.uniform(0, img["width"] - 20)), float(rng.uniform(0, img["height"] - 20)),
                  20.0, 20.0]
            boxes.append({"image_id": ann["image_id"], "category_id": cat, "bbox": fp,
                          "score": float(rng.uniform(0.05, 0.5))})
    return gt, boxes, segms
