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


def run_dirs(root: Path) -> dict:
    """run id -> run dir, for every run dir under `root` (a runs root or results/<study>/runs)."""
    out = {}
    for spec_file in sorted(Path(root).rglob("spec.yaml")):
        rd = RunDir(spec_file.parent)
        out[rd.read_spec_doc()["run_id"]] = spec_file.parent
    return out


def _rows(rd: RunDir) -> dict:
    """(type, iteration) -> the row's learning fields; a resumed run's repeated row: the last."""
    out = {}
    for row in rd.read_metrics():
        out[(row.get("type"), row["iteration"])] = {
            k: v for k, v in row.items() if k not in TIMING + PROVENANCE}
    return out


def _first_difference(a: dict, b: dict):
    """"<type> row at iteration N: <field>" for the earliest row that differs, or None."""
    for key in sorted(set(a) | set(b), key=lambda k: (k[1], str(k[0]))):
        kind, it = key
        if key not in a or key not in b:
            return f"{kind} row at iteration {it}: only in {'the second' if key in b else 'the first'}"
        fields = sorted(f for f in set(a[key]) | set(b[key]) if a[key].get(f) != b[key].get(f))
        if fields:
            return f"{kind} row at iteration {it}: {', '.join(fields)}"
    return None


def _per_image_equal(a: RunDir, b: RunDir):
    """Whether every per-image results file of `a` has the same arrays in `b` (files are
    compared by content: a .npz is a zip whose entries carry the time they were written)."""
    files = sorted(p.name for p in a.path.glob("per_image/*.npz"))
    if files != sorted(p.name for p in b.path.glob("per_image/*.npz")):
        return False
    for name in files:
        x = per_image.load(a.path / "per_image" / name)
        y = per_image.load(b.path / "per_image" / name)
        if x.keys() != y.keys() or any(
                x[t].keys() != y[t].keys() or
                any(not np.array_equal(x[t][k], y[t][k]) for k in x[t]) for t in x):
            return False
    return True


def _final_eval(rows: dict):
    """(iteration, row) of the last evaluation; (None, {}) for a run that has none."""
    evals = [k for k in rows if k[0] == "eval"]
    if not evals:
        return None, {}
    last = max(evals, key=lambda k: k[1])
    return last[1], rows[last]


def _flag(value):
    """A "within" cell as True / False, or None where there was nothing to judge (pandas
    turns a missing one into NaN and a column of booleans into numpy's)."""
    return None if value is None or value != value else bool(value)


def compare(first: Path, second: Path, n_samples: int = 1000) -> pd.DataFrame:
    """One row per run id found under either root: whether its two copies are equal in every
    learning field and per-image result ("identical"), the first row that differs, and per
    main metric its final value in each copy, the difference and whether the second copy's
    value lies inside the first copy's 95% interval over val images ("<metric> within")."""
    dirs_a, dirs_b = run_dirs(first), run_dirs(second)
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
        diff = _first_difference(rows_a, rows_b)
        if diff is None and not _per_image_equal(a, b):
            diff = "per-image results"
        rec["identical"] = diff is None and rec["state"] == rec["state (second)"]
        rec["first_difference"] = diff if diff is not None else (
            None if rec["identical"] else "state")
        it_a, final_a = _final_eval(rows_a)
        it_b, final_b = _final_eval(rows_b)
        for metric in MAIN_METRICS:
            if metric not in final_a and metric not in final_b:
                continue
            va, vb = final_a.get(metric, np.nan), final_b.get(metric, np.nan)
            rec[f"{metric}"], rec[f"{metric} (second)"] = va, vb
            rec[f"{metric} diff"] = vb - va
            if va == vb and it_a == it_b:
                rec[f"{metric} within"] = True  # equal: inside any interval, none computed
                continue
            try:
                reps = bootstrap.replicates(
                    [runs_a.accumulator(run_id, it_a, bootstrap.TASKS[metric])], n_samples)[:, 0]
                lo, hi = bootstrap.interval(reps)
                rec[f"{metric} lo (images)"], rec[f"{metric} hi (images)"] = lo, hi
                rec[f"{metric} within"] = bool(it_a == it_b and lo <= vb <= hi)
            except (per_image.PerImageError, ValueError):
                rec[f"{metric} within"] = None  # no per-image results: no interval to judge by
        records.append(rec)
    return pd.DataFrame.from_records(records)


def summary(rows: pd.DataFrame, first, second) -> str:
    """A few lines for a person: how many runs are identical, which are not and by how much."""
    if rows.empty:
        return f"no run dir under {first} or {second}"
    n = len(rows)
    same = int(rows["identical"].sum())
    lines = [f"{n} runs; {same} identical in every train and eval row (timing fields aside) "
             f"and per-image result; {n - same} differ"]
    within = [c for c in rows.columns if c.endswith(" within")]
    for _, r in rows[~rows["identical"].astype(bool)].iterrows():
        parts = [f"{r['run_id']}: first difference {r['first_difference']}"]
        for c in within:
            m = c[: -len(" within")]
            if _flag(r.get(c)) is False:
                parts.append(f"{m} {r[m]:.2f} vs {r[m + ' (second)']:.2f}, outside "
                             f"[{r.get(m + ' lo (images)', np.nan):.2f}, "
                             f"{r.get(m + ' hi (images)', np.nan):.2f}]")
            elif _flag(r.get(c)):
                parts.append(f"{m} {r[m]:.2f} vs {r[m + ' (second)']:.2f}, within the interval")
        lines.append("  " + "; ".join(parts))
    return "\n".join(lines)


def agree(rows: pd.DataFrame) -> bool:
    """Every run in both copies and finished alike, and each one identical or with every main
    metric it reports inside the first copy's interval (a run without per-image results has
    no interval: it must be identical)."""
    if rows.empty:
        return False
    metrics = [c[: -len(" within")] for c in rows.columns if c.endswith(" within")]
    for _, r in rows.iterrows():
        if _flag(r["identical"]):
            continue
        if str(r["first_difference"]).startswith("only under") or \
                r.get("state") != r.get("state (second)"):
            return False
        for m in metrics:
            reported = any(r.get(c) == r.get(c) for c in (m, f"{m} (second)"))
            if reported and _flag(r.get(f"{m} within")) is not True:
                return False
    return True
