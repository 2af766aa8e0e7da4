"""GPU-only checks: skipped cleanly on machines without CUDA (CI never has one)."""

import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_study_trains_and_evaluates_on_the_gpu(tiny_recipe, tmp_path):
    for cmd in (["data", "shapes-tiny", "shapes-cls-tiny"], ["pretrain", str(tiny_recipe)],
                ["run", str(tiny_recipe), "--device", "cuda", "--per-gpu", "2", "--only=-1x-",
                 "--runs-root", str(tmp_path / "runs")]):
        out = subprocess.run([sys.executable, "-m", "bench.cli", *cmd], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "failed 0" in out.stdout
