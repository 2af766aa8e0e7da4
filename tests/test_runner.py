"""The runner only schedules: slots per GPU or per CPU cores, and each run sees its own GPU."""

from collections import namedtuple

import pytest

from bench import interrupt, runner
from bench.rundir import RunDir, run_dir_for


def test_gpu_slots_follow_cuda_visible_devices_and_can_be_shared(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert runner.default_slots("cuda", threads=1) == ["cuda:2#0", "cuda:5#0"]
    shared = runner.default_slots("cuda", threads=1, per_gpu=2)
    assert sorted(shared) == ["cuda:2#0", "cuda:2#1", "cuda:5#0", "cuda:5#1"]
    # the first slots spread over the GPUs before doubling up on one
    assert shared[:2] == ["cuda:2#0", "cuda:5#0"]


def test_cpu_slots_divide_the_cores_by_threads(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    assert len(runner.default_slots("cpu", threads=1)) == 8
    assert len(runner.default_slots("cpu", threads=4)) == 2
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 1)
    assert len(runner.default_slots("cpu", threads=4)) == 1


def test_each_run_gets_only_its_gpu(monkeypatch, tmp_path):
    launched = {}

    class FakePopen:
        def __init__(self, cmd, stdout, stderr, env, preexec_fn=None):
            launched.update(cmd=cmd, env=env, preexec_fn=preexec_fn)

    monkeypatch.setattr(runner.subprocess, "Popen", FakePopen)
    job = runner.Job(spec=None, run_dir=tmp_path, slots=["cuda:5#1"])
    runner._launch(job, "cuda", threads=2, workers=4)
    job.log_file.close()
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "5"
    assert launched["cmd"][1:3] == ["-m", "bench.worker"]
    assert launched["cmd"][-6:] == ["--device", "cuda", "--threads", "2", "--workers", "4"]

    # a 2-GPU run: both GPUs visible to it alone, one process each under torchrun
    job = runner.Job(spec=None, run_dir=tmp_path, slots=["cuda:3#0", "cuda:6#0"])
    runner._launch(job, "cuda", threads=2, workers=4)
    job.log_file.close()
    assert launched["env"]["CUDA_VISIBLE_DEVICES"] == "3,6"
    assert launched["cmd"][1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in launched["cmd"]
    # torchrun ignores the stop signals (its workers get them), never killing them mid-save
    assert launched["preexec_fn"] is interrupt.quiet_launcher


def test_no_slot_is_an_error_not_a_hang(tmp_path):
    import pytest
    with pytest.raises(runner.NoSlots, match="no slot"):
        runner.run([], tmp_path, device="cuda", slots=[], progress=False)


@pytest.mark.slow
def test_a_run_dir_is_trained_by_one_process_at_a_time(tmp_path):
    import fcntl
    import subprocess
    import sys

    from bench import recipe
    from bench.rundir import RunDir
    from conftest import REPO
    spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]
    rd = RunDir(tmp_path / "run")
    rd.write_spec(spec)
    with open(rd.path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        out = subprocess.run([sys.executable, "-m", "bench.worker", str(rd.path)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    assert "another process (pid 1 on elsewhere) is training this run" in out.stderr
    assert not rd.metrics_file.exists()


@pytest.mark.slow
def test_a_run_another_bench_run_is_training_is_left_to_it_not_failed(tmp_path, capsys):
    # Two `bench run` of one study at once: each trained its share, but each exited 1 and
    # listed as failed the runs the other one was training.
    import fcntl

    from bench import recipe, worker
    from conftest import REPO
    assert runner.BUSY == worker.BUSY
    spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]
    rd = RunDir(run_dir_for(spec, tmp_path))
    rd.write_spec(spec)
    with open(rd.path / ".lock", "a+") as held:  # the other `bench run`'s worker
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        outcome = runner.run([spec], tmp_path, device="cpu", slots=["cpu0"], progress=False,
                             log=lambda m: None)
    assert outcome.failed == [] and outcome.elsewhere == [spec.run_id]
    outcome.print_summary()
    printed = capsys.readouterr().out
    assert "failed 0, trained by another process 1" in printed
    assert f"trained by another process: {spec.run_id}" in printed


@pytest.mark.slow
def test_a_run_that_does_not_stop_in_time_is_killed_with_its_children():
    """The last resort of a stopping runner reaches torchrun's workers, not only torchrun."""
    import os
    import subprocess
    import time
    proc = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())
    runner.kill_tree(proc.pid)
    proc.wait(timeout=10)
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the child outlived the kill")


def test_a_file_system_without_flock_is_one_clear_error_not_a_busy_run(tmp_path, monkeypatch):
    import errno
    import fcntl

    import pytest

    from bench.rundir import RunDir

    def no_flock(*_):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    rd = RunDir(tmp_path)
    with pytest.raises(OSError, match=r"cannot lock .*\.lock \(No locks available\): the runs "
                                      r"root's file system must support flock"):
        rd.lock()


def test_a_worker_that_ends_without_a_recorded_failure_is_explained_in_one_line(tmp_path):
    from bench.runner import _exit_reason
    (tmp_path / "log.txt").write_text("step 3\nanother process (pid 17) is training this run; "
                                      "not starting a second\n\n")
    held = _exit_reason(3, tmp_path)
    assert held.startswith("exit code 3: another process (pid 17) is training this run")
    killed = _exit_reason(-9, tmp_path)
    assert killed.startswith("killed by SIGKILL; rerun to resume it from its last checkpoint")
    assert "\n" not in held + killed


def test_a_workers_warnings_reach_the_runners_console_once_each(tmp_path, capsys):
    from bench.runner import Job, _echo_warnings
    job = Job(spec=namedtuple("S", "run_id")("run-a"), run_dir=tmp_path)
    log = tmp_path / "log.txt"
    log.write_text("=== launch\nresumed run-a at iteration 9\nwarning: checkpoint x is unread")
    _echo_warnings(job)  # the warning's line is not finished yet: nothing shown
    with open(log, "a") as f:
        f.write("able (EOFError); using the previous one\nstep 10\n")
    _echo_warnings(job)
    _echo_warnings(job)
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["run-a: warning: checkpoint x is unreadable (EOFError); using the previous "
                     "one"]


def test_a_run_trained_again_from_0_though_it_had_progressed_says_so(tmp_path):
    # Its checkpoints are gone (deleted, or it was killed before the first), its status and
    # rows say iteration 61: the rows are replaced, and that is said, not done silently.
    from bench.engines.session import open_session
    rd = RunDir(tmp_path / "run")
    rd.write_status("running", iteration=61, max_iter=63)
    for it in (20, 40, 60):
        rd.append_metrics({"type": "train", "iteration": it, "loss": 1.0})
    said = []
    log_row, _ = open_session(rd, 0, 63, 100, log=said.append)
    log_row.close()
    assert len(said) == 1 and said[0].startswith("warning: ") and "iteration 61" in said[0]
    assert "from iteration 0" in said[0] and rd.read_metrics() == []
    said.clear()
    open_session(rd, 0, 63, 100, log=said.append)[0].close()  # a fresh start: nothing to say
    assert said == []
