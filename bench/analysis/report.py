"""`bench figures`: every figure and table of a study, written from its run dirs alone."""

import json
from pathlib import Path

import pandas as pd

from bench.analysis import bootstrap, figures, reference, saturation, table
from bench.analysis.table import STAT_ORDER
from bench.rundir import RunDir

TABLE_METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")


def _fmt(v):
    return "-" if v != v else f"{v:.1f}"  # NaN -> "-"


def markdown_pairs(pairs, metrics=("bbox/AP", "segm/AP")):
    head = "".join(f"{table.HEADINGS[m]} scratch | {table.HEADINGS[m]} pre-trained | "
                   f"Δ {table.LABELS[m]} | " for m in metrics)
    lines = [f"| schedule | iterations | train images | {head}state |",
             "|---" * (4 + 3 * len(metrics)) + "|"]
    # several seeds of one pair would otherwise read as duplicated rows
    seeded = "seed" in pairs.columns and pairs["seed"].nunique() > 1
    for _, r in pairs.iterrows():
        n = "all" if r["train_images"] == -1 else str(int(r["train_images"]))
        engine = f" ({r['engine']})" if r.get("engine", "torchvision") != "torchvision" else ""
        seed = f", seed {int(r['seed'])}" if seeded else ""
        cells = [r["schedule"] + engine + seed, str(int(r["max_iter"])), n]
        for m in metrics:
            cells += [_fmt(r.get(f"{m} scratch", float("nan"))),
                      _fmt(r.get(f"{m} imagenet", float("nan"))),
                      _fmt(r.get(f"{m} scratch-imagenet", float("nan")))]
        # an unfinished or failed run's last eval is not a final AP: say so in the row
        states = {r.get("state scratch"), r.get("state imagenet")}
        cells.append("done" if states == {"done"} else
                     " / ".join(f"{init}: {r.get(f'state {init}')}" for init in ("scratch", "imagenet")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pairs_table(pairs: pd.DataFrame) -> pd.DataFrame:
    """Every pair with all of its stats, scratch and pre-trained, scratch - pre-trained, and
    (box and mask AP) that difference's 95% interval over val images."""
    keep = ["engine", "arch", "backbone", "norm", "schedule", "max_iter", "train_images", "seed",
            "state scratch", "state imagenet", "run_id scratch", "run_id imagenet"]
    stats = sorted({c.split(" ", 1)[0] for c in pairs.columns if table.is_stat(c)},
                   key=lambda m: (m.split("/")[0], STAT_ORDER.index(m.split("/")[1])
                                  if m.split("/")[1] in STAT_ORDER else 99))
    cols = [f"{m} {w}" for m in stats for w in ("scratch", "imagenet", "scratch-imagenet",
                                                "scratch-imagenet lo", "scratch-imagenet hi")]
    return pairs[[c for c in keep + cols if c in pairs.columns]]


def markdown_gaps(gaps: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> str:
    """The gap of each pair of recipes, seeds pooled, with both intervals."""
    head = "".join(f"Δ {table.LABELS[m]} | 95% over seeds | 95% over val images | "
                   for m in metrics)
    lines = [f"| schedule | iterations | train images | seeds | {head}",
             "|---" * (4 + 3 * len(metrics)) + "|"]

    def iv(r, m, how):
        lo, hi = r.get(f"{m} gap lo ({how})", float("nan")), r.get(f"{m} gap hi ({how})",
                                                                     float("nan"))
        return "-" if lo != lo else f"[{lo:.1f}, {hi:.1f}]"
    for _, r in gaps.iterrows():
        n = "all" if r["train_images"] == -1 else str(int(r["train_images"]))
        engine = f" ({r['engine']})" if r.get("engine", "torchvision") != "torchvision" else ""
        seeds = str(int(r["seeds"]))
        if r.get("incomplete", 0) == r.get("incomplete", 0) and r.get("incomplete", 0):
            seeds += f" (+{int(r['incomplete'])} unfinished, left out)"
        cells = [r["schedule"] + engine, str(int(r["max_iter"])), n, seeds]
        for m in metrics:
            cells += [_fmt(r.get(f"{m} gap", float("nan"))), iv(r, m, "seeds"),
                      iv(r, m, "images")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def provenance(runs_dir: Path, final: pd.DataFrame) -> dict:
    """What produced the numbers: each run's code version and package versions, as its
    spec.yaml recorded them when it started (not the checkout that draws the figures)."""
    code, packages = set(), set()
    for spec_file in sorted(Path(runs_dir).rglob("spec.yaml")):
        doc = RunDir(spec_file.parent).read_spec_doc()
        code.add(str(doc.get("code_version", "unknown")))
        packages.add(json.dumps(doc.get("packages") or {}, sort_keys=True))
    return {"runs": int(final.shape[0]), "code_versions": sorted(code),
            "packages": [json.loads(p) for p in sorted(packages)],
            "engines": sorted(set(final["engine"])),
            "states": {k: int(v) for k, v in sorted(final["state"].value_counts().items())}}


def write_study_results(runs_dir: Path, out: Path, published=None, log=print):
    """Every figure (PNG and PDF) and table of the study whose run dirs are under `runs_dir`,
    written under `out`; returns the paths. `published`: reference.load()'s table."""
    out.mkdir(parents=True, exist_ok=True)
    evals = table.load_runs(runs_dir, "eval")
    if evals.empty:
        raise FileNotFoundError(f"no run dir under {runs_dir}; run `bench run` first")
    final = table.final_metrics(evals)
    if final.empty:
        raise FileNotFoundError(f"no run under {runs_dir} has an evaluation yet; figures need "
                                f"at least one eval row (see `bench status`)")
    pairs = table.paired(final, metrics=[c for c in final.columns if table.is_stat(c)])
    metrics = table.main_metrics(final)  # box, and mask or keypoint AP: what the runs report
    # intervals over val images, from the per-image results each run kept at its last eval
    runs = bootstrap.Runs({RunDir(f.parent).read_spec_doc()["run_id"]: f.parent
                           for f in sorted(Path(runs_dir).rglob("spec.yaml"))})
    pairs = bootstrap.pair_intervals(pairs, runs, log=log)
    gaps = bootstrap.gaps_over_seeds(pairs, runs, log=log)
    written = []
    written += figures.save(figures.ap_vs_iterations(evals, metrics), out / "ap_vs_iterations")
    written += figures.save(figures.ap_vs_train_size(bootstrap.run_intervals(final, runs),
                                                     metrics), out / "ap_vs_train_size")
    written += figures.save(figures.gap_vs_schedule(gaps, metrics), out / "gap_vs_schedule")
    written += figures.save(figures.final_ap_by_model(final, metrics),
                            out / "final_ap_by_model")

    stats = [c for c in final.columns if table.is_stat(c)]
    keep = [c for c in table.ID_COLUMNS if c != "pair"] + ["iteration"] + stats
    final[keep].to_csv(out / "final_ap.csv", index=False, float_format="%.3f")
    written.append(out / "final_ap.csv")
    pairs_table(pairs).to_csv(out / "pairs.csv", index=False, float_format="%.3f")
    written.append(out / "pairs.csv")
    (out / "final_ap.md").write_text(markdown_pairs(pairs, metrics))
    written.append(out / "final_ap.md")
    gaps.to_csv(out / "gaps.csv", index=False, float_format="%.3f")
    (out / "gaps.md").write_text(markdown_gaps(gaps, metrics))
    written += [out / "gaps.csv", out / "gaps.md"]
    curve = saturation.table(final, metrics)
    for path in (out / "saturation.csv", out / "saturation.md"):
        path.unlink(missing_ok=True)  # a study that no longer has a finished run keeps none
    if not curve.empty:
        curve.to_csv(out / "saturation.csv", index=False, float_format="%.3f")
        (out / "saturation.md").write_text(saturation.markdown(curve, metrics))
        written += [out / "saturation.csv", out / "saturation.md"]

    # test-time augmented evaluations (eval.tta): their own tables, never in the curves
    augmented = table.load_runs(runs_dir, "eval_tta")
    final_tta = table.final_metrics(augmented) if not augmented.empty else augmented
    for name in ("final_ap_test_aug.csv", "pairs_test_aug.csv", "final_ap_test_aug.md"):
        (out / name).unlink(missing_ok=True)
    ours = final
    if not final_tta.empty:
        tta_stats = [c for c in final_tta.columns if table.is_stat(c)]
        ids = [c for c in table.ID_COLUMNS if c != "pair"] + ["iteration"]
        final_tta[ids + tta_stats].to_csv(out / "final_ap_test_aug.csv", index=False,
                                          float_format="%.3f")
        pairs_tta = table.paired(final_tta, metrics=tta_stats)
        pairs_table(pairs_tta).to_csv(out / "pairs_test_aug.csv", index=False,
                                      float_format="%.3f")
        (out / "final_ap_test_aug.md").write_text(markdown_pairs(pairs_tta, metrics))
        written += [out / n for n in ("final_ap_test_aug.csv", "pairs_test_aug.csv",
                                      "final_ap_test_aug.md")]
        marked = {c: f"{c}{reference.TEST_AUG}" for c in tta_stats}
        ours = final.merge(final_tta[["run_id"] + tta_stats].rename(columns=marked),
                           on="run_id", how="left")
    compared = reference.beside(ours, published if published is not None else reference.load())
    stale = [out / f for f in ("vs_published.csv", "vs_published.md", "ours_vs_published.png",
                               "ours_vs_published.pdf")]
    for path in stale:  # a study that lost its published counterpart keeps no old comparison
        path.unlink(missing_ok=True)
    if not compared.empty:
        compared.to_csv(out / "vs_published.csv", index=False, float_format="%.3f")
        (out / "vs_published.md").write_text(markdown_published(compared))
        written += [out / "vs_published.csv", out / "vs_published.md"]
        written += figures.save(figures.ours_vs_published(compared), out / "ours_vs_published")
    (out / "provenance.json").write_text(json.dumps(provenance(runs_dir, final), indent=1,
                                                    sort_keys=True) + "\n")
    written.append(out / "provenance.json")
    return written


def markdown_published(compared: pd.DataFrame) -> str:
    lines = ["| run | init | iterations | metric | ours | published | ours − published | "
             "state | source |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in compared.iterrows():
        lines.append(f"| {r['run_id']} | {r['init']} | {int(r['iterations'])} | {r['metric']} | "
                     f"{_fmt(r['ours'])} | {_fmt(r['published'])} | "
                     f"{_fmt(r['ours - published'])} | {r['state']} | {r['source']} |")
    return "\n".join(lines) + "\n"


def redraw(results: Path, only=None, recipes: Path = Path("recipes"), collect_from=None):
    """`bench figures`: with `collect_from` (a runs root), first copy the `only` studies' run
    files (all studies there if none named) into results/<study>/runs; then draw every
    study under `results` (or the `only` ones) from those committed files alone, and the
    index page."""
    from bench.analysis import collect, html
    if collect_from is not None:
        root = collect_from
        for study in only or sorted(p.name for p in root.iterdir() if p.is_dir()):
            n = collect.collect(root / study, results / study / "runs")
            print(f"{study}: {n} runs copied from {root / study} to {results / study / 'runs'}")
    studies = sorted(p.parent.name for p in results.glob("*/runs") if p.is_dir())
    studies = [s for s in studies if not only or s in only]
    if not studies:
        raise FileNotFoundError(f"no study under {results} has a runs/ folder; copy a study's "
                                f"run files there first with `bench figures --collect --study "
                                f"NAME`")
    published = reference.load(results / "reference")
    for study in studies:
        try:
            written = write_study_results(results / study / "runs", results / study, published)
        except FileNotFoundError as e:  # a study with no evaluation yet: the others go on
            print(f"{study}: skipped: {e}")
            continue
        for path in written:
            print(path)
    print(html.write_index(results, sorted(p.parent.name for p in results.glob("*/runs")),
                           recipes))
