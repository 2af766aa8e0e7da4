"""The paper's figures from the tidy table: pure functions DataFrame -> matplotlib Figure.

One style for all: scratch solid, pre-trained dashed (readable in greyscale), one marker
per schedule, LR drops marked on each curve.
"""

import itertools

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench.analysis.table import MAIN_METRICS as METRICS  # noqa: E402 - one panel each, if run

INIT_STYLE = {"scratch": dict(linestyle="-", color="#1f4e9c", label="random init"),
              "imagenet": dict(linestyle="--", color="#c0392b", label="pre-trained (fine-tune)")}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
METRIC_LABEL = {"bbox/AP": "bbox AP", "segm/AP": "mask AP", "keypoints/AP": "keypoint AP",
                "voc/AP50": "VOC mAP (AP50)"}


def _size_label(n):
    return "all images" if n == -1 else f"{int(n)} images"


def _schedule_order(df):
    return sorted(df["schedule"].unique(), key=lambda s: df[df["schedule"] == s]["max_iter"].max())


def ap_vs_iterations(df: pd.DataFrame, metrics=METRICS) -> plt.Figure:
    """Learning curves: AP against iterations for every schedule, scratch vs pre-trained;
    one column per training-set size, one row per metric. LR drops are the filled markers."""
    df = df.dropna(subset=["metric"])
    metrics = [m for m in metrics if m in set(df["metric"])]
    sizes = sorted(df["train_images"].unique(), key=lambda n: float("inf") if n == -1 else n)
    fig, axes = plt.subplots(len(metrics), len(sizes), figsize=(4.8 * len(sizes), 3.4 * len(metrics)),
                             squeeze=False, sharex=True)
    schedules = _schedule_order(df)
    for col, size in enumerate(sizes):
        for row, metric in enumerate(metrics):
            ax = axes[row][col]
            sub = df[(df["train_images"] == size) & (df["metric"] == metric)]
            for k, sched in enumerate(schedules):
                for init, style in INIT_STYLE.items():
                    runs = sub[(sub["schedule"] == sched) & (sub["init"] == init)]
                    # one curve per engine: the seeds' mean, and a band over the seeds' range
                    # (min to max at each evaluation), so the spread is shown, never averaged away
                    for engine, series in runs.groupby("engine"):
                        by_it = series.groupby("iteration")["value"]
                        curve = by_it.agg(["mean", "min", "max", "count"]).reset_index()
                        other = engine != "torchvision"  # drawn thick, pale
                        ax.plot(curve["iteration"], curve["mean"], linestyle=style["linestyle"],
                                color=style["color"], marker=MARKERS[k % len(MARKERS)],
                                markersize=3.5, markerfacecolor="white",
                                linewidth=2.6 if other else 1.2, alpha=0.55 if other else 1.0)
                        if series["run_id"].nunique() > 1:
                            ax.fill_between(curve["iteration"], curve["min"], curve["max"],
                                            color=style["color"], alpha=0.15, linewidth=0)
                        for _, run in series.groupby("run_id"):
                            if run["state"].iloc[0] != "done":
                                last = run.sort_values("iteration").iloc[-1]
                                ax.annotate(run["state"].iloc[0], (last["iteration"],
                                                                   last["value"]), fontsize=7)
                # LR drops: filled markers on the x axis (evals rarely fall exactly on them)
                runs = sub[sub["schedule"] == sched]
                if not runs.empty:
                    drops = [int(x) for x in str(runs["lr_drops"].iloc[0]).split(",") if x]
                    ax.plot(drops, [0.0] * len(drops), linestyle="none", color="black",
                            marker=MARKERS[k % len(MARKERS)], markersize=5, clip_on=False,
                            transform=ax.get_xaxis_transform(), zorder=5)
            ax.set_title(f"{_size_label(size)}: {METRIC_LABEL.get(metric, metric)}", fontsize=10)
            ax.grid(alpha=0.3)
            if row == len(metrics) - 1:
                ax.set_xlabel("iterations")
            if col == 0:
                ax.set_ylabel(METRIC_LABEL.get(metric, metric))
    handles = [plt.Line2D([], [], **{k: v for k, v in s.items()}) for s in INIT_STYLE.values()]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[k % len(MARKERS)], linestyle="none",
                           markerfacecolor="white", label=f"schedule {s}")
                for k, s in enumerate(schedules)]
    handles.append(plt.Line2D([], [], color="black", marker="o", linestyle="none",
                              label="LR drops (filled, on the x axis)"))
    if df.groupby(["engine", "schedule", "init", "train_images"])["run_id"].nunique().max() > 1:
        handles.append(matplotlib.patches.Patch(color="grey", alpha=0.3,
                                                label="seeds: mean, band from min to max"))
    for engine in sorted(set(df["engine"]) - {"torchvision"}):
        handles.append(plt.Line2D([], [], color="grey", linewidth=2.6, alpha=0.55,
                                  label=f"{engine} engine (thick)"))
    ncol = min(len(handles), 2 if len(sizes) == 1 else 3 * len(sizes))  # no wider than the panels
    rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.06 * rows / len(metrics), 1, 1))
    return fig


def _interval(values, lo_hi=None):
    """Mean and 95% interval of one point: over seeds (Student's t) where there are 2 or
    more, else the run's interval over val images (`lo_hi`, NaN if it kept none)."""
    from bench.analysis.bootstrap import _t_quantile
    values = pd.Series(values).dropna()
    mean = float(values.mean()) if len(values) else float("nan")
    if len(values) >= 2:
        half = _t_quantile(len(values) - 1) * values.std(ddof=1) / len(values) ** 0.5
        return mean, mean - half, mean + half
    lo, hi = lo_hi if lo_hi is not None else (float("nan"), float("nan"))
    return mean, lo, hi


def ap_vs_train_size(final: pd.DataFrame, metrics=METRICS) -> plt.Figure:
    """Final AP against training-set size, scratch vs pre-trained, one marker per schedule,
    with 95% error bars: over seeds where there are several, else over val images (the
    columns "<metric> lo (images)" / "hi (images)" when the runs kept per-image results)."""
    metrics = [m for m in metrics if m in final.columns and final[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    schedules = _schedule_order(final)
    for col, metric in enumerate(metrics):
        ax = axes[0][col]
        for k, sched in enumerate(schedules):
            for (init, style), engine in itertools.product(INIT_STYLE.items(),
                                                           sorted(set(final["engine"]))):
                # engines are separate series (never averaged into one "seed spread")
                sub = final[(final["schedule"] == sched) & (final["init"] == init)
                            & (final["engine"] == engine)].copy()
                if sub.empty:
                    continue
                other = engine != "torchvision"  # drawn thick and pale, as in the curves
                # the number of images a run really trained on ("all" included)
                rows = []
                for n, pts in sub.groupby("images_used"):
                    lo_hi = None
                    if len(pts) == 1 and f"{metric} lo (images)" in pts.columns:
                        lo_hi = (pts[f"{metric} lo (images)"].iloc[0],
                                 pts[f"{metric} hi (images)"].iloc[0])
                    rows.append((n, *_interval(pts[metric], lo_hi)))
                g = pd.DataFrame(rows, columns=["images_used", "mean", "lo", "hi"])
                _with_bars(ax, g["images_used"], g["mean"], g["lo"], g["hi"],
                           linestyle=style["linestyle"], color=style["color"],
                           marker=MARKERS[k % len(MARKERS)], markersize=4,
                           markerfacecolor="white", linewidth=2.6 if other else 1.2,
                           alpha=0.55 if other else 1.0)
        ax.set_xscale("log")
        sizes = sorted(final["images_used"].unique())
        ax.set_xticks(sizes, [f"{int(n):,}" for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("training images")
        ax.set_ylabel(METRIC_LABEL.get(metric, metric))
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], **s) for s in INIT_STYLE.values()]
    handles += [plt.Line2D([], [], color="grey", marker=MARKERS[k % len(MARKERS)],
                           markerfacecolor="white", linestyle="none", label=f"schedule {s}")
                for k, s in enumerate(schedules)]
    handles += [plt.Line2D([], [], color="grey", linewidth=2.6, alpha=0.55,
                           label=f"{engine} engine (thick)")
                for engine in sorted(set(final["engine"]) - {"torchvision"})]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.suptitle("bars: 95% over seeds where several, else over val images; no bar: no "
                 "interval", fontsize=8,
                 y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    return fig


def _with_bars(ax, x, mean, lo, hi, **style):
    """A line through the means, and 95% bars only where an interval exists: a point without
    one has no bar, not a zero-width bar that would look exact."""
    x, mean = np.asarray(x, dtype=float), np.asarray(mean, dtype=float)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    ax.plot(x, mean, **style)
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(mean)
    if ok.any():
        ax.errorbar(x[ok], mean[ok], yerr=[mean[ok] - lo[ok], hi[ok] - mean[ok]], fmt="none",
                    ecolor=style.get("color"), capsize=2, alpha=style.get("alpha", 1.0),
                    linewidth=1.0)


def gap_vs_schedule(gaps: pd.DataFrame, metrics=METRICS) -> plt.Figure:
    """The paper's message in one picture: scratch - pre-trained AP against schedule length,
    one line per training-set size, with 95% bars (over seeds where there are 2 or more,
    else over val images). Above 0, training from scratch caught up."""
    metrics = [m for m in metrics if f"{m} gap" in gaps.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    sizes = sorted(gaps["train_images"].unique(), key=lambda n: float("inf") if n == -1 else n)
    for col, metric in enumerate(metrics):
        ax = axes[0][col]
        for k, size in enumerate(sizes):
            for engine, sub in gaps[gaps["train_images"] == size].groupby("engine"):
                sub = sub.sort_values("max_iter")
                # over seeds where they give one, else over val images, else none drawn
                lo, hi = (sub[f"{metric} gap {end} (seeds)"].where(
                    sub[f"{metric} gap lo (seeds)"].notna(), sub[f"{metric} gap {end} (images)"])
                    for end in ("lo", "hi"))
                other = engine != "torchvision"
                _with_bars(ax, sub["max_iter"], sub[f"{metric} gap"], lo, hi,
                           marker=MARKERS[k % len(MARKERS)],
                           color=f"C{k % 10}",  # one colour per size, whatever the engine
                           markersize=4, markerfacecolor="white",
                           linewidth=2.6 if other else 1.2, alpha=0.55 if other else 1.0,
                           label=_size_label(size) + (f" ({engine})" if other else ""))
        ax.axhline(0, color="black", linewidth=0.8, linestyle=":")
        ax.set_xlabel("iterations (schedule length)")
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)}: scratch - pre-trained")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.suptitle("bars: 95% over seeds where several, else over val images; no bar: no "
                 "interval", fontsize=8,
                 y=0.01, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig



def _model_label(r) -> str:
    arch = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN"}.get(r["arch"], r["arch"])
    engine = f" ({r['engine']})" if r.get("engine", "torchvision") != "torchvision" else ""
    return f"{arch} {r['backbone']} {r['norm']}{engine}"


def _size_short(n) -> str:
    return "all img" if n == -1 else f"{int(n):,} img"


def final_ap_by_model(final: pd.DataFrame, metrics=METRICS) -> plt.Figure:
    """Final AP, scratch vs pre-trained, for every model, norm, schedule and training-set
    size of the table: grouped bars (scratch hatched, pre-trained solid: distinct in greyscale),
    one panel per metric; several seeds show as their mean with min-max bars."""
    metrics = [m for m in metrics if m in final.columns and final[m].notna().any()]
    keys = ["engine", "arch", "backbone", "norm", "schedule", "train_images", "max_iter"]
    groups = final[keys].drop_duplicates().sort_values(
        ["arch", "backbone", "norm", "engine", "train_images", "max_iter"],
        key=lambda c: c.where(c != -1, float("inf")) if c.name == "train_images" else c)
    fig, axes = plt.subplots(1, len(metrics), squeeze=False,
                             figsize=(max(4.8, 1.1 * len(groups) + 1.5) * len(metrics) / 1.4, 3.8))
    width = 0.38
    for col, metric in enumerate(metrics):
        ax = axes[0][col]
        for k, init in enumerate(INIT_STYLE):
            means, lows, highs = [], [], []
            for _, g in groups.iterrows():
                sel = final[(final[keys] == g[keys]).all(axis=1) & (final["init"] == init)][metric]
                sel = sel.dropna()
                means.append(sel.mean() if len(sel) else float("nan"))
                lows.append(means[-1] - sel.min() if len(sel) else 0.0)
                highs.append(sel.max() - means[-1] if len(sel) else 0.0)
            x = [i + (k - 0.5) * width for i in range(len(groups))]
            spread = any(v > 0 for v in lows + highs)  # only seeds make error bars
            ax.bar(x, means, width, yerr=[lows, highs] if spread else None, capsize=2,
                   color="white" if init == "scratch" else INIT_STYLE[init]["color"],
                   edgecolor=INIT_STYLE[init]["color"], hatch="///" if init == "scratch" else None,
                   label=INIT_STYLE[init]["label"], linewidth=1.0)
        models = {_model_label(g) for _, g in groups.iterrows()}
        ticks = [(f"{_model_label(g)}\n" if len(models) > 1 else "")
                 + f"{g['schedule']}, {_size_short(g['train_images'])}"
                 for _, g in groups.iterrows()]
        ax.set_xticks(range(len(groups)), ticks, fontsize=7,
                      rotation=30 if len(models) > 1 else 0, ha="right" if len(models) > 1
                      else "center")
        if len(models) == 1:
            ax.set_title(models.pop(), fontsize=10)
        ax.set_ylabel(f"final {METRIC_LABEL.get(metric, metric)}")
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def ours_vs_published(compared: pd.DataFrame) -> plt.Figure:
    """Our final AP against the published number of the same run (one point per run and
    metric; scratch hollow circles, pre-trained filled squares), with the y = x line: a point
    below it is a run of ours that ended under the paper."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for init, style in INIT_STYLE.items():
        sub = compared[compared["init"] == init]
        ax.plot(sub["published"], sub["ours"], linestyle="none", color=style["color"],
                marker="o" if init == "scratch" else "s", markersize=5,
                markerfacecolor="white" if init == "scratch" else style["color"],
                label=style["label"])
    values = pd.concat([compared["published"], compared["ours"]]).dropna()
    lo, hi = (values.min(), values.max()) if len(values) else (0.0, 1.0)
    pad = max(1.0, 0.05 * (hi - lo))
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", linewidth=0.8,
            linestyle=":", label="ours = published")
    ax.set_xlabel("published AP")
    ax.set_ylabel("our AP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, stem) -> list:
    """`stem`.png and `stem`.pdf, without the timestamps and versions matplotlib would embed:
    the same data gives the same files."""
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=130, metadata={"Software": None})
    fig.savefig(paths[1], metadata={"Creator": None, "Producer": None, "CreationDate": None})
    plt.close(fig)
    return paths
