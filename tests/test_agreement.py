"""A rerun gives the same numbers: `bench compare` finds two copies of a study identical
(timing aside) where they are, names the first row where they are not, and judges a
different final AP against the first copy's interval over val images."""

import copy
import json

import numpy as np

from bench import per_image
from bench.analysis import agreement, bootstrap
from bench.cli import main
from bench.rundir import RunDir
from tests.test_bootstrap import _synthetic


def _run(root, run_id, arrays, loss=1.0, wall=0.0, forked_from=None, state="done",
         evals=(100,)):
    """A finished run dir: train rows at 50 and 100, evals at `evals` whose box AP is what
    `arrays` (per-image results, kept as the engines keep them) accumulate to."""
    rd = RunDir(root / "mini" / run_id)
    rd.path.mkdir(parents=True)
    rd.spec_file.write_text(json.dumps({"run_id": run_id, "spec": {"study": "mini"}}))
    timing = {"wall": wall, "time": 0.1 + wall, "data_time": wall}
    rows = [{"type": "train", "iteration": 50, "loss": 2.0, **timing},
            {"type": "train", "iteration": 100, "loss": loss, **timing}]
    rows += [{"type": "eval", "iteration": it, "eval_time": 3.0 + wall,
              "bbox/AP": bootstrap.Accumulator(arrays).average_precision()} for it in evals]
    if forked_from:
        rows = [{**r, "forked_from": forked_from} for r in rows]
    for row in sorted(rows, key=lambda r: r["iteration"]):
        rd.append_metrics(row)
    for it in evals:
        per_image.save(rd.per_image_file(it), {"bbox": arrays})
    rd.write_status(state, iteration=100)
    return rd


def _study(root, **changes):
    """Two runs; `changes` (run id -> keyword arguments of _run) make the second copy differ."""
    for run_id, seed in (("scratch-seed0", 0), ("imagenet-seed0", 1)):
        arrays = _synthetic(n_images=200, seed=seed)
        kwargs = dict(changes.get(run_id, {}))
        if "arrays" in kwargs:
            arrays = kwargs.pop("arrays")(arrays)
        _run(root, run_id, arrays, **kwargs)


def test_a_rerun_that_differs_only_in_timing_and_fork_parent_is_identical(tmp_path):
    _study(tmp_path / "a")
    _study(tmp_path / "b", **{"scratch-seed0": {"wall": 7.0, "forked_from": "another-run"}})
    rows = agreement.compare(tmp_path / "a", tmp_path / "b")
    assert rows["identical"].all() and agreement.agree(rows)
    assert "2 runs; 2 identical" in agreement.summary(rows, "a", "b")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_a_different_loss_is_named_at_its_first_row_and_equal_final_ap_still_agrees(tmp_path):
    _study(tmp_path / "a")
    _study(tmp_path / "b", **{"imagenet-seed0": {"loss": 1.0000001}})
    rows = agreement.compare(tmp_path / "a", tmp_path / "b").set_index("run_id")
    assert not rows.loc["imagenet-seed0", "identical"]
    assert rows.loc["imagenet-seed0", "first_difference"] == "train row at iteration 100: loss"
    assert rows.loc["imagenet-seed0", "bbox/AP diff"] == 0
    assert agreement.agree(rows.reset_index())


def _fewer_hits(k):
    def change(arrays):
        out = copy.deepcopy(arrays)
        hits = np.flatnonzero(out["det_matched"][0])
        out["det_matched"][:, hits[:k]] = False
        return out
    return change


def test_a_final_ap_inside_the_interval_agrees_and_one_far_outside_does_not(tmp_path):
    _study(tmp_path / "a")
    _study(tmp_path / "near", **{"scratch-seed0": {"arrays": _fewer_hits(1)}})
    _study(tmp_path / "far", **{"scratch-seed0": {"arrays": _fewer_hits(60)}})
    near = agreement.compare(tmp_path / "a", tmp_path / "near").set_index("run_id")
    assert near.loc["scratch-seed0", "first_difference"] == "eval row at iteration 100: bbox/AP"
    lo, hi = near.loc["scratch-seed0", ["bbox/AP lo (images)", "bbox/AP hi (images)"]]
    assert lo < near.loc["scratch-seed0", "bbox/AP (second)"] < hi
    assert agreement.agree(near.reset_index())
    far = agreement.compare(tmp_path / "a", tmp_path / "far")
    assert not agreement.agree(far)
    assert "outside [" in agreement.summary(far, "a", "far")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "far"),
                 "--csv", str(tmp_path / "far.csv")]) == 1
    assert (tmp_path / "far.csv").read_text().count("\n") == 3


def test_different_per_image_results_behind_an_equal_row_are_not_identical(tmp_path):
    _study(tmp_path / "a")
    _study(tmp_path / "b")
    file = RunDir(tmp_path / "b" / "mini" / "scratch-seed0").per_image_file(100)
    arrays = per_image.load(file)["bbox"]
    arrays["det_score"] = arrays["det_score"] * 0.5  # same ranking, same AP, other scores
    per_image.save(file, {"bbox": arrays})
    rows = agreement.compare(tmp_path / "a", tmp_path / "b").set_index("run_id")
    assert rows.loc["scratch-seed0", "first_difference"] == "per-image results 0000100.npz"


def test_a_run_missing_from_the_rerun_or_unfinished_there_fails_the_check(tmp_path, capsys):
    _study(tmp_path / "a")
    _study(tmp_path / "b", **{"imagenet-seed0": {"state": "running"}})
    rows = agreement.compare(tmp_path / "a", tmp_path / "b")
    assert not agreement.agree(rows)
    (tmp_path / "c").mkdir()
    _run(tmp_path / "c", "scratch-seed0", _synthetic(n_images=200, seed=0))
    rows = agreement.compare(tmp_path / "a", tmp_path / "c").set_index("run_id")
    assert rows.loc["imagenet-seed0", "first_difference"] == f"only under {tmp_path / 'a'}"
    assert not agreement.agree(rows.reset_index())
    # a rerun of part of the study is checked on that part
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "c"), "--only", "scratch"]) == 0
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_a_runs_root_with_every_evaluation_matches_its_collected_copy(tmp_path):
    # `bench figures --collect` keeps the last evaluation's per-image file; a runs root all
    from bench.analysis import collect
    for run_id, seed in (("scratch-seed0", 0), ("imagenet-seed0", 1)):
        _run(tmp_path / "rerun", run_id, _synthetic(n_images=200, seed=seed), evals=(50, 100))
    collect.collect(tmp_path / "rerun" / "mini", tmp_path / "results" / "mini" / "runs")
    committed = tmp_path / "results" / "mini" / "runs"
    assert len(list(committed.rglob("*.npz"))) == 2
    rows = agreement.compare(committed, tmp_path / "rerun")
    assert rows["identical"].all() and agreement.agree(rows)
    # the final evaluation's file itself missing from one copy is a difference
    RunDir(committed / "scratch-seed0").per_image_file(100).unlink()
    rows = agreement.compare(committed, tmp_path / "rerun").set_index("run_id")
    assert rows.loc["scratch-seed0", "first_difference"] == \
        "per-image results at iteration 100: only in the second"


def test_runs_without_a_final_ap_or_evaluated_elsewhere_are_not_judged_as_agreeing(tmp_path):
    arrays = _synthetic(n_images=200, seed=0)
    _run(tmp_path / "a", "r", arrays, evals=(), state="running")
    _run(tmp_path / "b", "r", arrays, evals=(), state="running", loss=0.5)
    rows = agreement.compare(tmp_path / "a", tmp_path / "b")  # no eval anywhere
    assert not agreement.agree(rows)
    assert "no final AP to judge it by" in agreement.summary(rows, "a", "b")
    _run(tmp_path / "c", "r", arrays, evals=(100,), state="running")
    rows = agreement.compare(tmp_path / "a", tmp_path / "c")  # the first copy has none
    assert not agreement.agree(rows)
    _run(tmp_path / "d", "r", arrays, evals=(50,), state="running")
    rows = agreement.compare(tmp_path / "c", tmp_path / "d")
    assert not agreement.agree(rows)
    assert "not judged: final evaluations at iterations 100 vs 50" in \
        agreement.summary(rows, "c", "d")


def test_a_nan_loss_in_both_copies_is_the_same_and_a_train_row_is_named_before_its_eval(
        tmp_path):
    arrays = _synthetic(n_images=200, seed=0)
    _run(tmp_path / "a", "r", arrays, loss=float("nan"))
    _run(tmp_path / "b", "r", arrays, loss=float("nan"))
    assert agreement.compare(tmp_path / "a", tmp_path / "b")["identical"].all()
    _run(tmp_path / "c", "r", _fewer_hits(5)(arrays), loss=0.5)
    rows = agreement.compare(tmp_path / "a", tmp_path / "c")
    assert rows["first_difference"].item() == "train row at iteration 100: loss"


def test_a_damaged_per_image_file_or_spec_is_one_line(tmp_path, capsys):
    _study(tmp_path / "a")
    _study(tmp_path / "b")
    RunDir(tmp_path / "b" / "mini" / "scratch-seed0").per_image_file(100).write_bytes(b"torn")
    rows = agreement.compare(tmp_path / "a", tmp_path / "b").set_index("run_id")
    assert rows.loc["scratch-seed0", "first_difference"].startswith(
        "per-image results unreadable: ")
    (tmp_path / "b" / "mini" / "imagenet-seed0" / "spec.yaml").write_text("{}")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "imagenet-seed0/spec.yaml: " in err and len(err.splitlines()) == 1
    (tmp_path / "b" / "mini" / "imagenet-seed0" / "spec.yaml").write_text('{"spec": {}}')
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "imagenet-seed0/spec.yaml: no run_id" in capsys.readouterr().err
