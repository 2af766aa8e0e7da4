"""The paper's study as recipes: every experiment it reports is either a recipe whose runs
match the paper's (or detectron2's) published settings, or listed as not yet supported."""

import csv
import json
import subprocess
import sys
import time

import pytest

from bench import recipe
from conftest import REPO, SHIPPED_RECIPE_DIRS

RECIPE_DIRS = SHIPPED_RECIPE_DIRS
HE2019 = {st.name: st for st in recipe.load_all([REPO / "recipes/he2019"])}
ZOO = {st.name: st for st in recipe.load_all([REPO / "recipes/detectron2-zoo"])}


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _run(study, init, schedule=None):
    (spec,) = [r for r in study.runs if r.init == init and
               (schedule is None or r.solver.schedule == schedule)]
    return spec


@pytest.mark.parametrize("name", ["he2019-r50-gn", "he2019-r101-gn", "he2019-r50-syncbn",
                                  "he2019-r101-syncbn"])
def test_learning_curve_studies_follow_the_papers_schedule_rule(name):
    study = HE2019[name]
    assert {r.solver.schedule for r in study.runs} == {"2x", "3x", "4x", "5x", "6x"}
    for r in study.runs:
        n = int(r.solver.schedule[:-1])
        assert r.solver.max_iter == n * 90_000
        assert r.solver.steps == (n * 90_000 - 60_000, n * 90_000 - 20_000)
        assert (r.solver.lr, r.solver.batch, r.gpus) == (0.02, 16, 8)
        assert (r.data.dataset, r.data.train_min_size, r.data.train_images) == ("coco", 800, None)
        # Detectron's pre-trained arm freezes the stem and res2; its scratch arm nothing
        assert r.model.freeze_at == (0 if r.init == "scratch" else 2)
        assert r.model.box_head_convs == 4
        assert r.model.norm == name.split("-")[-1].replace("gn", "GN").replace("syncbn", "SyncBN")


def test_every_numbered_row_of_the_paper_has_a_run_or_an_unsupported_recipe():
    for row in csv.DictReader(open(REPO / "results/reference/he2019.csv")):
        if not row["recipe"]:
            continue
        study = HE2019[row["recipe"]]
        if study.unsupported:
            continue
        if row["schedule"] in {"2x", "3x", "4x", "5x", "6x"}:
            assert _run(study, row["init"], row["schedule"]), row
        elif row["iterations"] and row["experiment"].startswith("less_data"):
            assert int(row["iterations"]) in {r.solver.max_iter for r in study.runs
                                              if r.init == row["init"]}, row


def test_less_data_studies_use_nested_subsets_and_the_retuned_hyper_parameters():
    sizes = {}
    for name in ("he2019-less-data-35k", "he2019-less-data-10k", "he2019-less-data-3.5k",
                 "he2019-less-data-1k"):
        for r in HE2019[name].runs:
            sizes.setdefault(r.data.train_images, set()).add(r.data.subset_seed)
            assert (r.solver.lr, r.solver.gamma) == (0.04, 0.02)       # paper's footnote 2
            assert min(r.data.train_min_size) == 512 and max(r.data.train_min_size) == 800
    assert sorted(sizes) == [1000, 3500, 10_000, 35_000] and all(v == {0} for v in sizes.values())
    assert {r.solver.max_iter for r in HE2019["he2019-less-data-10k"].runs} == {60_000, 220_000}


def test_every_experiment_of_the_paper_has_runs_none_is_unsupported():
    # (none left: VGG-16 and Keypoint R-CNN run, tests/test_vgg.py, tests/test_keypoints.py)
    assert not any(st.unsupported for st in HE2019.values())


def test_detectron2_zoo_recipes_match_the_published_configs():
    rows = [r for r in csv.DictReader(open(REPO / "results/reference/detectron2_zoo.csv"))
            if r["recipe"]]
    assert len(rows) == 5
    for row in rows:
        spec = _run(ZOO[row["recipe"]], row["init"])
        steps = tuple(int(s) for s in row["steps"].strip("()").split(","))
        assert (spec.solver.max_iter, spec.solver.batch, spec.solver.steps) == \
            (int(row["iterations"]), int(row["batch"]), steps), row["config"]
        assert spec.solver.lr == pytest.approx(float(row["lr"]))
        assert spec.model.norm in row["norm"]
        assert spec.model.freeze_at == (2 if row["init"] == "imagenet" else 0)
        assert spec.data.train_min_size == (640, 672, 704, 736, 768, 800)


def test_pairs_differ_only_in_init_and_declared_fine_tuning_conventions():
    for d in RECIPE_DIRS:
        for study in recipe.load_all([d]):
            for scratch, imagenet in study.pairs:
                a, b = scratch.to_dict(), imagenet.to_dict()
                assert {k for k in a if a[k] != b[k]} <= {"init", "pretrained", "name", "model"}
                ma, mb = a["model"], b["model"]
                assert {k for k in ma if ma[k] != mb[k]} <= {"freeze_at", "pixel_mean",
                                                             "pixel_std", "stride_in_1x1"}


@pytest.mark.slow
def test_every_recipe_plans_and_the_plan_json_is_stable(tmp_path):
    args = ["plan", *map(str, RECIPE_DIRS), "--json", "--runs-root", str(tmp_path)]
    first, second = _bench(*args), _bench(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    plan = json.loads(first.stdout)
    golden = json.loads((REPO / "tests/golden/plan.json").read_text())
    fields = ["run_id", "iterations", "lr_drops", "lr", "batch", "train_images", "gpus"]
    assert [{k: r[k] for k in fields} for r in plan["runs"]] == golden, \
        "run ids or schedules changed; if intended, regenerate tests/golden/plan.json"
    assert plan["unsupported"] == []  # every experiment of the paper's recipes runs


@pytest.mark.slow
def test_plan_estimates_only_from_measured_throughput(tmp_path, monkeypatch):
    table = tmp_path / "throughput.csv"
    monkeypatch.setenv("BENCH_THROUGHPUT", str(table))
    out = _bench("plan", str(REPO / "recipes/he2019/r50_gn.yaml"), "--json")
    plan = json.loads(out.stdout)
    assert plan["total_gpu_hours"] is None and all(r["gpu_hours"] is None for r in plan["runs"])
    from bench import speed
    # one model per arm (the pre-trained arm's frozen stem and res2 cost less)
    keys = {speed.speed_key(spec) for spec in HE2019["he2019-r50-gn"].runs}
    assert len(keys) == 2
    rows = [{**{c: "" for c in speed.COLUMNS}, "speed_key": key,
             "device": "NVIDIA H100 80GB HBM3", "sec_per_iter": "0.5"} for key in keys]
    speed.record(rows, table)
    plan = json.loads(_bench("plan", str(REPO / "recipes/he2019/r50_gn.yaml"), "--json").stdout)
    # both models measured at 0.5 s: iterations x 0.5 s x 8 GPUs
    assert plan["total_gpu_hours"] == pytest.approx(sum(0.5 * r["iterations"] * 8 / 3600
                                                        for r in plan["runs"]), abs=0.1)
    other = json.loads(_bench("plan", str(REPO / "recipes/he2019/r50_gn.yaml"), "--json",
                              "--gpu", "A100").stdout)
    assert other["total_gpu_hours"] is None


@pytest.mark.slow
def test_reproduce_without_coco_stops_in_seconds_naming_the_path_and_make_mini(tmp_path):
    t0 = time.time()
    out = _bench("run", str(REPO / "recipes/he2019"), "--coco", str(tmp_path / "coco"),
                 "--runs-root", str(tmp_path / "runs"))
    assert out.returncode == 2 and time.time() - t0 < 60
    (line,) = out.stderr.strip().splitlines()
    assert str(tmp_path / "coco" / "annotations" / "instances_train2017.json") in line
    assert "make mini" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_make_reproduce_he2019_dry_run_prints_the_plan_and_without_coco_stops(tmp_path):
    if subprocess.run(["make", "-q", "setup"], cwd=REPO).returncode != 0:
        pytest.skip("the venv is not set up by `make setup` (make would install it)")
    env = {**__import__("os").environ, "BENCH_RUNS": str(tmp_path / "runs")}
    dry = subprocess.run(["make", "-s", "reproduce-he2019", "DRY_RUN=1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr
    assert "104 runs" in dry.stdout and "not yet supported" not in dry.stdout
    real = subprocess.run(["make", "-s", "reproduce-he2019", f"COCO={tmp_path / 'coco'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert real.returncode != 0
    assert f"{tmp_path / 'coco'}/annotations/instances_train2017.json does not exist" in real.stderr
    assert "make mini" in real.stderr


@pytest.mark.slow
def test_plan_full_shows_every_resolved_value_of_every_run(tmp_path):
    """`bench plan --full` is the config dump a user reads before spending GPU time: every
    field of every run's resolved spec, enough to rebuild the run exactly."""
    from bench.spec import RunSpec
    recipe_file = str(REPO / "recipes/he2019/r50_gn.yaml")
    out = _bench("plan", recipe_file, "--json", "--full", "--runs-root", str(tmp_path))
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["runs"]
    for row, spec in zip(runs, HE2019["he2019-r50-gn"].runs):
        assert row["spec"] == json.loads(json.dumps(spec.to_dict()))
        assert RunSpec.from_dict(row["spec"]).run_id == row["run_id"]
    text = _bench("plan", recipe_file, "--full", "--runs-root", str(tmp_path))
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("\n# mask_rcnn-resnet50-GN-") == len(runs)
    assert text.stdout.count("freeze_at:") == len(runs)
    assert "steps: [120000, 160000]" in text.stdout


def test_fig7_left_trains_35k_images_with_the_full_coco_hyper_parameters():
    """Fig. 7 (left): on the same 35k subset as the re-tuned runs (middle), the full-COCO
    hyper-parameters, with which the pre-trained model overfits."""
    full, tuned = HE2019["he2019-less-data-35k-full-coco"], HE2019["he2019-less-data-35k"]
    paper = HE2019["he2019-r50-gn"].runs[0]
    for r in full.runs:
        assert (r.data.train_images, r.data.subset_seed) == (35_000, 0)
        assert (r.solver.base_lr, r.solver.gamma, r.data.train_min_size) == \
            (paper.solver.base_lr, paper.solver.gamma, 800)
    assert {r.solver.schedule for r in full.runs} == {r.solver.schedule for r in tuned.runs}
    assert {r.data.subset_seed for r in tuned.runs} == {0}


def test_fig5_train_aug_draws_the_shorter_side_from_640_to_800_at_the_papers_schedules():
    """Fig. 5: scale augmentation in training needs longer schedules: the paper's points are
    scratch 9x and pre-trained 6x; a matched pair runs both at both."""
    for name in ("he2019-r50-gn-train-aug", "he2019-r101-gn-train-aug"):
        runs = HE2019[name].runs
        assert {(r.init, r.solver.schedule) for r in runs} >= {("scratch", "9x"),
                                                                 ("imagenet", "6x")}
        for r in runs:
            assert r.data.train_min_size == (640, 672, 704, 736, 768, 800)
            assert (r.data.test_min_size, r.solver.base_lr) == (800, 0.02)


def test_a_coco_step_is_timed_with_the_polygon_targets_it_trains_with():
    """COCO runs rasterize each positive RoI's polygons on the CPU: bench speed times that
    (its synthetic COCO batch carries polygons) and keeps those rows apart from bitmask ones;
    the inits, which cost nothing per step, share their rows."""
    import torch

    from bench import speed
    from bench.spec import replace
    spec = next(s for s in HE2019["he2019-r50-gn"].runs if s.init == "scratch")
    assert spec.model.mask_target == "polygon"
    _, targets = speed._synthetic_batch(spec, 2, torch.Generator().manual_seed(0), "cpu")
    assert all(len(t["polygons"]) == len(t["boxes"]) for t in targets)
    bitmask = replace(spec, **{"model.mask_target": "bitmask"})
    assert "polygons" not in speed._synthetic_batch(bitmask, 1, torch.Generator(), "cpu")[1][0]
    assert speed.speed_key(bitmask) != speed.speed_key(spec)
    assert speed.speed_key(replace(spec, **{"model.conv_init": "msra",
                                            "model.mask_logits_init": "normal"})) == \
        speed.speed_key(spec)


def test_reproduce_he2019_trains_what_this_machine_has_and_names_what_it_leaves_out(
        tmp_path, monkeypatch):
    # COCO here (its instances, not its person keypoints), PASCAL VOC not, and no GN ResNeXt-152 ImageNet checkpoint (nobody publishes
    # one): the VOC study and the X152 pre-trained arms are left out, one line each, and the
    # X152 scratch arms (the paper's 50.9) still train
    from conftest import make_coco_layout
    from bench import preflight
    monkeypatch.setenv("BENCH_COCO", str(make_coco_layout(tmp_path)))
    monkeypatch.setenv("BENCH_VOC", str(tmp_path / "no-voc"))
    studies = recipe.load_all([REPO / "recipes/he2019"])
    specs = [s for st in studies for s in st.runs]
    kept, lines = preflight.available(studies, specs, tmp_path / "runs")
    left_out = {s.run_id for s in specs} - {s.run_id for s in kept}
    assert any(line.startswith("skipped 4 runs on voc: PASCAL VOC not found") for line in lines)
    assert any("x152_gn_cascade.yaml: checkpoint cache:imagenet/X-152-32x8d-GN.pkl not found"
               in line for line in lines)
    assert all(s.data.dataset in ("voc", "coco-keypoints") or s.init == "imagenet" for s in specs
               if s.run_id in left_out)
    assert {s.init for s in kept if s.model.groups == 32} == {"scratch"}
    assert all("\n" not in line for line in lines)
    # with no COCO either, nothing is left: one line, naming COCO's file, as without the flag
    monkeypatch.setenv("BENCH_COCO", str(tmp_path / "no-coco"))
    with pytest.raises(preflight.PreflightError, match="nothing left to train: .*COCO not found"):
        preflight.available(studies, specs, tmp_path / "runs")


def test_every_published_number_a_study_claims_is_set_beside_its_runs():
    # a row naming our study but with no readable length would silently never be compared
    import pandas as pd
    from bench.analysis import reference
    rows = pd.read_csv(REPO / "results/reference/he2019.csv", dtype={"iterations": str})
    claimed = rows[rows["recipe"].notna() & rows["value"].notna()
                   & rows["metric"].isin(list(reference.METRICS))]
    loaded = reference.load()
    assert len(claimed) > 0
    for _, r in claimed.iterrows():
        hit = loaded[(loaded["study"] == r["recipe"]) & (loaded["init"] == r["init"])
                     & (loaded["metric"] == reference.METRICS[r["metric"]])
                     & (loaded["published"] == float(r["value"]))]
        # only a row whose length the paper leaves open ("3x or 4x", unstated) stays out
        if r["experiment"].startswith(("large_models", "enhanced_baselines")) or \
                reference._iterations(r["iterations"], r["schedule"])[0] is not None:
            assert len(hit), (r["recipe"], r["init"], r["metric"], r["value"])
    studies = {s.name for s in recipe.load_all([REPO / "recipes/he2019"])}
    assert set(loaded["study"][loaded["study"].str.startswith("he2019")]) <= studies
