"""All run dirs under a root -> one tidy pandas DataFrame, one row per (run, iteration, metric).

Resumed runs cannot duplicate rows (the last row per run, type and iteration wins);
unfinished and failed runs are kept and labelled by `state`.
"""

import json
from pathlib import Path

import pandas as pd
import yaml

ID_COLUMNS = ["run_id", "study", "engine", "arch", "backbone", "norm", "init", "schedule",
              "train_images", "seed", "batch", "max_iter", "lr_drops", "state"]


def _read_jsonl(path: Path):
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a torn last line from a killed writer
                continue
    return rows


def run_info(run_dir: Path) -> dict:
    doc = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec = doc["spec"]
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        status = {"state": "queued"}
    m, s, d = spec["model"], spec["solver"], spec["data"]
    return {"run_id": doc["run_id"], "study": spec["study"], "engine": spec["engine"],
            "arch": m["arch"], "backbone": f"{m['backbone']}{m['depth']}", "norm": m["norm"],
            "init": spec["init"], "schedule": s["schedule"],
            "train_images": d["train_images"] if d["train_images"] is not None else -1,
            "seed": spec["seed"], "batch": s["batch"], "max_iter": s["max_iter"],
            "lr_drops": ",".join(map(str, s["steps"])), "state": status.get("state", "queued"),
            "code_version": doc.get("code_version", "unknown")}


def load_runs(root, kind="eval") -> pd.DataFrame:
    """Tidy table of `kind` rows ("eval" or "train") of every run dir under `root`."""
    records = []
    for spec_file in sorted(Path(root).rglob("spec.yaml")):
        run_dir = spec_file.parent
        info = run_info(run_dir)
        rows = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if r.get("type") == kind]
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
    return wide.sort_values(["train_images", "max_iter", "init", "seed"]).reset_index(drop=True)


def paired(final: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> pd.DataFrame:
    """Scratch vs imagenet side by side for every matched pair, with the difference."""
    keys = ["arch", "backbone", "norm", "schedule", "train_images", "seed", "max_iter"]
    cols = [m for m in metrics if m in final.columns]
    s = final[final["init"] == "scratch"].set_index(keys)[cols + ["state"]]
    p = final[final["init"] == "imagenet"].set_index(keys)[cols + ["state"]]
    out = s.join(p, lsuffix=" scratch", rsuffix=" imagenet", how="outer")
    for m in cols:
        out[f"{m} scratch-imagenet"] = out[f"{m} scratch"] - out[f"{m} imagenet"]
    return out.reset_index().sort_values(["train_images", "max_iter", "seed"]).reset_index(drop=True)
