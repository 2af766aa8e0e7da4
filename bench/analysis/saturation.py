"""Has a learning-curve family stopped improving? The paper's regime test, from run dirs.

The paper's claim about training from scratch is made where the pre-trained model has
saturated: its 5x and 6x end within a fraction of an AP point. This table puts that test
next to every family of a study (runs equal in everything but the schedule length), per
init: the final AP at each schedule (the mean over the seeds that finished it) and the
change from the next-shorter schedule, so the longest pair of a study can be read against
the threshold its design chose (SATURATED_WITHIN).
"""

import json

import pandas as pd

# The mini study's criterion (the paper's 5x vs 6x): the longest schedule ends within this
# many box AP points of the next-longest one
SATURATED_WITHIN = 1.5

_SCHEDULE_FIELDS = ("schedule", "max_iter", "steps")


def family_key(pair: str) -> str:
    """A pair's shared spec (table.run_info's `pair`) without its schedule length and seed:
    what every schedule of one learning-curve family has in common."""
    spec = json.loads(pair)
    spec.pop("seed", None)
    spec["solver"] = {k: v for k, v in spec.get("solver", {}).items()
                      if k not in _SCHEDULE_FIELDS}
    return json.dumps(spec, sort_keys=True)


def table(final: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> pd.DataFrame:
    """One row per (family, init, schedule) of the finished runs: final AP (seed mean), seeds,
    and the change from the family's next-shorter schedule ("Δ <metric>"); `saturated` on
    each family's longest schedule says whether its box AP change is within SATURATED_WITHIN."""
    done = final[final["state"] == "done"].copy()
    if done.empty:
        return pd.DataFrame()
    done["family"] = done["pair"].map(family_key)
    cols = [m for m in metrics if m in done.columns]
    keys = ["family", "engine", "arch", "backbone", "norm", "train_images", "init"]
    rows = (done.groupby(keys + ["schedule", "max_iter"], dropna=False)
            .agg(**{m: (m, "mean") for m in cols}, seeds=("seed", "nunique"))
            .reset_index().sort_values(keys + ["max_iter"]))
    for m in cols:
        rows[f"Δ {m}"] = rows.groupby(keys, dropna=False)[m].diff()
    longest = rows.groupby(keys, dropna=False)["max_iter"].transform("max") == rows["max_iter"]
    box = rows.get("Δ bbox/AP")
    rows["saturated"] = None
    if box is not None:
        rows.loc[longest & box.notna(), "saturated"] = box[longest & box.notna()].abs() \
            <= SATURATED_WITHIN
    order = rows["train_images"].where(rows["train_images"] != -1, float("inf"))
    return rows.assign(_n=order).sort_values(["_n", "engine", "init", "max_iter"]) \
        .drop(columns=["_n", "family"]).reset_index(drop=True)


def markdown(rows: pd.DataFrame) -> str:
    def fmt(v):
        return "-" if v is None or v != v else f"{v:+.1f}"
    lines = [f"Final AP per schedule (mean over seeds) and the change from the next-shorter "
             f"schedule; the longest of each family counts as saturated when its box AP "
             f"changed by at most {SATURATED_WITHIN}.", "",
             "| train images | init | schedule | iterations | seeds | box AP | Δ box | mask AP "
             "| Δ mask | saturated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in rows.iterrows():
        n = "all" if r["train_images"] == -1 else str(int(r["train_images"]))
        engine = f" ({r['engine']})" if r["engine"] != "torchvision" else ""
        sat = {True: "yes", False: "no"}.get(r["saturated"], "")
        lines.append(" | ".join([
            f"| {n}", r["init"] + engine, r["schedule"], str(int(r["max_iter"])),
            str(int(r["seeds"])), f"{r.get('bbox/AP', float('nan')):.1f}",
            fmt(r.get("Δ bbox/AP")), f"{r.get('segm/AP', float('nan')):.1f}",
            fmt(r.get("Δ segm/AP")), f"{sat} |"]))
    return "\n".join(lines) + "\n"
