"""The COCO path end to end on data the suite generates: a COCO-layout directory (train2017,
val2017, annotations/instances_*2017.json) built from the embedded dataset, nested subsets
drawn by `bench subsets`, and runs that refuse to start when a subset or the annotation
file does not match what was recorded."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, make_coco_layout, nine_iteration_pair

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow

RECIPE = nine_iteration_pair("coco-subsets", "  data: {dataset: coco, train_images: 16}")


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def coco_root(tmp_path):
    return make_coco_layout(tmp_path)


def test_subsets_cli_then_a_run_on_a_subset_then_refusal_when_the_annotations_change(
        coco_root, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(RECIPE)
    runs = ["--runs-root", str(tmp_path / "runs"), "--coco", str(coco_root)]

    out = _bench("run", str(study), *runs)           # no subsets drawn yet
    assert out.returncode == 2
    assert "bench subsets --annotations" in out.stderr and len(out.stderr.splitlines()) == 1

    ann = coco_root / "annotations/instances_train2017.json"
    out = _bench("subsets", "--annotations", str(ann), "--sizes", "8", "16", "32")
    assert out.returncode == 0, out.stderr
    files = sorted((coco_root / "bench_subsets").glob("train_*_seed0.json"))
    ids = {json.loads(f.read_text())["size"]: set(json.loads(f.read_text())["image_ids"])
           for f in files}
    assert ids[8] < ids[16] < ids[32]

    out = _bench("run", str(study), *runs, "--only=-scratch-")
    assert out.returncode == 0 and "done 1," in out.stdout, out.stdout + out.stderr
    (run_dir,) = (tmp_path / "runs/coco-subsets").iterdir()
    assert json.loads((run_dir / "status.json").read_text())["train_images_used"] == 16

    ann.write_text(ann.read_text() + "\n")           # another annotation file now
    out = _bench("run", str(study), *runs, "--only=-scratch-")   # done: nothing to check
    assert out.returncode == 0 and "skipped (already done) 1" in out.stdout
    out = _bench("run", str(study), *runs, "--only=-scratch-", "--set", "seed=1")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "was drawn from another instances_train2017.json" in line


def test_he2019_preflight_names_what_blocks_a_run_before_any_training(coco_root, tmp_path,
                                                                      bench_data):
    r50_gn = str(REPO / "recipes/he2019/r50_gn.yaml")
    common = ["--coco", str(coco_root), "--runs-root", str(tmp_path / "runs")]

    out = _bench("run", r50_gn, *common, "--slots", "2")  # a machine of 2 GPUs (or CPU slots)
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "asks for gpus=8" in line and "--set gpus=2" in line

    one_gpu = [*common, "--set", "gpus=1", "--only=-imagenet-2x-"]
    out = _bench("run", r50_gn, *one_gpu)
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "cache:imagenet/R-50-GN.pkl not found" in line
    assert "put the ImageNet checkpoint the recipe names there" in line

    pkl = bench_data / "imagenet" / "R-50-GN.pkl"
    pkl.parent.mkdir(parents=True, exist_ok=True)
    pkl.write_bytes(b"not really a pickle")
    try:
        out = _bench("run", r50_gn, *one_gpu)
    finally:
        pkl.unlink()
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode == 2 and "R-50-GN.pkl is not a readable pickle" in line
    assert not (tmp_path / "runs").exists()


def test_a_damaged_coco_is_one_line_before_any_training(coco_root, tmp_path):
    """A missing val image would fail the run at its first evaluation, hours in; a
    truncated annotation file at its start, in json's words. Both are found first, named."""
    study = tmp_path / "study.yaml"
    study.write_text(nine_iteration_pair("coco-damaged", "  data: {dataset: coco}"))
    runs = ["--runs-root", str(tmp_path / "runs"), "--coco", str(coco_root)]
    victim = sorted((coco_root / "val2017").iterdir())[0]
    victim.unlink()
    out = _bench("run", str(study), *runs)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "1 of the" in line and victim.name in line and "val images" in line

    ann = coco_root / "annotations/instances_val2017.json"
    ann.write_text(ann.read_text()[:500])
    out = _bench("run", str(study), *runs)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert f"{ann}: not a COCO annotation file (JSONDecodeError" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pth"))
