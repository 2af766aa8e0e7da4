"""`bench run --slurm`: each run a Slurm job (submitit) that survives preemption.

The end-to-end tests submit to a real Slurm started on loopback (tests/slurm_cluster.py) and
skip, saying why, only where Slurm cannot be installed. The option handling is pure data and
runs everywhere."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from bench import recipe
from bench.rundir import RunDir
from bench.rundir import run_dir_for
from bench.slurm import RunJob, SlurmOptions
from conftest import scratch_study, write_recipe
from slurm_cluster import slurm_missing

needs_slurm = pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))


# -- options: pure data --------------------------------------------------------------------

def test_a_recipe_sets_where_its_runs_go_without_changing_what_they_are(tmp_path):
    plain = recipe.load(write_recipe(tmp_path, scratch_study(9), "a.yaml"))
    placed = recipe.load(write_recipe(tmp_path, scratch_study(
        9, "slurm: {partition: learnfair, time: 600, gpus_per_node: 4}"), "b.yaml"))
    assert placed.slurm == {"partition": "learnfair", "time": 600, "gpus_per_node": 4}
    assert [s.run_id for s in placed.runs] == [s.run_id for s in plain.runs]
    opts = SlurmOptions().updated(placed.slurm, "b.yaml").updated({"time": 60}, "--slurm")
    assert (opts.partition, opts.time, opts.gpus_per_node) == ("learnfair", 60, 4)
    over = recipe.load(tmp_path / "a.yaml", recipe.parse_overrides(["slurm.account=vision"]))
    assert over.slurm == {"account": "vision"}


@pytest.mark.parametrize("section, message", [
    ("slurm: {partitoin: x}", "unknown key slurm.partitoin; allowed: partition"),
    ("slurm: {time: 1h}", "slurm.time: '1h' is not a whole number"),
    ("slurm: {gpus_per_node: -1}", "slurm.gpus_per_node: -1 is not a whole number >= 0"),
    ("slurm: [debug]", "slurm: must be a mapping"),
])
def test_a_malformed_slurm_section_is_one_line_naming_the_key(tmp_path, section, message):
    with pytest.raises(recipe.SpecError, match=message):
        recipe.load(write_recipe(tmp_path, scratch_study(9, section)))


def test_a_run_spans_whole_nodes_of_its_gpus():
    spec = SimpleNamespace(gpus=16, name="r")
    assert SlurmOptions(gpus_per_node=8).layout(spec) == (2, 8)
    assert SlurmOptions(gpus_per_node=8).layout(SimpleNamespace(gpus=4, name="r")) == (1, 4)
    assert SlurmOptions(gpus_per_node=0).layout(spec) == (1, 16)  # CPU processes on one node
    with pytest.raises(ValueError, match="does not fill whole nodes"):
        SlurmOptions(gpus_per_node=8).layout(SimpleNamespace(gpus=12, name="r"))


def test_a_multi_node_job_rendezvouses_at_its_first_node_on_a_port_of_its_job_id():
    env = SimpleNamespace(job_id="4242", node=1, hostnames=["gpu-a1", "gpu-a2"])
    cmd = RunJob("/runs/x", "cuda", 4, nnodes=2, nproc_per_node=8, stop_wait_s=60)._command(env)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=gpu-a1", "--master-port=24242",
            "--nproc-per-node=8"} <= set(cmd)
    one = RunJob("/runs/x", "cpu", 1, nnodes=1, nproc_per_node=1, stop_wait_s=60)._command(env)
    assert one[1:4] == ["-m", "bench.worker", "/runs/x"]


@pytest.mark.slow
def test_without_sbatch_slurm_is_one_line_before_anything_runs(tmp_path):
    path = write_recipe(tmp_path, scratch_study(9))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    out = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(path), "--slurm",
                          "--runs-root", str(tmp_path / "runs")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("bench run: --slurm: sbatch not found: run `bench run --slurm` "
                                  "on a machine of the Slurm cluster")
    assert not (tmp_path / "runs").exists()


# -- a real Slurm ----------------------------------------------------------------------------

def bench_run(path, runs, *extra, wait=True, env=None):
    cmd = [sys.executable, "-m", "bench.cli", "run", str(path), "--only=scratch", "--slurm",
           "--partition", "debug", "--gpus-per-node", "0", "--cpus-per-gpu", "1", "--time", "30",
           "--runs-root", str(runs), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_study_runs_as_slurm_jobs_and_a_rerun_skips_it(slurm_cluster, tmp_path):
    path = write_recipe(tmp_path, scratch_study(9))
    runs = tmp_path / "runs"
    out = bench_run(path, runs)
    assert out.returncode == 0, out.stdout + out.stderr
    spec = next(s for s in recipe.load(path).runs if s.init == "scratch")
    rd = RunDir(run_dir_for(spec, runs))
    status = rd.read_status()
    assert status["state"] == "done" and status["iteration"] == spec.solver.max_iter
    job = status["slurm_job"]
    assert status["slurm_jobs"] == [job] and status["where"].startswith(f"slurm job {job} on ")
    assert slurm_cluster.run("sacct", "-j", job, "-X", "-n", "-o", "State").stdout.split() == [
        "COMPLETED"]
    assert [r["type"] for r in rd.read_metrics()][-1] == "eval"
    assert f"slurm job {job} (restart 0)" in (rd.path / "log.txt").read_text()

    again = bench_run(path, runs)
    assert again.returncode == 0 and "0 run(s) in Slurm, 1 already done" in again.stdout
    assert rd.read_status()["slurm_jobs"] == [job]

    refused = bench_run(path, runs, "--set", "vary.schedule=[2x]", "--partition", "nosuch")
    assert refused.returncode == 2
    assert refused.stderr.startswith("bench run: --slurm: sbatch refused mask_rcnn-")
    assert "invalid partition" in refused.stderr.lower(), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_preempted_job_checkpoints_requeues_and_resumes_where_it_stopped(slurm_cluster,
                                                                          tmp_path):
    """Slurm preempts the run's job (a higher-priority partition wants the node): the job
    gets USR2, the worker saves the iteration it is on, submitit requeues the job, and the
    requeued job (same id) resumes there; no metrics row is lost or repeated."""
    unit = 180
    path = write_recipe(tmp_path, scratch_study(unit))
    runs = tmp_path / "runs"
    out = bench_run(path, runs, "--partition", "low", "--no-wait")
    assert out.returncode == 0, out.stdout + out.stderr
    spec = next(s for s in recipe.load(path).runs if s.init == "scratch")
    rd = RunDir(run_dir_for(spec, runs))
    job = rd.read_status()["slurm_job"]
    deadline = time.time() + 300
    while not any(r["type"] == "train" for r in rd.read_metrics()):
        assert time.time() < deadline, (rd.path / "log.txt").read_text()
        time.sleep(0.3)
    slurm_cluster.run("sbatch", "-p", "high", "-o", "/dev/null", "--wrap", "true")

    deadline = time.time() + 400
    while rd.read_status().get("state") != "done":
        assert time.time() < deadline, (rd.path / "log.txt").read_text()
        assert rd.read_status().get("state") != "failed", rd.read_status()
        time.sleep(1)
    log = (rd.path / "log.txt").read_text()
    stopped = [int(line.split("stopped at iteration ")[1].split()[0])
               for line in log.splitlines() if "stopped at iteration" in line]
    assert len(stopped) == 1 and 0 < stopped[0] < spec.solver.max_iter, log
    assert f"resumed {rd.path.name} at iteration {stopped[0]}" in log
    assert f"slurm job {job} (restart 1)" in log
    status = rd.read_status()
    assert status["slurm_job"] == job and status["slurm_restarts"] == 1
    its = [r["iteration"] for r in rd.read_metrics() if r["type"] == "train"]
    assert its == list(range(20, spec.solver.max_iter + 1, 20))
    states = []
    deadline = time.time() + 60
    while states[-1:] != ["COMPLETED"] and time.time() < deadline:
        time.sleep(0.5)
        states = slurm_cluster.run("sacct", "-j", job, "-D", "-X", "-n", "-o",
                                   "State").stdout.split()
    assert states == ["PREEMPTED", "COMPLETED"] or states == ["REQUEUED", "COMPLETED"], states


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_at_its_time_limit_requeues_itself_until_the_run_is_done(slurm_cluster, tmp_path):
    """A run longer than its job's time limit goes on in pieces: Slurm warns the job
    (USR2, `signal_delay_s` before the limit), the run saves where it is, and the job
    requeues itself, counted against `max_timeouts`."""
    unit = 360
    path = write_recipe(tmp_path, scratch_study(unit, "slurm: {time: 2, signal_delay_s: 90}"))
    runs = tmp_path / "runs"
    out = bench_run(path, runs, "--time", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    spec = next(s for s in recipe.load(path).runs if s.init == "scratch")
    rd = RunDir(run_dir_for(spec, runs))
    status = rd.read_status()
    assert status["state"] == "done" and status["slurm_restarts"] >= 1, status
    # (where each piece stopped depends on when Slurm sends the warning: up to a minute
    # early, so the checkpoint-and-resume itself is checked by the preemption test above)
    submitit_log = "".join(p.read_text() for p in (rd.path / "slurm").glob("*_log.out"))
    assert "this job is timed-out" in submitit_log and "remaining timeouts" in submitit_log
    its = [r["iteration"] for r in rd.read_metrics() if r["type"] == "train"]
    assert its == list(range(20, spec.solver.max_iter + 1, 20))


def _fake_slurm(tmp_path, monkeypatch, squeue, sacct):
    for name, script in (("squeue", squeue), ("sacct", sacct)):
        path = tmp_path / name
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_a_slurm_that_does_not_answer_is_asked_again_never_acted_on(tmp_path, monkeypatch):
    from bench import slurm
    _fake_slurm(tmp_path, monkeypatch,
                "echo 'slurm_load_jobs error: Socket timed out' >&2; exit 1", "exit 1")
    assert slurm.job_state("7") == slurm.UNKNOWN
    _fake_slurm(tmp_path, monkeypatch,
                "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
                "echo REQUEUED; echo COMPLETED")
    assert slurm.job_state("7") == "COMPLETED"
    _fake_slurm(tmp_path, monkeypatch, "echo RUNNING", "exit 1")
    assert slurm.job_state("7") == "RUNNING"
    _fake_slurm(tmp_path, monkeypatch, "echo 'Invalid job id specified' >&2; exit 1", "true")
    assert slurm.job_state("7") == ""  # out of sight: ended, accounting off
