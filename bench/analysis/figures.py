"""The paper's figures from the tidy table: pure functions DataFrame -> matplotlib Figure.

One style for all: scratch solid, pre-trained dashed (readable in greyscale), one marker
per schedule, LR drops marked on each curve.
"""

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

INIT_STYLE = {"scratch": dict(linestyle="-", color="#1f4e9c", label="random init"),
              "imagenet": dict(linestyle="--", color="#c0392b", label="pre-trained (fine-tune)")}
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
METRIC_LABEL = {"bbox/AP": "bbox AP", "segm/AP": "mask AP"}


def _size_label(n):
    return "all images" if n == -1 else f"{int(n)} images"


def _schedule_order(df):
    return sorted(df["schedule"].unique(), key=lambda s: df[df["schedule"] == s]["max_iter"].max())


def ap_vs_iterations(df: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> plt.Figure:
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
                    # seeds are drawn as separate thin lines: spread is shown, never averaged away
                    for _, run in sub[(sub["schedule"] == sched) & (sub["init"] == init)].groupby("run_id"):
                        run = run.sort_values("iteration")
                        ax.plot(run["iteration"], run["value"], linestyle=style["linestyle"],
                                color=style["color"], marker=MARKERS[k % len(MARKERS)],
                                markersize=3.5, markerfacecolor="white", linewidth=1.2)
                        if run["state"].iloc[0] != "done":
                            ax.annotate(run["state"].iloc[0], (run["iteration"].iloc[-1],
                                                               run["value"].iloc[-1]), fontsize=7)
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
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def ap_vs_train_size(final: pd.DataFrame, metrics=("bbox/AP", "segm/AP")) -> plt.Figure:
    """Final AP against training-set size, scratch vs pre-trained, one marker per schedule;
    several seeds show as mean with min-max bars."""
    metrics = [m for m in metrics if m in final.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    schedules = _schedule_order(final)
    for col, metric in enumerate(metrics):
        ax = axes[0][col]
        for k, sched in enumerate(schedules):
            for init, style in INIT_STYLE.items():
                sub = final[(final["schedule"] == sched) & (final["init"] == init)].copy()
                if sub.empty:
                    continue
                # the number of images a run really trained on ("all" included)
                g = sub.groupby("images_used")[metric].agg(["mean", "min", "max"]).reset_index()
                ax.errorbar(g["images_used"], g["mean"], yerr=[g["mean"] - g["min"], g["max"] - g["mean"]],
                            linestyle=style["linestyle"], color=style["color"],
                            marker=MARKERS[k % len(MARKERS)], markersize=4, capsize=2,
                            markerfacecolor="white", linewidth=1.2)
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
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    return fig

