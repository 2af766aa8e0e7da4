"""The whole study end to end on a tiny embedded dataset, through the same commands as
`make mini`: data, pretrain, run (real training and COCO eval), figures; and a rerun after a
kill that loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import recipe
from bench.analysis import table
from bench.rundir import RunDir
from bench.rundir import run_dir_for

pytestmark = pytest.mark.slow


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall", "time", "data_time", "eval_time")}
            for r in rows]


def bench(*args, runs=None, timeout=600, check=True):
    cmd = [sys.executable, "-m", "bench.cli", *map(str, args)]
    if runs is not None:
        cmd += ["--runs-root", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, bench_data):
    """The tiny study trained once for the tests of this module."""
    tmp = tmp_path_factory.mktemp("study")
    from conftest import TINY_RECIPE
    path = tmp / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    runs = tmp / "runs"
    bench("data", "shapes-tiny", "shapes-cls-tiny")
    bench("pretrain", path)
    out = bench("run", path, "--slots", "2", runs=runs)
    return path, runs, out


def test_pipeline_trains_and_evaluates_every_run(finished_study):
    path, runs, out = finished_study
    study = recipe.load(path)
    assert "failed 0" in out.stdout
    for spec in study.runs:
        rd = RunDir(run_dir_for(spec, runs))
        assert rd.read_status()["state"] == "done"
        rows = rd.read_metrics()
        evals = [r for r in rows if r["type"] == "eval"]
        assert [r["iteration"] for r in evals] == list(range(9, spec.solver.max_iter + 1, 9))
        for name in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/ARl"):
            assert name in evals[-1]
        trains = [r["iteration"] for r in rows if r["type"] == "train"]
        assert trains == sorted(set(trains)) and trains[-1] == spec.solver.max_iter
        assert rd.read_spec() == spec
        assert (rd.checkpoints / f"model_{spec.solver.max_iter:07d}.pth").is_file()


def test_rerun_skips_finished_runs(finished_study):
    path, runs, _ = finished_study
    out = bench("run", path, runs=runs)
    assert "skipped (already done) 8" in out.stdout and "done 0" in out.stdout


def test_figures_and_tables_are_written_from_run_dirs(finished_study, tmp_path):
    _, runs, _ = finished_study
    results = tmp_path / "results"
    bench("figures", "--collect", "--study", "tiny", "--results", results, runs=runs)
    out_dir = results / "tiny"
    for name in ("ap_vs_iterations.png", "ap_vs_train_size.png", "final_ap.csv", "final_ap.md"):
        assert (out_dir / name).stat().st_size > 0
    assert len(list((out_dir / "runs").iterdir())) == 8 and (results / "index.html").is_file()
    md = (out_dir / "final_ap.md").read_text()
    assert md.count("\n") == 2 + 4  # header + one row per pair
    assert md.count("| done |") == 4
    final = table.final_metrics(table.load_runs(runs / "tiny"))
    assert len(final) == 8 and set(final["init"]) == {"scratch", "imagenet"}


def test_status_lists_every_run(finished_study):
    path, runs, _ = finished_study
    out = bench("status", path, runs=runs)
    assert out.stdout.count(" done ") == 8


def test_killed_study_rerun_resumes_and_loses_nothing(tmp_path, finished_study):
    """SIGKILL the runner and its workers mid-study; the rerun redoes no finished run and
    resumes the interrupted one from its checkpoint with no duplicated metrics rows, and
    every run ends with bitwise the weights and metrics of the uninterrupted study."""
    path, whole, _ = finished_study
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bench.cli", "run", str(path), "--slots", "1",
           "--only=-2x-", "--runs-root", str(runs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    study = recipe.load(path)
    specs = [s for s in study.runs if "-2x-" in s.run_id]
    deadline = time.time() + 300
    # wait until one run is done and another has a checkpoint, then kill everything
    while time.time() < deadline:
        assert proc.poll() is None, "the runner ended before it could be killed"
        states = [RunDir(run_dir_for(s, runs)).read_status().get("state") for s in specs]
        ckpts = [RunDir(run_dir_for(s, runs)).checkpoints for s in specs]
        if "done" in states and any(st == "running" and any(c.glob("model_*.pth"))
                                    for st, c in zip(states, ckpts)):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {s.run_id: (run_dir_for(s, runs) / "metrics.jsonl").read_bytes()
                   for s in specs if RunDir(run_dir_for(s, runs)).read_status().get("state") == "done"}
    assert done_before, "the test did not reach a finished run before the kill"

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for s in specs:
        rd = RunDir(run_dir_for(s, runs))
        assert rd.read_status()["state"] == "done"
        rows = rd.read_metrics()
        for kind in ("train", "eval"):
            its = [r["iteration"] for r in rows if r["type"] == kind]
            assert its == sorted(set(its)), f"duplicated {kind} rows after resume: {its}"
        assert [r["iteration"] for r in rows if r["type"] == "eval"] == [9, 18]
        if s.run_id in done_before:  # finished work is never redone
            assert (run_dir_for(s, runs) / "metrics.jsonl").read_bytes() == done_before[s.run_id]
        ref = RunDir(run_dir_for(s, whole))
        last = f"model_{s.solver.max_iter:07d}.pth"
        a = torch.load(rd.checkpoints / last, weights_only=False)["model"]
        b = torch.load(ref.checkpoints / last, weights_only=False)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s.run_id
        assert strip_timing(rows) == strip_timing(ref.read_metrics()), s.run_id
    log = "".join((run_dir_for(s, runs) / "log.txt").read_text() for s in specs)
    assert "resumed" in log


def test_sigterm_stops_the_study_after_a_checkpoint_where_it_is(tmp_path, finished_study):
    """`kill RUNNER` (or a scheduler's SIGTERM) mid-run: the run checkpoints the iteration
    it is on, between periodic checkpoints, is left queued there, and the rerun resumes it."""
    path, _, _ = finished_study
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bench.cli", "run", str(path), "--slots", "1",
           "--only=scratch-2x-allimg", "--runs-root", str(runs)]
    longer = ["solver.unit_iters=90", "eval.period=180", "checkpoint.period=180"]
    cmd += [a for o in longer for a in ("--set", o)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    spec = next(s for s in recipe.load(path, recipe.parse_overrides(longer)).runs
                if "scratch-2x-allimg" in s.run_id)
    rd = RunDir(run_dir_for(spec, runs))
    deadline = time.time() + 300
    while rd.read_status().get("state") != "running" and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    time.sleep(3)  # into the 180 iterations, far from the periodic checkpoint at 180
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    status = rd.read_status()
    stop = status["iteration"]
    assert status["state"] == "queued" and 0 < stop < spec.solver.max_iter, status
    assert f"stopped at iteration {stop}" in (rd.path / "log.txt").read_text()
    assert (rd.checkpoints / f"model_{stop:07d}.pth").exists()

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resumed {rd.path.name} at iteration {stop}" in (rd.path / "log.txt").read_text()
    its = [r["iteration"] for r in rd.read_metrics() if r["type"] == "train"]
    assert its == list(range(20, spec.solver.max_iter + 1, 20))


def test_missing_pretrained_checkpoint_stops_before_training(tmp_path, bench_data):
    from conftest import TINY_RECIPE
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.replace("tiny-resnet10-w32-GN.pth", "absent.pth"))
    out = bench("run", path, runs=tmp_path / "runs", check=False)
    assert out.returncode == 2
    assert "absent.pth not found" in out.stderr and "bench pretrain" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_metrics_rows_are_json_lines_keyed_by_iteration(finished_study):
    _, runs, _ = finished_study
    any_metrics = next(runs.rglob("metrics.jsonl"))
    for line in any_metrics.read_text().splitlines():
        row = json.loads(line)
        assert row["type"] in ("train", "eval") and isinstance(row["iteration"], int)
        assert row["images_seen"] == row["iteration"] * 2
