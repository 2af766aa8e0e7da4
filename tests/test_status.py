"""`bench status` reads each run's progress, APs, cost and place from its run dir."""

import json
import os
import socket
import subprocess
import sys

import pytest

from bench import recipe, status
from bench.rundir import RunDir
from bench.spec import SpecError
from conftest import scratch_study, write_recipe


def _spec(tmp_path):
    return next(s for s in recipe.load(write_recipe(tmp_path, scratch_study(180))).runs
                if s.init == "scratch")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_run_shows_its_eta_cost_and_place(tmp_path):
    spec = _spec(tmp_path)
    rd = RunDir(tmp_path / "run")
    rd.write_status("running", iteration=60, max_iter=180, sec_per_iter=30.0,
                    train_seconds=7200.0, where="slurm job 12 on gpu-a1")
    rd.append_metrics({"type": "eval", "iteration": 60, "bbox/AP": 12.345, "segm/AP": 10.0})
    row = status.row(spec, rd.path)
    assert row["state"] == "running" and row["iteration"] == "60/180"
    assert (row["box AP"], row["mask AP"]) == ("12.3", "10.0")
    assert row["ETA"] == "1h00m"                   # 120 iterations at 30 s
    assert row["GPU-h"] == f"{2.0 * spec.gpus:.2f}"  # 2 h of wall-clock on `gpus` GPUs
    assert row["where"] == "slurm job 12 on gpu-a1"


def test_a_run_whose_process_died_shows_as_interrupted(tmp_path):
    spec = _spec(tmp_path)
    rd = RunDir(tmp_path / "run")
    rd.write_status("running", iteration=40, max_iter=180, sec_per_iter=1.0)
    doc = json.loads(rd.status_file.read_text())
    doc.update(pid=_dead_pid(), host=socket.gethostname())
    rd.status_file.write_text(json.dumps(doc))
    row = status.row(spec, rd.path)
    assert row["state"] == "interrupted" and row["ETA"] == "-"
    assert status.row(spec, tmp_path / "never-started")["state"] == "queued"


@pytest.mark.slow
def test_status_is_a_table_with_a_summary_and_the_failures(tmp_path):
    path = write_recipe(tmp_path, scratch_study(180))
    spec = _spec(tmp_path)
    from bench.rundir import run_dir_for
    rd = RunDir(run_dir_for(spec, tmp_path / "runs"))
    rd.write_status("failed", iteration=20, error="NonFiniteLoss: loss is nan at iteration 20",
                    train_seconds=36.0)
    out = subprocess.run([sys.executable, "-m", "bench.cli", "status", str(path), "--runs-root",
                          str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["run", "state", "iteration", "box", "AP", "mask", "AP", "ETA",
                                "GPU-h", "where", "updated"]
    assert "2 runs: 1 failed, 1 queued; 0.01 GPU-hours used" in out.stdout
    assert f"  failed {spec.run_id}: NonFiniteLoss: loss is nan at iteration 20" in lines


@pytest.mark.slow
def test_damaged_run_files_read_as_unknown_not_as_a_traceback(tmp_path):
    """status.json and metrics.jsonl are rewritten by a rerun: damage reads as queued, and a
    row that is not a metrics row is skipped. spec.yaml is the run's record: its damage is
    one line naming the file. A runs root that does not exist is named too."""
    path = write_recipe(tmp_path, scratch_study(180))
    spec = _spec(tmp_path)
    from bench.rundir import run_dir_for
    rd = RunDir(run_dir_for(spec, tmp_path / "runs"))
    rd.write_spec(spec)
    rd.status_file.write_text("[1]")
    rd.metrics_file.write_text('[1]\n{"type": "train", "iteration": 20, "loss": 1.5}\n{"state": 5}\n')
    assert rd.read_status() == {"state": "queued"}
    assert [r["iteration"] for r in rd.read_metrics()] == [20]

    def status(root):
        return subprocess.run([sys.executable, "-m", "bench.cli", "status", str(path),
                               "--runs-root", str(root)], capture_output=True, text=True,
                              timeout=120)
    assert status(tmp_path / "runs").returncode == 0
    out = status(tmp_path / "nowhere")
    assert out.returncode == 2 and "nowhere is not a directory" in out.stderr

    rd.spec_file.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match=r"spec.yaml: the run's record is damaged \(not YAML"):
        rd.read_spec()
