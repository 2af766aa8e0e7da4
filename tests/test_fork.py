"""A shorter schedule is the longest run of its family up to its first LR drop: forked from
the parent's checkpoint there, it ends exactly as if trained on its own."""

import json
import shutil

import numpy as np
import pytest
import torch

from bench import fork, interrupt, per_image, recipe, runner
from bench.analysis.bootstrap import Accumulator
from bench.engines.torchvision import train as train_mod
from bench.rundir import RunDir, run_dir_for
from conftest import REPO, write_recipe

FAMILY = f"""
study: family
base: {REPO}/recipes/mini/_model.yaml
run:
  pretrained: cache:pretrained/unused.pth
  data: {{dataset: shapes-tiny}}
  solver: {{batch: 2, ref_batch: 2, base_lr: 0.08, unit_iters: 45, drops_from_end: [30, 10], warmup_iters: 3}}
  eval: {{period: 15}}
  checkpoint: {{period: 45, keep: 1}}
vary:
  schedule: [1x, 3x]
compare:
  init: [scratch, imagenet]
"""


def _scratch(path, overrides=()):
    runs = [s for s in recipe.load(path, recipe.parse_overrides(list(overrides))).runs
            if s.init == "scratch"]
    return sorted(runs, key=lambda s: s.solver.max_iter)


def untimed(rd):
    return [{k: v for k, v in r.items() if not k.endswith("time") and k not in ("wall",
                                                                               "forked_from")}
            for r in rd.read_metrics()]


# -- families: pure data ---------------------------------------------------------------------

def test_the_mini_study_is_six_families_each_forking_at_the_first_lr_drops():
    study = recipe.load(REPO / "recipes/mini/study.yaml")
    fams = fork.families(study.runs)
    assert len(fams) == 6  # scratch/imagenet x 200 images/500 images/all
    by_id = {s.run_id: s for s in study.runs}
    for parent_id, children in fams.items():
        parent = by_id[parent_id]
        assert parent.solver.schedule == "13x"
        assert sorted((c.solver.max_iter, f) for c, f in children) == [
            (2160, 1440), (4320, 3600), (6480, 5760), (8640, 7920), (10800, 10080),
            (12960, 12240)]  # 2x, 4x, 6x, 8x, 10x, 12x: 720 iterations before each end
        for child, f in children:
            assert f == min(child.solver.steps)
            # the LR of every iteration before the fork point is the parent's
            assert all(train_mod.schedule.lr_factor(child.solver, i)
                       == train_mod.schedule.lr_factor(parent.solver, i) for i in range(f))
            assert fork.family_key(child) == fork.family_key(parent)


def test_runs_that_differ_in_anything_but_the_schedule_length_are_not_a_family(tmp_path):
    path = write_recipe(tmp_path, FAMILY.replace("  schedule: [1x, 3x]",
                                                 "  schedule: [1x, 3x]\n  seed: [0, 1]"))
    runs = _scratch(path)
    fams = fork.families(runs)
    assert len(fams) == 2
    for parent_id, children in fams.items():
        parent = next(s for s in runs if s.run_id == parent_id)
        assert [c.seed for c, _ in children] == [parent.seed]
    one, three = _scratch(write_recipe(tmp_path, FAMILY, "b.yaml"))
    other_lr = _scratch(write_recipe(tmp_path, FAMILY.replace("warmup_iters: 3",
                                                               "warmup_iters: 4"), "c.yaml"))[1]
    assert fork.fork_point(three, one) == 30 and fork.fork_point(other_lr, one) is None


# -- the runner forks --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_forked_1x_run_ends_with_the_weights_and_metrics_of_the_1x_run_trained_alone(tmp_path):
    path = write_recipe(tmp_path, FAMILY)
    one, three = _scratch(path)
    lines = []
    out = runner.run([one, three], tmp_path / "forked", slots=["cpu0", "cpu1"], progress=False,
                     log=lines.append)
    assert sorted(out.done) == sorted([one.run_id, three.run_id]), out.failed
    assert f"{one.run_id}: forked from {three.run_id} at iteration 30" in lines
    alone = runner.run([one], tmp_path / "alone", slots=["cpu0"], progress=False, forking=False,
                       log=lambda m: None)
    assert alone.done == [one.run_id]

    forked = RunDir(run_dir_for(one, tmp_path / "forked"))
    ref = RunDir(run_dir_for(one, tmp_path / "alone"))
    wa = torch.load(ref.checkpoints / "model_0000045.pth", weights_only=False)["model"]
    wb = torch.load(forked.checkpoints / "model_0000045.pth", weights_only=False)["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise: the CPU kernels here are deterministic
    assert untimed(forked) == untimed(ref)
    # every evaluation kept its per-image results (the inherited ones too), which give its
    # row's AP again
    evals = [r for r in forked.read_metrics() if r["type"] == "eval"]
    assert [r["iteration"] for r in evals] == [15, 30, 45]
    for row in evals:
        mine = per_image.load(forked.per_image_file(row["iteration"]))
        theirs = per_image.load(ref.per_image_file(row["iteration"]))
        for task in ("bbox", "segm"):
            assert all(np.array_equal(mine[task][k], theirs[task][k]) for k in per_image.KEYS)
            assert Accumulator(mine[task]).average_precision() == \
                pytest.approx(row[f"{task}/AP"], abs=1e-6)
    rows = forked.read_metrics()
    assert {r["iteration"] for r in rows if "forked_from" in r} == {15, 20, 30}
    assert all(r["forked_from"] == three.run_id for r in rows if r["iteration"] <= 30)
    status = forked.read_status()
    assert status["forked_from"] == three.run_id and status["fork_iteration"] == 30
    # the parent kept its fork checkpoint (keep: 1 keeps only the last otherwise)
    parent = RunDir(run_dir_for(three, tmp_path / "forked"))
    assert fork.requested(parent.path) == [30]
    assert (parent.checkpoints / "model_0000030.pth").is_file()

    again = runner.run([one, three], tmp_path / "forked", slots=["cpu0", "cpu1"],
                       progress=False, log=lambda m: None)
    assert sorted(again.skipped) == sorted([one.run_id, three.run_id])


@pytest.mark.slow
def test_a_parent_stopped_before_the_fork_point_resumes_and_still_saves_it(tmp_path,
                                                                           monkeypatch):
    path = write_recipe(tmp_path, FAMILY)
    one, three = _scratch(path)
    rd = RunDir(tmp_path / "parent")
    rd.write_spec(three)
    fork.request(rd.path, [30])
    calls = {"n": 0}
    real = train_mod.Stepper.__call__

    def stop_at_10th(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:
            interrupt.request()
        return real(self, *a, **k)
    monkeypatch.setattr(train_mod.Stepper, "__call__", stop_at_10th)
    with pytest.raises(interrupt.Stopped):
        train_mod.train(three, rd.path)
    interrupt.clear()
    monkeypatch.undo()
    assert [p.name for p in sorted(rd.checkpoints.iterdir())] == ["model_0000010.pth"]
    train_mod.train(three, rd.path)
    assert sorted(p.name for p in rd.checkpoints.iterdir()) == ["model_0000030.pth",
                                                                "model_0000135.pth"]
    fork.fork(three, rd.path, one, tmp_path / "child", 30)
    child = RunDir(tmp_path / "child")
    assert child.read_status()["iteration"] == 30


@pytest.mark.slow
def test_a_child_whose_parent_checkpoint_is_corrupt_says_so_and_trains_from_the_start(tmp_path):
    path = write_recipe(tmp_path, FAMILY.replace("unit_iters: 45", "unit_iters: 9").replace(
        "drops_from_end: [30, 10]", "drops_from_end: [6, 2]").replace("period: 15", "period: 9"))
    one, three = _scratch(path)
    parent = RunDir(run_dir_for(three, tmp_path / "runs"))
    parent.write_spec(three)
    parent.write_status("done", iteration=27, max_iter=27)
    parent.checkpoints.mkdir(parents=True)
    (parent.checkpoints / "model_0000006.pth").write_bytes(b"torn")
    lines = []
    out = runner.run([one, three], tmp_path / "runs", slots=["cpu0"], progress=False,
                     log=lines.append)
    assert out.done == [one.run_id] and out.skipped == [three.run_id]
    said = [m for m in lines if "cannot fork" in m]
    assert len(said) == 1 and "model_0000006.pth is unreadable" in said[0]
    assert said[0].endswith("training from the start") and "\n" not in said[0]
    child = RunDir(run_dir_for(one, tmp_path / "runs"))
    assert not any("forked_from" in r for r in child.read_metrics())
    assert "forked_from" not in child.read_status()


def test_a_child_never_forks_from_a_run_dir_holding_another_spec(tmp_path):
    one, three = _scratch(write_recipe(tmp_path, FAMILY))
    other = _scratch(write_recipe(tmp_path, FAMILY.replace("seed", "seed").replace(
        "warmup_iters: 3", "warmup_iters: 4"), "other.yaml"))[1]
    rd = RunDir(tmp_path / "parent")
    rd.write_spec(other)
    (rd.checkpoints).mkdir(parents=True)
    torch.save({"iteration": 30}, rd.checkpoints / "model_0000030.pth")
    with pytest.raises(fork.ForkUnavailable, match="holds another run"):
        fork.fork(three, rd.path, one, tmp_path / "child", 30)
    assert not (tmp_path / "child").exists()


def test_no_fork_is_a_recipe_key_and_keeps_the_run_ids(tmp_path):
    plain = recipe.load(write_recipe(tmp_path, FAMILY))
    off = recipe.load(write_recipe(tmp_path, FAMILY + "fork: false\n", "off.yaml"))
    assert plain.fork is True and off.fork is False
    assert [s.run_id for s in plain.runs] == [s.run_id for s in off.runs]
    with pytest.raises(recipe.SpecError, match="fork: must be true"):
        recipe.load(write_recipe(tmp_path, FAMILY + "fork: sometimes\n", "bad.yaml"))
    assert json.loads(json.dumps(fork.requested(tmp_path))) == []


def test_the_plan_shows_each_child_fork_and_the_gpu_hours_both_ways(tmp_path, monkeypatch):
    from bench import speed
    from bench.plan import rows as plan_rows
    study = recipe.load(REPO / "recipes/he2019/r50_gn.yaml")
    table = tmp_path / "throughput.csv"
    monkeypatch.setenv("BENCH_THROUGHPUT", str(table))
    # both arms' models (the pre-trained arm freezes its stem and res2) at 0.5 s/iter
    rows = [{**{c: "" for c in speed.COLUMNS}, "speed_key": key,
             "device": "NVIDIA H100 80GB HBM3", "sec_per_iter": "0.5"}
            for key in {speed.speed_key(s) for s in study.runs}]
    speed.record(rows, table)
    rows = plan_rows([study], tmp_path, "H100")
    by_id = {r["run_id"]: r for r in rows}
    for r in rows:
        if r["schedule"] == "6x":
            assert r["forks_from"] is None and r["gpu_hours_forked"] == r["gpu_hours"]
        else:  # every shorter schedule forks from the 6x run of its init, 60k before its end
            parent = by_id[r["forks_from"]]
            assert (parent["schedule"], parent["init"]) == ("6x", r["init"])
            assert r["fork_at"] == r["iterations"] - 60_000 == r["lr_drops"][0]
            assert r["gpu_hours_forked"] == round(60_000 * 0.5 * 8 / 3600, 2)
    # 2x..6x per init: 1.8 M iterations separately, 540k + 4 x 60k = 780k forked
    assert sum(r["iterations"] for r in rows) == 2 * 1_800_000
    naive, forked = sum(r["gpu_hours"] for r in rows), sum(r["gpu_hours_forked"] for r in rows)
    assert abs(naive / forked - 1_800_000 / 780_000) < 0.01
    off = recipe.load(REPO / "recipes/he2019/r50_gn.yaml", recipe.parse_overrides(["fork=false"]))
    assert all(r["forks_from"] is None for r in plan_rows([off], tmp_path, "H100"))


def test_a_fork_cut_short_leaves_a_child_that_forks_again(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, FAMILY.replace("unit_iters: 45", "unit_iters: 9").replace(
        "drops_from_end: [30, 10]", "drops_from_end: [6, 2]").replace("period: 15", "period: 3"))
    one, three = _scratch(path)
    parent = RunDir(tmp_path / "parent")
    parent.write_spec(three)
    parent.checkpoints.mkdir(parents=True)
    torch.save({"iteration": 6}, parent.checkpoints / "model_0000006.pth")
    for it in (3, 6):
        parent.append_metrics({"type": "eval", "iteration": it, "images_seen": 2 * it})

    def cross_device(*_):
        raise OSError(18, "Invalid cross-device link")

    def full_disk(*_):
        raise OSError(28, "No space left on device")
    # the rows and status are written, then the checkpoint copy fails
    monkeypatch.setattr(fork.os, "link", cross_device)
    monkeypatch.setattr(fork.shutil, "copyfile", full_disk)
    with pytest.raises(OSError):
        fork.fork(three, parent.path, one, tmp_path / "child", 6)
    child = RunDir(tmp_path / "child")
    assert not fork.has_started(child.path) and not child.metrics_file.exists()
    assert not child.status_file.exists() and list(child.checkpoints.iterdir()) == []
    monkeypatch.undo()
    fork.fork(three, parent.path, one, child.path, 6)
    assert fork.has_started(child.path) and child.read_status()["fork_iteration"] == 6
    assert [r["iteration"] for r in child.read_metrics()] == [3, 6]


@pytest.mark.slow
def test_a_longer_schedule_added_to_a_finished_study_starts_from_its_checkpoint(tmp_path):
    """Extending a study's schedules costs only what it adds: the new longest run trains as
    the finished 2x did up to the 2x's first LR drop, so it starts from the 2x's checkpoint
    there and ends exactly as if trained alone; a new 1x, whose parent (the 3x) now never
    passes the 1x's fork point, starts from the 2x as well instead of waiting."""
    keep_all = FAMILY.replace("checkpoint: {period: 45, keep: 1}", "checkpoint: {period: 15, keep: 9}")
    first = _scratch(write_recipe(tmp_path, keep_all.replace("[1x, 3x]", "[2x]"), "first.yaml"))
    one, two, three = _scratch(write_recipe(tmp_path, keep_all.replace("[1x, 3x]", "[1x, 2x, 3x]"),
                                            "longer.yaml"))
    assert [s.run_id for s in first] == [two.run_id]  # the same run in both designs
    runs = tmp_path / "runs"
    assert runner.run([two], runs, slots=["cpu0"], progress=False, log=lambda m: None).done
    lines = []
    out = runner.run([one, two, three], runs, slots=["cpu0", "cpu1"], progress=False,
                     log=lines.append)
    assert sorted(out.done) == sorted([one.run_id, three.run_id]) and out.skipped == [two.run_id]
    assert f"{three.run_id}: forked from {two.run_id} at iteration 60" in lines  # 2x's first drop
    assert f"{one.run_id}: forked from {two.run_id} at iteration 30" in lines    # 1x's first drop
    alone = runner.run([one, three], tmp_path / "alone", slots=["cpu0", "cpu1"], progress=False,
                       forking=False, log=lambda m: None)
    assert sorted(alone.done) == sorted([one.run_id, three.run_id])
    for spec, last in ((three, 135), (one, 45)):
        started = RunDir(run_dir_for(spec, runs))
        ref = RunDir(run_dir_for(spec, tmp_path / "alone"))
        wa = torch.load(ref.checkpoints / f"model_{last:07d}.pth", weights_only=False)["model"]
        wb = torch.load(started.checkpoints / f"model_{last:07d}.pth", weights_only=False)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), spec.name
        assert untimed(started) == untimed(ref)
        assert started.read_status()["forked_from"] == two.run_id
    # --no-fork trains every run from 0, head starts included
    shutil.copytree(run_dir_for(two, runs), run_dir_for(two, tmp_path / "runs2"))
    lines = []
    runner.run([three], tmp_path / "runs2", slots=["cpu0"], progress=False, forking=False,
               log=lines.append)
    assert not any("forked" in m for m in lines)
    assert "forked_from" not in RunDir(run_dir_for(three, tmp_path / "runs2")).read_status()


def test_only_a_finished_member_of_the_family_gives_a_head_start(tmp_path):
    one, three = _scratch(write_recipe(tmp_path, FAMILY))
    other = _scratch(write_recipe(tmp_path, FAMILY.replace("warmup_iters: 3", "warmup_iters: 4"),
                                  "other.yaml"))[0]
    for spec, state in ((one, "done"), (other, "done")):
        rd = RunDir(run_dir_for(spec, tmp_path))
        rd.write_spec(spec)
        rd.write_status(state, iteration=45, max_iter=45)
        rd.checkpoints.mkdir(parents=True)
        for it in (10, 15, 30):
            torch.save({"iteration": it}, rd.checkpoints / f"model_{it:07d}.pth")
        for it in range(5, 31, 5):
            rd.append_metrics({"type": "eval" if it % 15 == 0 else "train", "iteration": it})
    # the 1x trains alike with the 3x up to its own first drop (30), the 3x's is later
    assert fork.shared_prefix(one, three) == 30 and fork.shared_prefix(other, three) is None
    donor, it = fork.head_start(three, tmp_path)
    assert (donor.run_id, it) == (one.run_id, 30)
    (RunDir(run_dir_for(one, tmp_path)).checkpoints / "model_0000030.pth").unlink()
    assert fork.head_start(three, tmp_path)[1] == 15  # the latest it still has
    assert fork.head_start(three, tmp_path, skip={one.run_id}) is None
    RunDir(run_dir_for(one, tmp_path)).write_status("running", iteration=40, max_iter=45)
    assert fork.head_start(three, tmp_path) is None  # its checkpoints may still go
