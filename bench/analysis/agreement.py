"""Do two copies of a study agree? The check behind "rerun it and get the same numbers".

A rerun of a study (`make mini` twice, or on another machine) is compared with the first run
by run id, row by row: every train and eval row of metrics.jsonl with the fields that
depend on the machine's load dropped (TIMING), and the per-image results kept at each
evaluation. On one machine the CPU path is deterministic, so the two copies should be equal
to the last bit; where a run is not (another CPU, a GPU, another torch), the question is
whether its final AP in one copy lies inside the other copy's 95% interval over val images
(bench.analysis.bootstrap), so a difference is judged against the noise the study already
reports, not against zero.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import per_image
from bench.analysis import bootstrap
from bench.analysis.table import MAIN_METRICS
from bench.rundir import RunDir

# How long a step or an evaluation took and how much memory it held: what another process on
# the same cores changes, never what the model learned
TIMING = ("wall", "time", "data_time", "eval_time", "max_mem_mb")
# Which finished run a forked run took its head start from depends on which runs had finished
# when it started (bench/fork.py): provenance, not learning, and the rows it shares with its
# parent are compared as any other
PROVENANCE = ("forked_from",)


class CompareError(ValueError):
    """A run dir `bench compare` cannot read (names it and the fix)."""


def run_dirs(root: Path) -> dict:
    """run id -> run dir, for every run dir under `root` (a runs root or results/<study>/runs)."""
    out = {}
    for spec_file in sorted(Path(root).rglob("spec.yaml")):
        doc = RunDir(spec_file.parent).read_spec_doc()
        if not isinstance(doc, dict) or "run_id" not in doc:
            raise CompareError(f"{spec_file}: no run_id; a run dir's spec.yaml is written by "
                               f"`bench run` (copy the run dir again, or leave it out)")
        out[doc["run_id"]] = spec_file.parent
    return out


# A train row is written before the eval of the same iteration: a run that diverged there
# is named by its cause (the train row), not by its effect
_ORDER = {"train": 0, "eval": 1, "eval_tta": 2}


def _rows(rd: RunDir) -> dict:
    """(type, iteration) -> the row's learning fields; a resumed run's repeated row: the last."""
    out = {}
    for row in rd.read_metrics():
        out[(row.get("type"), row["iteration"])] = {
            k: v for k, v in row.items() if k not in TIMING + PROVENANCE}
    return out


def _same(x, y) -> bool:
    """Equal to the last bit; a NaN (json's NaN, or null) equals itself."""
    return x == y or json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)


def _first_difference(a: dict, b: dict):
    """"<type> row at iteration N: <fields>" for the earliest row that differs, or None."""
    for key in sorted(set(a) | set(b), key=lambda k: (k[1], _ORDER.get(k[0], 3), str(k[0]))):
        kind, it = key
        if key not in a or key not in b:
            return f"{kind} row at iteration {it}: only in {'the second' if key in b else 'the first'}"
        fields = sorted(f for f in set(a[key]) | set(b[key])
                        if not _same(a[key].get(f), b[key].get(f)))
        if fields:
            return f"{kind} row at iteration {it}: {', '.join(fields)}"
    return None


def _per_image_files(rd: RunDir) -> set:
    return {p.name for p in rd.path.glob("per_image/*.npz") if ".tmp" not in p.name}


def _per_image_difference(a: RunDir, b: RunDir, final_iteration):
    """None where the per-image results both copies hold are the same arrays, else what
    differs. Only files in both are compared: `bench figures --collect` keeps the last
    evaluation's file in results/, a runs root keeps one per evaluation; the final one must be
    in both. Compared by content: a .npz is a zip whose entries carry their write time."""
    files_a, files_b = _per_image_files(a), _per_image_files(b)
    if final_iteration is not None:
        final = a.per_image_file(int(final_iteration)).name
        if (final in files_a) != (final in files_b):
            return f"per-image results at iteration {int(final_iteration)}: only in " \
                   f"{'the first' if final in files_a else 'the second'}"
    for name in sorted(files_a & files_b):
        try:
            x = per_image.load(a.path / "per_image" / name)
            y = per_image.load(b.path / "per_image" / name)
        except per_image.PerImageError as e:
            return f"per-image results unreadable: {e}"
        if x.keys() != y.keys() or any(
                x[t].keys() != y[t].keys() or
                any(not np.array_equal(x[t][k], y[t][k]) for k in x[t]) for t in x):
            return f"per-image results {name}"
    return None


def _final_eval(rows: dict):
    """(iteration, row) of the last evaluation; (None, {}) for a run that has none."""
    evals = [k for k in rows if k[0] == "eval"]
    if not evals:
        return None, {}
    last = max(evals, key=lambda k: k[1])
    return last[1], rows[last]


def _number(value) -> float:
    """A metric cell as a float; json's null (a NaN written by the session) as NaN."""
    return float("nan") if value is None else float(value)


def _flag(value):
    """A "within" cell as True / False, or None where there was nothing to judge (pandas
    turns a missing one into NaN and a column of booleans into numpy's)."""
    return None if value is None or value != value else bool(value)


def compare(first: Path, second: Path, n_samples: int = 1000, only: str = None) -> pd.DataFrame:
    """One row per run id found under either root: whether its two copies are equal in every
    learning field and per-image result ("identical"), the first row that differs, and per
    main metric its final value in each copy, the difference and whether the second copy's
    value lies inside the first copy's 95% interval over val images ("<metric> within"; None
    where it could not be judged, "<metric> why" says why). `only`: the run ids containing
    this text (a rerun of part of a study, as `bench run --only`)."""
    dirs_a, dirs_b = run_dirs(first), run_dirs(second)
    if only:
        dirs_a = {k: v for k, v in dirs_a.items() if only in k}
        dirs_b = {k: v for k, v in dirs_b.items() if only in k}
    runs_a = bootstrap.Runs(dirs_a)
    records = []
    for run_id in sorted(set(dirs_a) | set(dirs_b)):
        rec = {"run_id": run_id}
        if run_id not in dirs_a or run_id not in dirs_b:
            rec.update(identical=False, first_difference=(
                f"only under {first if run_id in dirs_a else second}"))
            records.append(rec)
            continue
        a, b = RunDir(dirs_a[run_id]), RunDir(dirs_b[run_id])
        rec["state"] = a.read_status().get("state")
        rec["state (second)"] = b.read_status().get("state")
        rows_a, rows_b = _rows(a), _rows(b)
        rec["rows"] = len(rows_a)
        it_a, final_a = _final_eval(rows_a)
        it_b, final_b = _final_eval(rows_b)
        diff = _first_difference(rows_a, rows_b)
        if diff is None:
            diff = _per_image_difference(a, b, it_a)
        if diff is None and rec["state"] != rec["state (second)"]:
            diff = f"state {rec['state']} vs {rec['state (second)']}"
        rec["identical"] = diff is None
        rec["first_difference"] = diff
        for metric in MAIN_METRICS:
            if metric not in final_a and metric not in final_b:
                continue
            va, vb = _number(final_a.get(metric)), _number(final_b.get(metric))
            rec[f"{metric}"], rec[f"{metric} (second)"] = va, vb
            rec[f"{metric} diff"] = vb - va
            if it_a != it_b:
                rec[f"{metric} within"] = False
                rec[f"{metric} why"] = f"final evaluations at iterations {it_a} vs {it_b}"
                continue
            if _same(va, vb):
                rec[f"{metric} within"] = True  # equal: inside any interval, none computed
                continue
            try:
                reps = bootstrap.replicates(
                    [runs_a.accumulator(run_id, it_a, bootstrap.TASKS[metric])], n_samples)[:, 0]
                lo, hi = bootstrap.interval(reps)
                rec[f"{metric} lo (images)"], rec[f"{metric} hi (images)"] = lo, hi
                rec[f"{metric} within"] = bool(lo <= vb <= hi)
            except (per_image.PerImageError, ValueError) as e:
                rec[f"{metric} within"] = None  # no interval to judge by
                rec[f"{metric} why"] = f"no interval: {e}"
        records.append(rec)
    return pd.DataFrame.from_records(records)


def summary(rows: pd.DataFrame, first, second) -> str:
    """A few lines for a person: how many runs are identical, which are not and by how much."""
    if rows.empty:
        return f"no run dir under {first} or {second}"
    n = len(rows)
    same = int(rows["identical"].astype(bool).sum())
    lines = [f"{n} runs; {same} identical in every train and eval row (timing fields aside) "
             f"and per-image result; {n - same} differ"]
    metrics = [c[: -len(" within")] for c in rows.columns if c.endswith(" within")]
    for _, r in rows[~rows["identical"].astype(bool)].iterrows():
        parts = [f"{r['run_id']}: first difference {r['first_difference']}"]
        for m in metrics:
            flag, why = _flag(r.get(f"{m} within")), r.get(f"{m} why")
            if flag is None and not isinstance(why, str):
                continue  # the run does not report this metric
            values = f"{m} {r[m]:.2f} vs {r[m + ' (second)']:.2f}"
            if isinstance(why, str):
                parts.append(f"{values}, not judged: {why}")
            elif flag:
                parts.append(f"{values}, within the interval")
            else:
                parts.append(f"{values}, outside [{r.get(m + ' lo (images)', np.nan):.2f}, "
                             f"{r.get(m + ' hi (images)', np.nan):.2f}]")
        if len(parts) == 1:
            parts.append("no final AP to judge it by")
        lines.append("  " + "; ".join(parts))
    return "\n".join(lines)


def agree(rows: pd.DataFrame) -> bool:
    """Every run in both copies and in the same state, and each one identical or with every
    main metric it reports inside the first copy's interval (a run with no final AP, or no
    per-image results to draw an interval from, must be identical)."""
    if rows.empty:
        return False
    metrics = [c[: -len(" within")] for c in rows.columns if c.endswith(" within")]
    for _, r in rows.iterrows():
        if _flag(r["identical"]):
            continue
        if str(r["first_difference"]).startswith("only under") or \
                r.get("state") != r.get("state (second)"):
            return False
        judged = [_flag(r.get(f"{m} within")) for m in metrics
                  if _flag(r.get(f"{m} within")) is not None or isinstance(r.get(f"{m} why"), str)]
        if not judged or not all(judged):
            return False
    return True
