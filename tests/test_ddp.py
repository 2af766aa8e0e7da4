"""Multi-process training (the paper's 8 GPUs x 2 images) on the CPU, with gloo.

The claim: how a global batch is spread over processes changes nothing. Two processes of
one image each train the same model as one process doing two passes of one image, and the
SyncBN of two processes normalizes as BatchNorm over both halves of the batch would,
even when one process holds no RoI at all.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench import recipe, runner
from bench.engines.torchvision.model import build_detector
from bench.engines.torchvision.train import datasets_for
from bench.norms import SyncBatchNorm
from bench.rundir import RunDir, run_dir_for
from conftest import TWO_LAYOUTS, write_recipe

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow




def test_two_processes_train_the_same_model_as_one_with_the_same_passes(tmp_path):
    study = recipe.load(write_recipe(tmp_path, TWO_LAYOUTS))
    one, two = sorted((s for s in study.runs if s.init == "scratch"), key=lambda s: s.gpus)
    assert (one.gpus, two.gpus) == (1, 2)
    out = runner.run([one, two], tmp_path / "runs", device="cpu", slots=["cpu0", "cpu1"],
                     threads=1, progress=False, log=lambda m: None)
    assert sorted(out.done) == sorted([one.run_id, two.run_id]), out.failed
    a, b = (RunDir(run_dir_for(s, tmp_path / "runs")) for s in (one, two))
    assert "torch.distributed.run" in (b.path / "log.txt").read_text()  # really 2 processes

    wa = torch.load(a.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    wb = torch.load(b.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    torch.manual_seed(one.seed)  # and they trained: not two copies of the same init
    init = build_detector(one.model, len(datasets_for(one)[0].cat_ids), one.data).state_dict()
    moved = [k for k in init if not torch.allclose(init[k], wa[k], atol=1e-4)]
    assert len(moved) > len(init) // 2

    def rows(rd):
        return [{k: v for k, v in r.items() if k not in ("wall", "time", "data_time", "eval_time")}
                for r in rd.read_metrics()]
    ra, rb = rows(a), rows(b)
    assert [r["type"] for r in ra] == [r["type"] for r in rb] == ["train", "eval"]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
            else:
                assert x[k] == y[k], k
    assert ra[1]["detections"] == rb[1]["detections"]  # the sharded eval saw every image


def test_a_run_needing_more_gpus_than_the_machine_has_is_refused_in_one_line(tmp_path):
    study = recipe.load(write_recipe(tmp_path, TWO_LAYOUTS))
    two = next(s for s in study.runs if s.gpus == 2)
    with pytest.raises(runner.NoSlots, match="gpus=2 but this machine has 1 CPU slot"):
        runner.run([two], tmp_path / "runs", device="cpu", slots=["cpu0"], progress=False)
    # processes of one run never share a GPU
    assert runner.take_slots(["cuda:0#0", "cuda:0#1", "cuda:1#0"], 2) == ["cuda:0#0", "cuda:1#0"]
    assert runner.take_slots(["cuda:0#0", "cuda:0#1"], 2) is None


def _syncbn_rank(rank, init_file, sizes, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 6, 4, 4) * 3 + 1
    coef = torch.randn_like(x)
    bn = SyncBatchNorm(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    lo = sum(sizes[:rank])
    part = x[lo:lo + sizes[rank]].clone().requires_grad_()
    y = bn(part)
    (y * coef[lo:lo + sizes[rank]]).sum().backward()
    torch.save({"y": y.detach(), "dx": part.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                "mean": bn.running_mean, "var": bn.running_var}, f"{out_dir}/rank{rank}.pt")
    # both done before either closes its connections: a rank tearing down while the other
    # is still in a collective aborts it (seen once on a loaded 2-core machine)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("sizes", [(3, 2), (4, 0), (0, 0)],
                         ids=["uneven", "one-process-without-rois", "no-rois-anywhere"])
def test_syncbn_on_cpu_normalizes_over_all_processes(tmp_path, sizes):
    mp.spawn(_syncbn_rank, args=(str(tmp_path / "pg"), sizes, str(tmp_path)), nprocs=2)
    r = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]

    torch.manual_seed(0)  # the same data and layer, in one process, as plain BatchNorm
    x = (torch.randn(sum(sizes), 6, 4, 4) * 3 + 1).requires_grad_()
    coef = torch.randn_like(x)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    if sum(sizes) == 0:  # nothing to normalize: the layer must pass through, stats untouched
        assert all(k["y"].numel() == 0 for k in r)
        assert torch.equal(r[0]["mean"], bn.running_mean) and torch.equal(r[0]["var"], bn.running_var)
        assert torch.equal(r[0]["dw"], torch.zeros(6))  # zero, not None: DDP needs a gradient
        return
    y = bn(x)
    (y * coef).sum().backward()
    torch.testing.assert_close(torch.cat([k["y"] for k in r]), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([k["dx"] for k in r]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r[0]["dw"] + r[1]["dw"], bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r[0]["db"] + r[1]["db"], bn.bias.grad, rtol=1e-4, atol=1e-4)
    for k in r:  # every process tracks the global statistics
        torch.testing.assert_close(k["mean"], bn.running_mean)
        torch.testing.assert_close(k["var"], bn.running_var)


def test_a_syncbn_run_trains_on_two_cpu_processes_under_ddp(tmp_path):
    """DDP refuses torch's SyncBatchNorm on a CPU; ours is a BatchNorm2d, so a SyncBN run of
    2 gloo processes trains (statistics over both: the test above), and evaluates."""
    text = TWO_LAYOUTS.replace("run:\n", "run:\n  model: {norm: SyncBN}\n")
    two = next(s for s in recipe.load(write_recipe(tmp_path, text)).runs
               if s.gpus == 2 and s.init == "scratch")
    assert two.model.norm == "SyncBN"
    out = runner.run([two], tmp_path / "runs", device="cpu", slots=["cpu0", "cpu1"],
                     threads=1, progress=False, log=lambda m: None)
    rd = RunDir(run_dir_for(two, tmp_path / "runs"))
    assert out.done == [two.run_id], (rd.path / "log.txt").read_text()[-2000:]
    assert "torch.distributed.run" in (rd.path / "log.txt").read_text()
    weights = torch.load(rd.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    means = [v for k, v in weights.items() if k.endswith("running_mean")]
    assert means and all(torch.isfinite(m).all() for m in means)
    assert any(m.abs().sum() > 0 for m in means)  # the statistics were tracked
    assert [r["type"] for r in rd.read_metrics()] == ["train", "eval"]


def test_on_gpus_syncbn_is_torchs_with_the_same_tensors():
    """On GPUs the trainer swaps our layers for torch's SyncBatchNorm (its NCCL kernels);
    plain BN stays per-process and the state dict is unchanged (checkpoints move freely)."""
    from bench.norms import use_torch_sync_bn
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNorm(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].weight.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_torch_sync_bn(model)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[2][0]) is nn.BatchNorm2d
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_first_failure_of_a_run_keeps_its_reason(tmp_path):
    """When one process fails, the others fail after it (a closed connection, torchrun's
    SIGTERM); status.json must keep the first, real reason."""
    from bench.engines import recording_failure
    study = recipe.load(write_recipe(tmp_path, TWO_LAYOUTS))
    spec = next(s for s in study.runs if s.gpus == 1)
    rd = RunDir(tmp_path / "run")
    rd.write_spec(spec)
    rd.write_status("failed", error="ValueError: the real reason (rank 1)")

    def peer_gone(*a, **k):
        raise RuntimeError("Connection closed by peer")
    with pytest.raises(RuntimeError):
        recording_failure(peer_gone)(spec, rd.path, log=lambda m: None)
    assert rd.read_status()["error"] == "ValueError: the real reason (rank 1)"

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        recording_failure(interrupted)(spec, rd.path, log=lambda m: None)
    assert rd.read_status()["state"] == "failed"
