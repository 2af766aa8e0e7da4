"""Exact resume: a run killed after a checkpoint and resumed ends with the same weights and
the same metrics as the run trained in one go, with no duplicated or missing rows."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from bench import recipe
from bench.engines.torchvision.train import train
from bench.rundir import RunDir

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow

TIMING = ("wall", "time", "data_time", "eval_time")


@pytest.fixture(scope="module")
def spec(tmp_path_factory, bench_data):
    from conftest import TINY_RECIPE
    from bench import pretrain
    path = tmp_path_factory.mktemp("r") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    study = recipe.load(path)
    s = next(r for r in study.runs if r.name.endswith("imagenet-2x-allimg-seed0"))
    if not pretrain.is_done(s.pretrained, s.model, study.pretrain):
        pretrain.pretrain(s.model, study.pretrain, s.pretrained, log=lambda m: None)
    return s


def test_resume_after_kill_matches_uninterrupted_run(spec, tmp_path):
    quiet = dict(log=lambda m: None)
    whole = train(spec, tmp_path / "whole", **quiet)

    # What a SIGKILL between the checkpoint at 9 and the end leaves on disk: the checkpoint,
    # rows written after it, and a torn last line.
    killed = RunDir(tmp_path / "killed")
    killed.write_spec(spec)
    killed.checkpoints.mkdir()
    shutil.copy(whole.checkpoints / "model_0000009.pth", killed.checkpoints)
    rows = whole.metrics_file.read_text().splitlines()
    written = [r for r in rows if json.loads(r)["iteration"] <= 18 and json.loads(r)["type"] == "train"]
    killed.metrics_file.write_text("\n".join(rows[:1] + written) + '\n{"type": "tra')
    killed.write_status("running", iteration=18)
    # ... and the TensorBoard events it had logged up to the kill
    shutil.copytree(whole.path / "tensorboard", killed.path / "tensorboard")

    train(spec, killed.path, **quiet)

    a = torch.load(whole.checkpoints / "model_0000018.pth", weights_only=False)
    b = torch.load(killed.checkpoints / "model_0000018.pth", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def strip(rd):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rd.read_metrics()]
    assert strip(killed) == strip(whole)
    assert killed.read_status()["state"] == "done"

    # TensorBoard holds the same points as metrics.jsonl, each once: the resumed run's
    # purge step dropped what the killed one had logged after its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(killed.path / "tensorboard"))
    board.Reload()
    for tag, kind in (("eval/bbox/AP", "eval"), ("train/loss", "train")):
        steps = [e.step for e in board.Scalars(tag)]
        assert steps == [r["iteration"] for r in killed.read_metrics() if r["type"] == kind]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(spec, tmp_path):
    rd = train(spec, tmp_path / "run", log=lambda m: None)
    (rd.checkpoints / "model_0000018.pth").write_bytes(b"not a checkpoint")
    rd.write_status("running", iteration=18)
    messages = []
    with pytest.warns(UserWarning, match="unreadable"):
        train(spec, rd.path, log=messages.append)
    assert any("resumed" in m and "at iteration 9" in m for m in messages)
    assert rd.read_status()["state"] == "done"
    its = [r["iteration"] for r in rd.read_metrics() if r["type"] == "eval"]
    assert its == [9, 18]


def test_unreadable_checkpoints_stop_the_run_instead_of_restarting_it(spec, tmp_path):
    from bench.checkpoint import NoReadableCheckpoint
    rd = train(spec, tmp_path / "run", log=lambda m: None)
    rows = rd.metrics_file.read_text()
    for ckpt in rd.checkpoints.glob("model_*.pth"):  # a storage outage: nothing reads
        ckpt.write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(NoReadableCheckpoint, match="none of the 2"):
        train(spec, rd.path, log=lambda m: None)
    assert rd.metrics_file.read_text() == rows  # nothing already computed is thrown away


def test_a_checkpoint_from_another_model_layout_is_one_clear_line(spec, tmp_path):
    """A run dir trained before a change of the model's layout (e.g. the predictors) must not
    crash with a state-dict dump, nor restart silently: it says what to do."""
    rd = train(spec, tmp_path / "run", log=lambda m: None)
    ckpt = rd.checkpoints / "model_0000018.pth"
    state = torch.load(ckpt, weights_only=False)
    w = state["model"]["roi_heads.box_predictor.bbox_pred.weight"]
    state["model"]["roi_heads.box_predictor.bbox_pred.weight"] = torch.cat([w, w[:4]])
    torch.save(state, ckpt)
    rd.write_status("running", iteration=18)
    rows = rd.metrics_file.read_text()
    with pytest.raises(ValueError) as e:
        train(spec, rd.path, log=lambda m: None)
    msg = str(e.value)
    assert "does not fit this code's model" in msg and "\n" not in msg and str(rd.path) in msg
    assert rd.metrics_file.read_text() == rows


def test_a_stop_request_checkpoints_the_iteration_it_is_on_and_resumes_there(spec, tmp_path,
                                                                             monkeypatch):
    """SIGTERM/Ctrl-C (bench.interrupt) mid-period: the run saves iteration 5, before its
    first periodic checkpoint at 9, stops as queued, and resumes there to the same end."""
    from bench import interrupt
    from bench.engines.torchvision import train as train_mod
    quiet = dict(log=lambda m: None)
    whole = train(spec, tmp_path / "whole", **quiet)

    calls = {"n": 0}
    step = train_mod.Stepper.__call__

    def asked_to_stop_in_iteration_5(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            interrupt.request()
        return step(self, *args)
    monkeypatch.setattr(train_mod.Stepper, "__call__", asked_to_stop_in_iteration_5)
    stopped = RunDir(tmp_path / "stopped")
    try:
        with pytest.raises(interrupt.Stopped):
            train_mod.run(spec, stopped.path, **quiet)
    finally:
        interrupt.clear()
    assert [p.name for p in sorted(stopped.checkpoints.glob("model_*.pth"))] == ["model_0000005.pth"]
    status = stopped.read_status()
    assert (status["state"], status["iteration"]) == ("queued", 5)

    monkeypatch.setattr(train_mod.Stepper, "__call__", step)
    messages = []
    train(spec, stopped.path, log=messages.append)
    assert any("resumed" in m and "at iteration 5" in m for m in messages)
    a = torch.load(whole.checkpoints / "model_0000018.pth", weights_only=False)["model"]
    b = torch.load(stopped.checkpoints / "model_0000018.pth", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def strip(rd):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rd.read_metrics()]
    assert strip(stopped) == strip(whole)


def test_processes_forked_by_a_stoppable_worker_still_die_on_sigterm():
    # The worker routes SIGTERM to a stop request; a pool it forks (the dataset generator's)
    # must not inherit that, or Pool.terminate() waits forever for a child that only set a flag.
    code = ("import multiprocessing as mp, time; from bench import interrupt; interrupt.install()\n"
            "pool = mp.get_context('fork').Pool(2); pool.map_async(time.sleep, [60, 60])\n"
            "time.sleep(2); t = time.time(); pool.terminate(); pool.join()\n"
            "print(round(time.time() - t))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() and int(out.stdout) < 20, out.stdout + out.stderr


def test_the_runners_sigterm_after_a_ctrl_c_is_one_stop_and_a_second_ctrl_c_is_a_kill():
    import signal

    from bench import interrupt
    interrupt.clear()
    try:
        interrupt.request(signal.SIGTERM)   # the runner passes the stop on...
        interrupt.request(signal.SIGINT)    # ...and the terminal's Ctrl-C arrives after it
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.request(signal.SIGINT)  # the impatient second Ctrl-C
    finally:
        interrupt.clear()


def test_a_failed_run_records_the_iteration_it_failed_at(spec, tmp_path, monkeypatch):
    # A failure before the first train row (every 20 iterations) used to leave iteration 0
    # in status.json ("failed 0/18") though the error named a later iteration.
    from bench import schedule
    from bench.engines.torchvision import train as engine
    real = schedule.is_eval_iteration

    def fails_after_4(s, done):
        if done == 4:
            raise OSError("image 17.jpg is unreadable")
        return real(s, done)

    monkeypatch.setattr(schedule, "is_eval_iteration", fails_after_4)
    with pytest.raises(OSError):
        engine.run(spec, tmp_path / "run", log=lambda m: None)
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and status["iteration"] == 4
    assert status["error"] == "OSError: image 17.jpg is unreadable"
