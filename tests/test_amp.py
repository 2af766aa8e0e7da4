"""Mixed precision (solver.amp): the train loop's bf16/fp16 path and its exact resume. The
speed it buys is a GPU's matter (`make speed`); here it must train, checkpoint the gradient
scaler and resume, on the CPU too."""

import pytest
import torch

from bench import recipe
from bench.engines.torchvision.train import train
from conftest import nine_iteration_pair, write_recipe

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp16_spec(tmp_path_factory):
    text = nine_iteration_pair("amp", """
  pretrained: cache:pretrained/unused.pth
  data: {dataset: shapes-tiny}
""").replace("warmup_iters: 3}", "warmup_iters: 3, amp: fp16}")
    study = recipe.load(write_recipe(tmp_path_factory.mktemp("amp"), text))
    return next(s for s in study.runs if s.init == "scratch")


def test_fp16_trains_keeps_its_loss_scale_and_resumes_exactly(fp16_spec, tmp_path):
    spec = fp16_spec
    assert spec.solver.amp == "fp16"
    from bench import spec as specs
    half = specs.replace(spec, **{"checkpoint.period": 5, "checkpoint.keep": 2})
    whole = train(half, tmp_path / "whole", log=lambda m: None)
    rows = whole.read_metrics()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if r["type"] == "train")
    state = torch.load(whole.checkpoints / "model_0000009.pth", weights_only=False)
    assert state["grad_scaler"]["scale"] > 0   # the scaler's state travels in the checkpoint

    # resume from the checkpoint at 5: same weights at 9 as the run trained in one go
    import shutil
    from bench.rundir import RunDir
    resumed = RunDir(tmp_path / "resumed")
    resumed.write_spec(half)
    resumed.checkpoints.mkdir()
    shutil.copy(whole.checkpoints / "model_0000005.pth", resumed.checkpoints)
    train(half, resumed.path, log=lambda m: None)
    a = state["model"]
    b = torch.load(resumed.checkpoints / "model_0000009.pth", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
