"""A study survives its faults: a run that fails leaves the others finishing, and storage that
cannot take the runs is reported before any training starts."""

import subprocess
import sys
from collections import namedtuple

import pytest

from bench import preflight, recipe
from bench.rundir import RunDir, run_dir_for
from conftest import scratch_study, write_recipe


def bench_run(path, runs, *extra):
    return subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--only=scratch",
                           "--runs-root", str(runs), *extra],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_that_diverges_fails_alone_and_the_study_goes_on(tmp_path):
    path = write_recipe(tmp_path, scratch_study(9).replace(
        "  schedule: [1x]", "  schedule: [1x]\n  solver.base_lr: [0.02, 1.0e+30]"))
    runs = tmp_path / "runs"
    out = bench_run(path, runs)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "done 1, skipped (already done) 0, failed 1" in out.stdout
    good, bad = sorted((s for s in recipe.load(path).runs if s.init == "scratch"),
                       key=lambda s: s.solver.base_lr)
    assert RunDir(run_dir_for(good, runs)).read_status()["state"] == "done"
    status = RunDir(run_dir_for(bad, runs)).read_status()
    assert status["state"] == "failed"
    assert status["error"].startswith("NonFiniteLoss: loss is ") and "last good checkpoint" in \
        status["error"]
    assert f"failed {bad.run_id}: NonFiniteLoss" in out.stdout

    again = bench_run(path, runs)  # the rerun retries the failed run only
    assert "skipped (already done) 1, failed 1" in again.stdout


@pytest.mark.slow
def test_an_unwritable_runs_root_is_one_line_before_training(tmp_path):
    path = write_recipe(tmp_path, scratch_study(9))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = bench_run(path, blocker / "runs")
    assert out.returncode == 2
    assert out.stderr.startswith(f"bench run: runs root {blocker / 'runs'} is not writable (")
    assert "--runs-root" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_disk_without_room_for_the_checkpoints_is_one_line_before_training(tmp_path,
                                                                             monkeypatch):
    spec = next(s for s in recipe.load(write_recipe(tmp_path, scratch_study(9))).runs
                if s.init == "scratch")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(2 ** 30, 2 ** 30 - 2 ** 20, 2 ** 20))
    with pytest.raises(preflight.PreflightError, match=r"runs root .*: 0\.00 GiB free but the 1 run\(s\) "
                                                 r"about to start need about 0\.\d\d GiB"):
        preflight.check_storage(tmp_path / "runs", [spec], parallel=2)
    monkeypatch.undo()
    preflight.check_storage(tmp_path / "runs", [spec], parallel=2)  # this disk has the room


def test_a_half_done_run_needs_room_only_for_the_checkpoints_it_has_not_saved(tmp_path,
                                                                              monkeypatch):
    # It was refused with "0.02 GiB free but ... need about 0.04 GiB" on a disk with room
    # for its next checkpoint: the ones it already holds were counted as still to come.
    spec = next(s for s in recipe.load(write_recipe(tmp_path, scratch_study(9))).runs
                if s.init == "scratch")
    size = preflight.checkpoint_bytes(spec)
    held = run_dir_for(spec, tmp_path / "runs") / "checkpoints"
    held.mkdir(parents=True)
    for k in range(spec.checkpoint.keep):
        (held / f"model_{9 * (k + 1):07d}.pth").write_bytes(bytes(size))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(2 ** 40, 0, int(1.5 * size)))
    preflight.check_storage(tmp_path / "runs", [spec], parallel=1)
    monkeypatch.setattr("shutil.disk_usage", lambda _: usage(2 ** 40, 0, size // 2))
    with pytest.raises(preflight.PreflightError, match="GiB more for checkpoints"):
        preflight.check_storage(tmp_path / "runs", [spec], parallel=1)  # not even the next one


@pytest.mark.slow
def test_a_failed_evaluation_keeps_its_checkpoint_and_the_rerun_evaluates_it(tmp_path,
                                                                             monkeypatch):
    """The checkpoint of an eval iteration is written before the evaluation: a crash in it
    (a missing val image, a killed process) loses no training, and the resumed run
    evaluates that iteration first, ending as the run that never failed."""
    from bench.engines.torchvision import train as tv
    spec = next(s for s in recipe.load(write_recipe(tmp_path, scratch_study(9))).runs
                if s.init == "scratch")
    quiet = dict(log=lambda m: None)
    whole = tv.train(spec, tmp_path / "whole", **quiet)

    def broken(*a, **k):
        raise OSError("image val/000000000005.jpg is unreadable")
    with monkeypatch.context() as m:
        m.setattr(tv, "evaluate", broken)
        with pytest.raises(OSError, match="unreadable"):
            tv.train(spec, tmp_path / "run", **quiet)
    rd = RunDir(tmp_path / "run")
    assert (rd.checkpoints / "model_0000009.pth").is_file()  # the training is kept
    assert not [r for r in rd.read_metrics() if r["type"] == "eval"]

    messages = []
    tv.train(spec, rd.path, log=messages.append)
    assert any("evaluating iteration 9" in m for m in messages)
    assert rd.read_status()["state"] == "done"

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("wall", "time", "data_time",
                                                         "eval_time")} for r in rows]
    assert strip(rd.read_metrics()) == strip(whole.read_metrics())
    tv.train(spec, rd.path, **quiet)  # a further rerun has nothing left to do
    assert len([r for r in rd.read_metrics() if r["type"] == "eval"]) == 1
