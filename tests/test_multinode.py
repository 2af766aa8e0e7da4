"""A run across nodes: the same `bench run` command on each node with its rank, tested as
two gloo "nodes" over loopback on one machine. The two-node run trains the model one
process trains, and a rerun on both nodes skips it."""

import socket
import subprocess
import sys

import pytest
import torch

from bench import recipe, runner
from bench.rundir import RunDir, run_dir_for
from bench.spec import RunSpec
from conftest import TWO_LAYOUTS, write_recipe

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _both_nodes(recipe_path, runs, port, *extra):
    cmd = [sys.executable, "-m", "bench.cli", "run", str(recipe_path), "--device", "cpu",
           "--runs-root", str(runs), "--only=-scratch-", "--set", "vary.gpus=[2]",
           "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
           "--slots", "1", *extra]
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    return [(p.wait(timeout=600), p.stdout.read()) for p in nodes]


def test_two_nodes_train_the_model_one_process_trains_and_a_rerun_skips_it(tmp_path):
    path = write_recipe(tmp_path, TWO_LAYOUTS)
    study = recipe.load(path)
    one, two = sorted((s for s in study.runs if s.init == "scratch"), key=lambda s: s.gpus)
    port = _free_port() - 1000  # runs use base + (id % 1000)

    outs = _both_nodes(path, tmp_path / "runs", port)
    for rc, out in outs:
        assert rc == 0 and "done 1" in out, out
    b = RunDir(run_dir_for(two, tmp_path / "runs"))
    assert "--nnodes=2" in (b.path / "log.txt").read_text()
    assert b.read_status()["state"] == "done"

    a = runner.run([one], tmp_path / "runs", device="cpu", slots=["cpu0"], progress=False,
                   log=lambda m: None)
    assert a.done == [one.run_id]
    wa = torch.load(RunDir(run_dir_for(one, tmp_path / "runs")).checkpoints /
                    "model_0000009.pth", weights_only=False)["model"]
    wb = torch.load(b.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)

    for rc, out in _both_nodes(path, tmp_path / "runs", port):   # idempotent on every node
        assert rc == 0 and "skipped (already done) 1" in out, out


def test_a_run_that_does_not_spread_over_the_nodes_is_refused():
    spec = RunSpec(name="x", gpus=3)
    try:
        runner.check_fits([spec], ["cpu0", "cpu1"], "cpu", runner.Nodes(nnodes=2))
    except runner.NoSlots as e:
        assert "does not spread over 2 nodes" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("gpus=3 over 2 nodes was accepted")


def test_bench_run_under_torchrun_trains_each_run_with_all_its_processes(tmp_path):
    """`torchrun --nproc-per-node 2 -m bench.cli run RECIPE`: every process runs the study,
    each run spans both in one process group, and ends with the weights of the same run
    launched by the runner; a second launch skips it."""
    path = write_recipe(tmp_path, TWO_LAYOUTS)
    two = next(s for s in recipe.load(path, recipe.parse_overrides(["vary.gpus=[2]"])).runs
               if s.init == "scratch")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
           "--nproc-per-node=2", "-m", "bench.cli", "run", str(path), "--device", "cpu",
           "--only=-scratch-", "--set", "vary.gpus=[2]"]
    out = subprocess.run(cmd + ["--runs-root", str(tmp_path / "group")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "done 1, skipped (already done) 0, failed 0" in out.stdout, \
        out.stdout + out.stderr
    grouped = RunDir(run_dir_for(two, tmp_path / "group"))
    assert grouped.read_status()["where"].startswith("torchrun: 2 processes")

    launched = runner.run([two], tmp_path / "runner", device="cpu", slots=["cpu0", "cpu1"],
                          progress=False, log=lambda m: None)
    assert launched.done == [two.run_id]
    ref = RunDir(run_dir_for(two, tmp_path / "runner"))
    wa = torch.load(ref.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    wb = torch.load(grouped.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    def untimed(rd):
        return [{k: v for k, v in r.items() if not k.endswith("time") and k != "wall"}
                for r in rd.read_metrics()]
    assert untimed(grouped) == untimed(ref)

    again = subprocess.run(cmd + ["--runs-root", str(tmp_path / "group")], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and "skipped (already done) 1" in again.stdout, again.stderr
