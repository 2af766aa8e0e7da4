"""`bench figures`: every figure and table of a study, written from its run dirs alone."""

import json
from pathlib import Path

from bench.analysis import figures, table

TABLE_METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")


def _fmt(v):
    return "-" if v != v else f"{v:.1f}"  # NaN -> "-"


def markdown_pairs(pairs):
    lines = ["| schedule | iterations | train images | box AP scratch | box AP pre-trained | "
             "Δ box | mask AP scratch | mask AP pre-trained | Δ mask | state |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in pairs.iterrows():
        n = "all" if r["train_images"] == -1 else str(int(r["train_images"]))
        cells = [r["schedule"], str(int(r["max_iter"])), n]
        for m in ("bbox/AP", "segm/AP"):
            cells += [_fmt(r.get(f"{m} scratch", float("nan"))),
                      _fmt(r.get(f"{m} imagenet", float("nan"))),
                      _fmt(r.get(f"{m} scratch-imagenet", float("nan")))]
        # an unfinished or failed run's last eval is not a final AP: say so in the row
        states = {r.get("state scratch"), r.get("state imagenet")}
        cells.append("done" if states == {"done"} else
                     " / ".join(f"{init}: {r.get(f'state {init}')}" for init in ("scratch", "imagenet")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_study_results(study_root: Path, out: Path):
    """Write figures (PNG), final-AP CSV and Markdown under `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    evals = table.load_runs(study_root, "eval")
    if evals.empty:
        raise FileNotFoundError(f"no run dir under {study_root}; run `bench run` first")
    final = table.final_metrics(evals)
    if final.empty:
        raise FileNotFoundError(f"no run under {study_root} has an evaluation yet; figures need "
                                f"at least one eval row (see `bench status`)")
    pairs = table.paired(final)
    written = []

    fig = figures.ap_vs_iterations(evals)
    fig.savefig(out / "ap_vs_iterations.png", dpi=130, metadata={"Software": None})
    written.append(out / "ap_vs_iterations.png")
    fig = figures.ap_vs_train_size(final)
    fig.savefig(out / "ap_vs_train_size.png", dpi=130, metadata={"Software": None})
    written.append(out / "ap_vs_train_size.png")

    stats = [c for c in final.columns if "/" in c and c.split("/")[0] in ("bbox", "segm")]
    keep = [c for c in table.ID_COLUMNS if c != "pair"] + ["iteration"] + stats
    final[keep].to_csv(out / "final_ap.csv", index=False, float_format="%.3f")
    written.append(out / "final_ap.csv")
    (out / "final_ap.md").write_text(markdown_pairs(pairs))
    written.append(out / "final_ap.md")
    versions = sorted(set(evals["code_version"]))
    (out / "provenance.json").write_text(json.dumps(
        {"runs": int(final.shape[0]), "code_versions": versions,
         "states": final["state"].value_counts().to_dict()}, indent=1, sort_keys=True) + "\n")
    written.append(out / "provenance.json")
    return written
