"""GPU-only checks: skipped cleanly on machines without CUDA (CI never has one)."""

import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_study_trains_and_evaluates_on_the_gpu(tiny_recipe, tmp_path):
    for cmd in (["data", "shapes-tiny", "shapes-cls-tiny"], ["pretrain", str(tiny_recipe)],
                ["run", str(tiny_recipe), "--device", "cuda", "--per-gpu", "2", "--only=-1x-",
                 "--runs-root", str(tmp_path / "runs")]):
        out = subprocess.run([sys.executable, "-m", "bench.cli", *cmd], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "failed 0" in out.stdout


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_gpu(tmp_path, amp):
    from bench import recipe
    from bench.engines.torchvision.train import train
    from conftest import nine_iteration_pair, write_recipe
    text = nine_iteration_pair("amp-gpu", """
  pretrained: cache:pretrained/unused.pth
  data: {dataset: shapes-tiny}
""").replace("warmup_iters: 3}", f"warmup_iters: 3, amp: {amp}}}")
    spec = next(s for s in recipe.load(write_recipe(tmp_path, text)).runs if s.init == "scratch")
    rd = train(spec, tmp_path / "run", device="cuda", log=lambda m: None)
    rows = rd.read_metrics()
    assert rd.read_status()["state"] == "done"
    assert all(r["loss"] == r["loss"] for r in rows if r["type"] == "train")  # finite, not NaN
    assert any(r["type"] == "eval" for r in rows)
