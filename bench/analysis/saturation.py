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

from bench.analysis.table import HEADINGS, LABELS

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
    and the change from the family's next-shorter schedule ("Δ <metric>", over the seeds both
    finished, so a seed added at one schedule only does not move it). `saturated` is given on
    each family's longest schedule, when that run has finished: whether its box AP changed by
    at most SATURATED_WITHIN (VOC's mAP in a VOC study). Families of one schedule have
    nothing to compare: left out."""
    if final.empty:
        return pd.DataFrame()
    runs = final.assign(family=final["pair"].map(family_key))
    keys = ["family", "engine", "arch", "backbone", "norm", "train_images", "init"]
    planned = runs.groupby(keys, dropna=False)["max_iter"].transform("max")
    done = runs[runs["state"] == "done"].assign(planned=planned)
    cols = [m for m in metrics if m in done.columns]
    records = []
    for _, fam in done.groupby(keys, dropna=False):
        by_schedule = sorted(fam.groupby("max_iter"), key=lambda kv: kv[0])
        if len({k for k, _ in by_schedule}) + int(fam["planned"].iloc[0] not in
                                                  set(fam["max_iter"])) < 2:
            continue
        previous = None
        for max_iter, runs_at in by_schedule:
            row = {k: runs_at[k].iloc[0] for k in keys + ["schedule"]}
            row.update(max_iter=max_iter, seeds=runs_at["seed"].nunique(),
                       **{m: runs_at[m].mean() for m in cols})
            for m in cols:
                row[f"Δ {m}"] = float("nan")
                if previous is not None:
                    shared = set(runs_at["seed"]) & set(previous["seed"])
                    now, before = (runs_at, previous) if not shared else \
                        (runs_at[runs_at["seed"].isin(shared)],
                         previous[previous["seed"].isin(shared)])
                    row[f"Δ {m}"] = now[m].mean() - before[m].mean()
            # box AP; a VOC study's box metric is VOC's mAP
            box = row.get("Δ bbox/AP", row.get("Δ voc/AP50", float("nan")))
            row["saturated"] = (bool(abs(box) <= SATURATED_WITHIN)
                                if max_iter == runs_at["planned"].iloc[0] and box == box
                                else None)
            records.append(row)
            previous = runs_at
    if not records:
        return pd.DataFrame()
    rows = pd.DataFrame.from_records(records)
    order = rows["train_images"].where(rows["train_images"] != -1, float("inf"))
    return rows.assign(_n=order).sort_values(["_n", "engine", "family", "init", "max_iter"]) \
        .drop(columns=["_n", "family"]).reset_index(drop=True)


def markdown(rows: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> str:
    def fmt(v):
        return "-" if v is None or v != v else f"{v:+.1f}"

    def value(v):
        return "-" if v is None or v != v else f"{v:.1f}"
    # the saturation test reads the study's box metric: VOC's mAP where a VOC study has no COCO AP
    box = HEADINGS["voc/AP50"] if "voc/AP50" in metrics and "bbox/AP" not in metrics \
        else HEADINGS["bbox/AP"]
    lines = [f"Final AP per schedule (mean over seeds) and the change from the next-shorter "
             f"schedule (over the seeds both finished); the longest of each family counts as "
             f"saturated when its {box} changed by at most {SATURATED_WITHIN}.", "",
             "| train images | init | schedule | iterations | seeds | "
             + "".join(f"{HEADINGS[m]} | Δ {LABELS[m]} | " for m in metrics) + "saturated |",
             "|---" * (6 + 2 * len(metrics)) + "|"]
    for _, r in rows.iterrows():
        n = "all" if r["train_images"] == -1 else str(int(r["train_images"]))
        engine = f" ({r['engine']})" if r["engine"] != "torchvision" else ""
        sat = {True: "yes", False: "no"}.get(r["saturated"], "")
        lines.append(" | ".join([
            f"| {n}", r["init"] + engine, r["schedule"], str(int(r["max_iter"])),
            str(int(r["seeds"])),
            *[c for m in metrics for c in (value(r.get(m)), fmt(r.get(f"Δ {m}")))],
            f"{sat} |"]))
    return "\n".join(lines) + "\n"
