"""Analysis reads run dirs only: duplicated rows from a resume are dropped, failed and
unfinished runs are kept and labelled, and pairs line up scratch against pre-trained."""

import json

import yaml

from bench import recipe
from bench.analysis import table
from bench.rundir import RunDir
from conftest import REPO

STUDY = recipe.load(REPO / "recipes/mini/study.yaml")


def fake_run(root, spec, evals, state="done", extra_rows=()):
    rd = RunDir(root / spec.study / spec.run_id)
    rd.path.mkdir(parents=True)
    (rd.spec_file).write_text(yaml.safe_dump({"run_id": spec.run_id, "spec": json.loads(
        json.dumps(spec.to_dict()))}))
    rows = [{"type": "eval", "iteration": it, "images_seen": it * 8, "bbox/AP": ap,
             "segm/AP": ap - 1} for it, ap in evals] + list(extra_rows)
    rd.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    rd.write_status(state, iteration=evals[-1][0] if evals else 0, train_images_used=500,
                    **({"error": "boom"} if state == "failed" else {}))
    return rd


def test_tidy_table_drops_duplicate_iterations_and_keeps_failed_runs(tmp_path):
    scratch, imagenet = STUDY.pairs[0]
    # a resumed run that wrote iteration 54 twice: the last row wins
    fake_run(tmp_path, scratch, [(54, 1.0), (108, 2.0)],
             extra_rows=[{"type": "eval", "iteration": 54, "images_seen": 432, "bbox/AP": 1.5,
                          "segm/AP": 0.5}])
    fake_run(tmp_path, imagenet, [(54, 3.0)], state="failed")
    df = table.load_runs(tmp_path)
    box = df[df["metric"] == "bbox/AP"]
    assert sorted(box[box["init"] == "scratch"]["iteration"]) == [54, 108]
    assert box[(box["init"] == "scratch") & (box["iteration"] == 54)]["value"].item() == 1.5
    final = table.final_metrics(df)
    assert dict(zip(final["init"], final["state"])) == {"scratch": "done", "imagenet": "failed"}
    pairs = table.paired(final)
    assert len(pairs) == 1
    assert pairs["bbox/AP scratch-imagenet"].item() == 2.0 - 3.0


def test_run_without_any_row_is_still_listed(tmp_path):
    scratch, _ = STUDY.pairs[0]
    fake_run(tmp_path, scratch, [], state="queued")
    df = table.load_runs(tmp_path)
    assert list(df["state"]) == ["queued"] and df["metric"].isna().all()


def test_figures_refuse_runs_without_any_eval_in_one_line(tmp_path):
    import pytest

    from bench.analysis import report
    scratch, _ = STUDY.pairs[0]
    fake_run(tmp_path, scratch, [], state="running")
    with pytest.raises(FileNotFoundError, match="has an evaluation yet"):
        report.write_study_results(tmp_path / scratch.study, tmp_path / "out")


def test_unfinished_pairs_are_labelled_in_the_table(tmp_path):
    from bench.analysis import report
    scratch, imagenet = STUDY.pairs[0]
    fake_run(tmp_path, scratch, [(54, 1.0)], state="running")
    fake_run(tmp_path, imagenet, [(54, 2.0)], state="done")
    report.write_study_results(tmp_path / scratch.study, tmp_path / "out")
    md = (tmp_path / "out" / "final_ap.md").read_text()
    assert "scratch: running / imagenet: done" in md
