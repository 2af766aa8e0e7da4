"""The published numbers (results/reference/) in the tidy table's terms, and ours beside them.

A published row belongs to a run of ours when it names our study (`recipe` column) and has
the run's init and iteration count (stated, or N x 90k where the reference says the paper's
schedule was `Nx (inferred)`); its metric is renamed to our key (`bbox AP50` ->
`bbox/AP50`). Rows read off a plot we could not see have no value and are left out; so are
metrics with no key of ours (test-challenge numbers).
"""

import re
from pathlib import Path

import pandas as pd

REFERENCE = Path(__file__).resolve().parents[2] / "results" / "reference"
COLUMNS = ["study", "init", "iterations", "metric", "published", "source"]

# the paper's metric names -> ours; "AP (bbox per context)" is how its less-data section
# reports box AP
METRICS = {"bbox AP": "bbox/AP", "bbox AP50": "bbox/AP50", "bbox AP75": "bbox/AP75",
           "mask AP": "segm/AP", "mask AP50": "segm/AP50", "mask AP75": "segm/AP75",
           "AP (bbox per context)": "bbox/AP", "keypoint AP": "keypoints/AP",
           # VOC's mAP: AP at IoU 0.5, area under the curve, on VOC2012 val (bench.voc_eval)
           "VOC mAP (val2012)": "voc/AP50"}
# A number made with test-time augmentation (Fig. 5's and Table 3's "+ test aug") is set
# beside our eval_tta rows: its metric keeps the mark, "bbox/AP (test aug)"
TEST_AUG = " (test aug)"
METRICS.update({f"{k}{TEST_AUG}": f"{v}{TEST_AUG}" for k, v in list(METRICS.items())})


def _iterations(iterations, schedule):
    """(iteration count, note) of a published row: its number of iterations when it states
    one, else N x 90k for a schedule written `Nx (inferred)` (the paper's batch 16); None when
    neither is clear ("3x or 4x", unstated)."""
    m = re.match(r"\s*(\d+)", str(iterations)) if isinstance(iterations, str) else None
    if m:
        return int(m.group(1)), ""
    m = re.fullmatch(r"(\d+)x \(inferred\)", str(schedule))
    if m:
        return int(m.group(1)) * 90_000, f" (schedule {schedule})"
    return None, ""


def load(root: Path = REFERENCE) -> pd.DataFrame:
    """Every published number that some study of ours reproduces, one row per value."""
    frames = []
    paper = root / "he2019.csv"
    if paper.is_file():
        d = pd.read_csv(paper, dtype={"iterations": str})
        d = d[d["recipe"].notna() & d["value"].notna() & d["metric"].isin(list(METRICS))]
        lengths = [_iterations(it, sched) for it, sched in zip(d["iterations"], d["schedule"])]
        d = d.assign(_it=[n for n, _ in lengths], _how=[h for _, h in lengths])
        d = d[d["_it"].notna()]
        frames.append(pd.DataFrame({
            "study": d["recipe"], "init": d["init"], "iterations": d["_it"].astype(int),
            "metric": d["metric"].map(METRICS), "published": d["value"].astype(float),
            "source": "He et al. 2019, " + d["source"].astype(str) + d["_how"]}))
    zoo = root / "detectron2_zoo.csv"
    if zoo.is_file():
        z = pd.read_csv(zoo)
        z = z[z["recipe"].notna()]
        for column, metric in (("box_ap", "bbox/AP"), ("mask_ap", "segm/AP")):
            frames.append(pd.DataFrame({
                "study": z["recipe"], "init": z["init"], "iterations": z["iterations"].astype(int),
                "metric": metric, "published": z[column].astype(float),
                "source": "detectron2 model zoo, " + z["config"].astype(str)}))
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    out = pd.concat(frames, ignore_index=True)[COLUMNS]
    # one number printed in two places (Table 1's 6x is Table 2's row): one row, both sources
    keys = ["study", "init", "iterations", "metric", "published"]
    return out.groupby(keys, sort=False, as_index=False).agg({"source": "; ".join})[COLUMNS]


def beside(final: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Our final AP next to each published number of the same study, init and length:
    run_id, study, init, schedule, iterations, metric, ours, published, ours - published."""
    cols = ["run_id", "study", "init", "schedule", "max_iter", "seed", "state"]
    ours = final.melt(id_vars=[c for c in cols if c in final.columns],
                      value_vars=[m for m in set(published["metric"]) if m in final.columns],
                      var_name="metric", value_name="ours")
    out = ours.merge(published, left_on=["study", "init", "max_iter", "metric"],
                     right_on=["study", "init", "iterations", "metric"], how="inner")
    out["ours - published"] = out["ours"] - out["published"]
    keep = ["run_id", "study", "init", "schedule", "iterations", "seed", "state", "metric",
            "ours", "published", "ours - published", "source"]
    return out[keep].sort_values(["study", "iterations", "init", "metric", "seed"]) \
        .reset_index(drop=True)
