"""The test Slurm cluster (tests/slurm_cluster.py) runs real jobs: sbatch, sacct, submitit and
partition preemption."""

import os
import subprocess
import sys
import time

import pytest

from slurm_cluster import slurm_missing

pytestmark = [
    pytest.mark.slow,  # starts a real Slurm
    pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing())),
    pytest.mark.timeout(180),
]


def _wait_for(what, fn, timeout=60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def _sacct_state(cluster, job_id):
    out = cluster.run("sacct", "-j", job_id, "-n", "-X", "-o", "State").stdout.split()
    return out[-1] if out else ""


def test_sbatch_job_completes_and_is_accounted(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    submit = subprocess.run(["sbatch", "--parsable", "-o", str(out), "--wrap", "echo hi"],
                            env=slurm_cluster.env, capture_output=True, text=True, check=True)
    job_id = submit.stdout.strip().split(";")[0]
    _wait_for("sacct to say COMPLETED",
              lambda: _sacct_state(slurm_cluster, job_id) == "COMPLETED", timeout=60)
    states = subprocess.run(["sacct", "-j", job_id, "-n", "-o", "State"], env=slurm_cluster.env,
                            capture_output=True, text=True, check=True).stdout.split()
    assert states[0] == "COMPLETED", states
    assert out.read_text() == "hi\n"


def test_two_one_cpu_jobs_run_at_once(slurm_cluster):
    if slurm_cluster.cpus < 2:
        pytest.skip("needs 2 CPUs")
    ids = [slurm_cluster.run("sbatch", "--parsable", "-n1", "-c1", "-o", "/dev/null",
                             "--wrap", "sleep 30").stdout.strip() for _ in range(2)]
    _wait_for("both jobs running",
              lambda: slurm_cluster.job_ids("R") == sorted(ids, key=int), timeout=30)
    # the fixture cancels them after the test


def test_submitit_round_trip(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", timeout_min=5)
    job = executor.submit(os.getenv, "SLURM_JOB_ID")  # runs inside the Slurm job
    assert job.result() == job.job_id
    _wait_for("sacct to say COMPLETED", lambda: job.state == "COMPLETED", timeout=30)


class _CheckpointedSleep:
    """Made a submitit Checkpointable below: sleeps until preempted, then finishes when requeued."""

    def __init__(self, trace):
        self.trace = trace
        self.runs = 0

    def __call__(self):
        self.runs += 1
        with open(self.trace, "a") as f:
            f.write(f"{self.runs} {os.environ.get('SLURM_RESTART_COUNT', 0)}\n")
        if self.runs == 1:
            time.sleep(600)
        return self.runs


def test_high_partition_preempts_low_and_submitit_resumes_from_checkpoint(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    cloudpickle = pytest.importorskip("cloudpickle")
    # The job's Python cannot import this test module: send its code along with the pickle.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        task_cls = type("CheckpointedSleep",
                        (_CheckpointedSleep, submitit.helpers.Checkpointable), {})
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
        # > 10 min, or submitit counts the preemption's USR2 as a timeout
        executor.update_parameters(slurm_partition="low", timeout_min=30)
        trace = tmp_path / "trace"
        job = executor.submit(task_cls(str(trace)))
        _wait_for("the low job to start", lambda: trace.exists(), timeout=60)
        slurm_cluster.run("sbatch", "-p", "high", "-o", "/dev/null", "--wrap", "true")
        # preempt_send_user_signal: USR2 at once, submitit checkpoints (runs=1) and requeues
        assert job.result() == 2
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert trace.read_text().split("\n")[:2] == ["1 0", "2 1"]
    # the result file comes a moment before the job ends
    _wait_for("sacct to show the requeue and the completion", lambda: slurm_cluster.run(
        "sacct", "-j", job.job_id, "-D", "-X", "-n", "-o", "State").stdout.split()
        == ["REQUEUED", "COMPLETED"], timeout=30)
