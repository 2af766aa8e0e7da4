"""Shared fixtures: a throwaway data cache and runs root, and a tiny study that uses the real
mini model base (tests go through the same code paths as `make mini`)."""

import os
from pathlib import Path

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401 - the real-Slurm fixture, for every test

REPO = Path(__file__).resolve().parents[1]

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
