"""The engine interface: the rest of the suite asks an engine through bench.engines.get and
never reaches into its modules, so adding an engine or an architecture stays inside
bench/engines/."""

import ast
from pathlib import Path

import pytest

from bench import engines, recipe
from conftest import REPO

PACKAGE = REPO / "bench"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_nothing_outside_the_engines_imports_an_engines_modules():
    reaching = [(str(p.relative_to(REPO)), name) for p in PACKAGE.rglob("*.py")
                if "engines" not in p.relative_to(PACKAGE).parts
                for name in _imports(p)
                if name.startswith(("bench.engines.torchvision", "bench.engines.detectron2"))]
    assert reaching == []


def test_the_detectron2_engine_imports_nothing_of_the_torchvision_engine():
    reaching = [(str(p.relative_to(REPO)), name)
                for p in (PACKAGE / "engines" / "detectron2").rglob("*.py")
                for name in _imports(p) if name.startswith("bench.engines.torchvision")]
    assert reaching == []


# What only the shared run session (bench/engines/session.py) may do to a run dir in training
RUN_DIR_WRITES = {"write_status", "update_status", "append_metrics", "truncate_metrics",
                  "remove_stale_temp_files", "save", "open_session", "MetricsLog",
                  "SummaryWriter"}


def _calls(path: Path):
    """Every function called in `path`, as written (`checkpoint.save`, `open_session`)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            yield ast.unparse(node.func)


@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_each_engines_trainer_leaves_the_run_dir_to_the_one_session_both_share(name):
    trainer = PACKAGE / "engines" / name / "train.py"
    written = [call for call in _calls(trainer) if call.rsplit(".", 1)[-1] in RUN_DIR_WRITES]
    assert written == []  # rows, status, checkpoints and per-image files: session.py's
    assert "bench.engines.session.RunSession" in set(_imports(trainer))


def test_the_train_row_period_is_defined_once():
    defined = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               for node in ast.walk(ast.parse(p.read_text()))
               if isinstance(node, (ast.Assign, ast.AnnAssign))
               and any(getattr(t, "id", None) == "LOG_PERIOD"
                       for t in getattr(node, "targets", [getattr(node, "target", None)]))]
    assert defined == ["bench/rundir.py"]


@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_every_engine_answers_the_whole_interface(name):
    engine = engines.get(name)
    assert isinstance(engine, engines.Engine) and engine.name == name and engine.trainer
    for method in ("validate", "build_model", "check_pretrained", "train_step"):  # abstract
        assert getattr(type(engine), method) is not getattr(engines.Engine, method), method


def test_a_spec_an_engine_cannot_train_is_refused_without_that_engine_installed():
    # detectron2 checks its translation only (pure data): no detectron2 needed to refuse
    spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]  # R10: not in detectron2
    import dataclasses
    with pytest.raises(ValueError, match="engine detectron2: model.depth 10"):
        engines.get("detectron2").validate(dataclasses.replace(spec, engine="detectron2"))
    engines.get("torchvision").validate(spec)
    with pytest.raises(ValueError, match="the model cannot be built"):
        engines.get("torchvision").validate(dataclasses.replace(
            spec, model=dataclasses.replace(spec.model, depth=7)))


def test_the_torchvision_engine_counts_and_sizes_its_model():
    spec = recipe.load(REPO / "recipes/mini/study.yaml").runs[0]
    engine = engines.get("torchvision")
    params = engine.parameters(spec, 8)
    assert params == sum(p.numel() for p in engine.build_model(spec, 8).parameters()) > 10 ** 5
    assert engine.checkpoint_bytes(spec) > 8 * params
