"""All run dirs under a root -> one tidy pandas DataFrame, one row per (run, iteration, metric).

Resumed runs cannot duplicate rows (the last row per run, type and iteration wins);
unfinished and failed runs are kept and labelled by `state`.
"""

import json
from pathlib import Path

import pandas as pd

from bench.rundir import RunDir  # the run-dir format; analysis never imports an engine
# spec.yaml's format: what a pair may differ in, every field's default, the backbone's name
from bench.spec import PER_INIT_FIELDS, RunSpec, backbone_label

# Every field's default as spec.yaml writes it (tuples as lists). A field added to the spec
# later is written by new runs at its default and absent from older run dirs: dropped at its
# default, both say the same thing, and a pair or a family does not split on the code version
_DEFAULTS = json.loads(json.dumps(RunSpec().to_dict()))


def _without_defaults(spec: dict) -> dict:
    out = {}
    for key, value in spec.items():
        default = _DEFAULTS.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            out[key] = {k: v for k, v in value.items() if k not in default or v != default[k]}
        elif key not in _DEFAULTS or value != default:
            out[key] = value
    return out

# COCOeval's 12 stats in its order (the engines write them as bbox/AP .. segm/ARl), then
# the keypoint task's own recall stats (keypoints/AP .. keypoints/ARl)
STAT_ORDER = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl", "AR", "AR50", "AR75"]
# The tasks an eval row may hold, and each one's main metric with its name in tables. A
# VOC run's task is "voc" (bench.voc_eval), whose main metric is its mAP at IoU 0.5, the
# number the paper and VOC report (`voc/AP` there is the mean over IoU 0.5:0.95).
TASKS = ("bbox", "segm", "keypoints", "voc")
MAIN_METRICS = ("bbox/AP", "segm/AP", "keypoints/AP", "voc/AP50")
LABELS = {"bbox/AP": "box", "segm/AP": "mask", "keypoints/AP": "keypoint", "voc/AP50": "VOC mAP"}
# column headings: "box AP", ...; VOC's mAP by its own name
HEADINGS = {m: label if m == "voc/AP50" else f"{label} AP" for m, label in LABELS.items()}


def main_metrics(df: pd.DataFrame):
    """The main metrics a study's runs report (a Faster R-CNN study has no mask AP, a
    keypoint study has keypoint AP, a VOC study VOC's mAP only)."""
    return [m for m in MAIN_METRICS if m in df.columns and df[m].notna().any()]


def is_stat(column: str) -> bool:
    return "/" in column and column.split("/")[0] in TASKS
ID_COLUMNS = ["run_id", "pair", "study", "engine", "arch", "backbone", "norm", "init", "schedule",
              "train_images", "images_used", "seed", "batch", "max_iter", "lr_drops", "state"]


def run_info(rd: RunDir) -> dict:
    doc = rd.read_spec_doc()
    spec = doc["spec"]
    status = rd.read_status()
    m, s, d = spec["model"], spec["solver"], spec["data"]
    # what a pair shares: the spec without its init, its checkpoint, its labels and the
    # fine-tuning conventions a recipe may set per side (spec.PER_INIT_FIELDS)
    shared = {k: v for k, v in spec.items() if k not in ("init", "pretrained", "name", "study")}
    shared["model"] = {k: v for k, v in m.items()
                       if f"model.{k}" not in PER_INIT_FIELDS}
    shared = _without_defaults(shared)
    return {"run_id": doc["run_id"], "study": spec["study"], "engine": spec["engine"],
            "pair": json.dumps(shared, sort_keys=True),
            # a cascade is another detector in every table (run dirs before it have no key)
            "arch": m["arch"] if m.get("roi_heads", "standard") == "standard"
            else f"{m['roi_heads']}_{m['arch']}",
            "backbone": backbone_label(m), "norm": m["norm"],
            "init": spec["init"], "schedule": s["schedule"],
            "train_images": d["train_images"] if d["train_images"] is not None else -1,
            "seed": spec["seed"], "batch": s["batch"], "max_iter": s["max_iter"],
            "lr_drops": ",".join(map(str, s["steps"])), "state": status.get("state", "queued"),
            "images_used": status.get("train_images_used", d["train_images"] or -1),
            "code_version": doc.get("code_version", "unknown")}


def load_runs(root, kind="eval") -> pd.DataFrame:
    """Tidy table of `kind` rows ("eval" or "train") of every run dir under `root`."""
    records = []
    for spec_file in sorted(Path(root).rglob("spec.yaml")):
        rd = RunDir(spec_file.parent)
        info = run_info(rd)
        rows = [r for r in rd.read_metrics() if r.get("type") == kind]
        latest = {r["iteration"]: r for r in rows}  # resume safety: one row per iteration
        for it in sorted(latest):
            r = latest[it]
            for metric, value in r.items():
                if metric in ("type", "iteration", "images_seen", "wall") or not isinstance(
                        value, (int, float)) or isinstance(value, bool):
                    continue
                records.append({**info, "iteration": it, "images_seen": r.get("images_seen"),
                                "metric": metric, "value": float(value)})
        if not latest:  # keep runs that have no row yet, so nothing is silently dropped
            records.append({**info, "iteration": 0, "images_seen": 0, "metric": None,
                            "value": float("nan")})
    columns = ID_COLUMNS + ["code_version", "iteration", "images_seen", "metric", "value"]
    return pd.DataFrame.from_records(records, columns=columns)


def final_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last evaluation, metrics as columns."""
    df = df.dropna(subset=["metric"])
    if df.empty:
        return pd.DataFrame(columns=ID_COLUMNS + ["iteration"])
    last = df.groupby("run_id")["iteration"].transform("max")
    df = df[df["iteration"] == last]
    wide = df.pivot_table(index=ID_COLUMNS + ["iteration"], columns="metric", values="value",
                          aggfunc="last").reset_index()
    wide.columns.name = None
    order = wide["train_images"].where(wide["train_images"] != -1, float("inf"))  # "all" last
    return wide.assign(_n=order).sort_values(["_n", "max_iter", "init", "seed"]) \
        .drop(columns="_n").reset_index(drop=True)


def paired(final: pd.DataFrame, metrics=MAIN_METRICS) -> pd.DataFrame:
    """Scratch vs imagenet side by side for every matched pair, with the difference."""
    keys = ["pair", "engine", "arch", "backbone", "norm", "schedule", "train_images", "seed",
            "max_iter"]
    cols = [m for m in metrics if m in final.columns]
    side = keys + cols + ["state", "run_id", "iteration"]
    s = final[final["init"] == "scratch"][side]
    p = final[final["init"] == "imagenet"][side]
    out = s.merge(p, on=keys, how="outer", suffixes=(" scratch", " imagenet"))
    for m in cols:
        out[f"{m} scratch-imagenet"] = out[f"{m} scratch"] - out[f"{m} imagenet"]
    order = out["train_images"].where(out["train_images"] != -1, float("inf"))  # "all" last
    return out.assign(_n=order).sort_values(["_n", "max_iter", "engine", "seed"]) \
        .drop(columns="_n") \
        .reset_index(drop=True)
