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


def _run(root, run_id, arrays, loss=1.0, wall=0.0, forked_from=None, state="done"):
    """A finished run dir: two train rows, one eval at 100 whose box AP is what `arrays`
    (per-image results, kept as the engines keep them) accumulate to."""
    rd = RunDir(root / "mini" / run_id)
    rd.path.mkdir(parents=True)
    rd.spec_file.write_text(json.dumps({"run_id": run_id, "spec": {"study": "mini"}}))
    timing = {"wall": wall, "time": 0.1 + wall, "data_time": wall}
    rows = [{"type": "train", "iteration": 50, "loss": 2.0, **timing},
            {"type": "train", "iteration": 100, "loss": loss, **timing},
            {"type": "eval", "iteration": 100, "eval_time": 3.0 + wall,
             "bbox/AP": bootstrap.Accumulator(arrays).average_precision()}]
    if forked_from:
        rows = [{**r, "forked_from": forked_from} for r in rows]
    for row in rows:
        rd.append_metrics(row)
    per_image.save(rd.per_image_file(100), {"bbox": arrays})
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
    assert rows.loc["scratch-seed0", "first_difference"] == "per-image results"


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
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
