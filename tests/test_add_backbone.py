"""Adding a backbone is one registered builder plus one recipe file (README, "Adding a
backbone"): a backbone the suite has never seen, registered only inside this test, plans,
trains and evaluates on the mini data through the same runner and worker processes."""

import json
import subprocess
import sys

import pytest
import torch

from bench import recipe
from conftest import REPO, nine_iteration_pair

# trains, or launches processes: the full suite only (make test-fast leaves it out)
pytestmark = pytest.mark.slow

PLUGIN = '''
from collections import OrderedDict
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet
from bench.backbones import Backbone, register_backbone
from bench.norms import msra_init_, norm_layer

@register_backbone("test_tiny_resnext")
def build(m):
    net = ResNet(Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
                 norm_layer=norm_layer(m.norm, m.norm_groups))
    msra_init_(net)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    body = nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))
    return Backbone(body, names[4:], [256, 512, 1024, 2048])
'''

RECIPE = "plugins: [tiny_resnext.py]\n" + nine_iteration_pair("new-backbone", """
  model: {backbone: test_tiny_resnext, depth: 50}
  data: {dataset: shapes-tiny}""")


def _bench(*args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_backbone_registered_in_a_plugin_plans_trains_and_evaluates(tmp_path):
    (tmp_path / "tiny_resnext.py").write_text(PLUGIN)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(RECIPE)

    plan = json.loads(_bench("plan", str(study_file), "--json"))
    assert [r["backbone"] for r in plan["runs"]] == ["test_tiny_resnext50"] * 2

    runs = tmp_path / "runs"
    out = _bench("run", str(study_file), "--only=-scratch-", "--runs-root", str(runs))
    assert "done 1," in out and "failed 0" in out
    (run_dir,) = (runs / "new-backbone").iterdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if r["type"] == "eval"] == [9]
    assert "bbox/AP" in rows[-1]


def test_the_readme_example_loads_torchvision_resnext_weights_by_name():
    """recipes/examples/resnext.py: torchvision's ImageNet ResNeXt state_dict covers the
    backbone (random weights here: nothing is downloaded)."""
    import torchvision

    from bench.engines.torchvision.model import build_detector, load_backbone_weights
    study = recipe.load(REPO / "recipes/examples/resnext50_syncbn.yaml")
    spec = study.runs[1]
    assert spec.init == "imagenet" and spec.model.backbone == "resnext"
    model = build_detector(spec.model, num_classes=80, data=spec.data)
    state = torchvision.models.resnext50_32x4d().state_dict()
    report = load_backbone_weights(model, state, log=lambda *_: None)
    assert not report["missing"] and not report["shape_mismatch"]
    # the classifier, and the BN step counters of the frozen stem and res2 (FrozenBN has none)
    assert {k for k in report["unused"] if not k.endswith("num_batches_tracked")} == \
        {"fc.weight", "fc.bias"}
    assert all(k.startswith(("bn1.", "layer1.")) for k in report["unused"]
               if k.endswith("num_batches_tracked"))
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv2.weight, state["layer3.0.conv2.weight"])
