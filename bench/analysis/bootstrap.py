"""Intervals over val images: COCO's AP accumulated again from per-image results
(bench.per_image) with each image counted as often as a bootstrap sample draws it.

pycocotools accumulates each image once; a resample counts some images twice and others not
at all, which it cannot do without copying images. So `average_precision` is COCOeval's
accumulate for the "all" size range and its last maxDets, written once more with a weight
per image (tests/test_bootstrap.py: equal to pycocotools' AP on the full set, and on a
resample to pycocotools' AP on the same resample built from copied images). A weight of w
counts an image's detections and ground truth w times: its detections' run of w identical
copies gives the precision / recall points COCOeval would give them (the interpolated
precision rises along a run of true positives, and false positives move no recall), so
adding w at once is the same. One exception: where two detections of one image and category
share a score, one a true and one a false positive, pycocotools interleaves their copies
(TP, FP, TP, FP) where this adds each run at once, which can move a precision point; the
scores of a trained model are continuous, so such ties are rare and their effect tiny.

A pair's difference (scratch - pre-trained) is resampled with the same images for both
runs, which is what makes its interval narrower than the two runs' own.
"""

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd

from bench import per_image, voc_eval
from bench.rundir import RunDir


class Accumulator:
    """One task's per-image results, sorted once, for AP under any image weights."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        self.image_ids = arrays["image_ids"]
        # COCO's 101-point AP, or VOC's ("voc-area", "voc-11point": bench.voc_eval), which
        # the VOC task's results name
        self.interpolation = str(arrays["interpolation"]) if "interpolation" in arrays \
            else "coco-101"
        self.rec_thrs = arrays["rec_thrs"]
        self.gt_count = arrays["gt_count"].astype(np.float64)           # (K, I)
        self.per_cat = []
        for k in range(len(arrays["cat_ids"])):
            sel = np.where(arrays["det_cat"] == k)[0]  # image order, as COCOeval concatenates
            order = sel[np.argsort(-arrays["det_score"][sel], kind="mergesort")]
            matched = arrays["det_matched"][:, order]
            ignored = arrays["det_ignored"][:, order]
            self.per_cat.append((arrays["det_image"][order],
                                 (matched & ~ignored).astype(np.float64),
                                 (~matched & ~ignored).astype(np.float64)))

    def average_precision(self, weights: Optional[np.ndarray] = None) -> float:
        """COCO's AP (stats[0], in percent) with `weights[i]` copies of image i; for VOC's
        results, VOC's mAP at their IoU threshold (0.5: `voc/AP50`)."""
        n_img = len(self.image_ids)
        w = np.ones(n_img) if weights is None else np.asarray(weights, dtype=np.float64)
        total, count = 0.0, 0
        for k, (image, tp, fp) in enumerate(self.per_cat):
            gt = float(self.gt_count[k] @ w)
            if gt == 0:
                continue  # COCOeval's -1: no ground truth of this category, not averaged
            count += tp.shape[0]
            if image.size == 0:
                continue  # ground truth but no detection: precision 0 everywhere
            wd = w[image]
            keep = wd > 0
            tp_sum = np.cumsum(tp[:, keep] * wd[keep], axis=1)
            fp_sum = np.cumsum(fp[:, keep] * wd[keep], axis=1)
            if tp_sum.shape[1] == 0:
                continue
            if self.interpolation.startswith("voc-"):
                for t in range(tp.shape[0]):
                    recall, precision = voc_eval.curve(tp[t, keep] * wd[keep],
                                                       fp[t, keep] * wd[keep], gt)
                    total += voc_eval.average_precision(recall, precision,
                                                        self.interpolation[4:])
                continue
            recall = tp_sum / gt
            precision = tp_sum / (tp_sum + fp_sum + np.spacing(1))
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            for t in range(tp.shape[0]):
                at = np.searchsorted(recall[t], self.rec_thrs, side="left")
                reached = at < recall.shape[1]
                total += envelope[t, at[reached]].sum() / len(self.rec_thrs)
        return 100.0 * total / count if count else float("nan")


def resample_weights(n_images: int, n_samples: int, seed: int = 0) -> np.ndarray:
    """(n_samples, n_images) counts: each row draws n_images images with replacement. A
    fixed seed gives every run of a val set the same resamples, so pairs line up."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_samples)


def _aligned(accumulators: Sequence[Accumulator]) -> None:
    first = accumulators[0].image_ids
    for acc in accumulators[1:]:
        if not np.array_equal(acc.image_ids, first):
            raise ValueError("per-image results over different val images cannot be resampled "
                             "together; evaluate both runs on the same val set")


def interval(values: np.ndarray, level: float = 0.95):
    """The percentile interval of bootstrap replicates."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def difference(a: Accumulator, b: Accumulator, n_samples: int = 1000, seed: int = 0,
               level: float = 0.95) -> Dict[str, float]:
    """AP(a) - AP(b) on the full val set, and its bootstrap interval over val images."""
    _aligned([a, b])
    weights = resample_weights(len(a.image_ids), n_samples, seed)
    reps = np.array([a.average_precision(w) - b.average_precision(w) for w in weights])
    lo, hi = interval(reps, level)
    return {"diff": a.average_precision() - b.average_precision(), "lo": lo, "hi": hi}


def replicates(accumulators: List[Accumulator], n_samples: int = 1000,
               seed: int = 0) -> np.ndarray:
    """(n_samples, runs) APs of each run on the same resamples."""
    _aligned(accumulators)
    weights = resample_weights(len(accumulators[0].image_ids), n_samples, seed)
    return np.array([[acc.average_precision(w) for acc in accumulators] for w in weights])


# -- intervals of a study's pairs ----------------------------------------------------------

TASKS = {"bbox/AP": "bbox", "segm/AP": "segm", "keypoints/AP": "keypoints", "voc/AP50": "voc"}
PAIR_KEYS = ["engine", "arch", "backbone", "norm", "schedule", "max_iter", "train_images"]


def _t_quantile(df: int) -> float:
    """Student's t 97.5% quantile (scipy is not a dependency): exact table to 30 degrees of
    freedom, then the normal's 1.96 plus the usual 2.4 / df correction."""
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
             2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
             2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
    return table[df - 1] if df <= len(table) else 1.96 + 2.4 / df


class Runs:
    """Each run's final per-image results, loaded once (run id -> run dir)."""

    def __init__(self, run_dirs: Dict[str, Path]):
        self.run_dirs = run_dirs
        self._cache = {}

    def accumulator(self, run_id: str, iteration: int, task: str) -> Accumulator:
        """A missing or unreadable file is a PerImageError that names the run and how to
        get its results (the file itself may be the committed copy, which no rerun writes)."""
        rd = RunDir(self.run_dirs[run_id])
        key = (run_id, iteration)
        if key not in self._cache:
            try:
                self._cache[key] = per_image.load(rd.per_image_file(int(iteration)))
            except per_image.PerImageError as e:
                raise per_image.PerImageError(f"run {run_id}: {e}; {self._redo(rd, run_id)}") \
                    from None
        arrays = self._cache[key]
        if task not in arrays:
            raise per_image.PerImageError(
                f"run {run_id}: no {task} per-image results at iteration {int(iteration)} "
                f"(evaluated with a backend that keeps none, faster-coco-eval); set eval.backend: "
                f"pycocotools in its recipe and {self._redo(rd, run_id)}")
        return Accumulator(arrays[task])

    @staticmethod
    def _redo(rd: RunDir, run_id: str) -> str:
        try:
            study = rd.read_spec_doc()["spec"]["study"]
        except Exception:  # noqa: BLE001 - only a message is at stake; a damaged spec.yaml too
            study = "<study>"
        return (f"to get them, delete runs/{study}/{run_id} under the runs root, rerun `bench run` "
                f"on its recipe, then `bench figures --collect --study {study}`")


def _complete(r) -> bool:
    """A pair whose two runs both finished at the same iteration: the only kind whose
    difference, and its interval, means what the tables say it means."""
    return (isinstance(r["run_id scratch"], str) and isinstance(r["run_id imagenet"], str)
            and r["state scratch"] == "done" and r["state imagenet"] == "done"
            and r["iteration scratch"] == r["iteration imagenet"])


def pair_intervals(pairs: pd.DataFrame, runs: Runs, n_samples: int = 1000, seed: int = 0,
                   log=print) -> pd.DataFrame:
    """`pairs` (table.paired, with run ids and final iterations) with, per metric, the 95%
    bootstrap interval over val images of scratch - pre-trained: columns
    "<metric> scratch-imagenet lo" and "... hi". An unfinished or unmatched pair gets NaN,
    as does one whose runs kept no per-image results (and one line names the first run)."""
    out = pairs.copy()
    missing = []
    for metric, task in TASKS.items():
        if f"{metric} scratch-imagenet" not in out.columns:
            continue
        lo, hi = [], []
        for _, r in out.iterrows():
            if not _complete(r) or math.isnan(r[f"{metric} scratch-imagenet"]):
                lo.append(float("nan"))
                hi.append(float("nan"))
                continue
            try:
                a = runs.accumulator(r["run_id scratch"], r["iteration scratch"], task)
                b = runs.accumulator(r["run_id imagenet"], r["iteration imagenet"], task)
                d = difference(a, b, n_samples, seed)
            except (per_image.PerImageError, ValueError) as e:
                missing.append(str(e))
                d = {"lo": float("nan"), "hi": float("nan")}
            lo.append(d["lo"])
            hi.append(d["hi"])
        out[f"{metric} scratch-imagenet lo"] = lo
        out[f"{metric} scratch-imagenet hi"] = hi
    if missing:  # one line, not one per pair (a study evaluated before they were kept)
        log(f"{len(missing)} pair difference(s) without an interval over val images; the "
            f"first: {missing[0]}")
    return out


def gaps_over_seeds(pairs: pd.DataFrame, runs: Optional[Runs] = None, n_samples: int = 1000,
                    seed: int = 0, log=print) -> pd.DataFrame:
    """One row per pair of recipes (its seeds pooled): the mean scratch - pre-trained gap
    per metric, with a 95% interval over seeds (Student's t, where there are 2 or more) and
    one over val images (the same resamples for every run, the seeds' gaps averaged in each),
    where the runs kept their per-image results. Only complete pairs (both runs done, at
    the same iteration) are pooled; "incomplete" counts the rest, which the row leaves out."""
    rows = []
    keys = [k for k in PAIR_KEYS if k in pairs.columns]
    for group, every in pairs.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, group if isinstance(group, tuple) else (group,)))
        done = every[every.apply(_complete, axis=1)] if len(every) else every
        row["incomplete"] = int(len(every) - len(done))
        for metric, task in TASKS.items():
            col = f"{metric} scratch-imagenet"
            if col not in every.columns:
                continue
            sub = done[done[col].notna()]
            row["seeds"] = max(row.get("seeds", 0), int(sub["seed"].nunique()))
            gaps = sub[col].to_numpy(dtype=float)
            n = len(gaps)
            mean = float(gaps.mean()) if n else float("nan")
            row[f"{metric} gap"] = mean
            half = (_t_quantile(n - 1) * gaps.std(ddof=1) / math.sqrt(n)) if n >= 2 else math.nan
            row[f"{metric} gap lo (seeds)"] = mean - half
            row[f"{metric} gap hi (seeds)"] = mean + half
            lo = hi = float("nan")
            if runs is not None and n:
                try:
                    accs = []
                    for _, r in sub.iterrows():
                        accs += [runs.accumulator(r["run_id scratch"], r["iteration scratch"],
                                                  task),
                                 runs.accumulator(r["run_id imagenet"], r["iteration imagenet"],
                                                  task)]
                    reps = replicates(accs, n_samples, seed)
                    lo, hi = interval((reps[:, 0::2] - reps[:, 1::2]).mean(axis=1))
                except (per_image.PerImageError, ValueError):
                    pass  # pair_intervals has said which run lacks them
            row[f"{metric} gap lo (images)"] = lo
            row[f"{metric} gap hi (images)"] = hi
        rows.append(row)
    return pd.DataFrame(rows)


def run_intervals(final: pd.DataFrame, runs: Runs, n_samples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """`final` (one row per run) with each run's own 95% interval over val images per
    metric ("<metric> lo (images)", "... hi (images)"; NaN where it kept no results)."""
    out = final.copy()
    for metric, task in TASKS.items():
        if metric not in out.columns:
            continue
        lo, hi = [], []
        for _, r in out.iterrows():
            try:
                reps = replicates([runs.accumulator(r["run_id"], r["iteration"], task)],
                                  n_samples, seed)[:, 0]
                a, b = interval(reps)
            except (per_image.PerImageError, ValueError):
                a = b = float("nan")
            lo.append(a)
            hi.append(b)
        out[f"{metric} lo (images)"] = lo
        out[f"{metric} hi (images)"] = hi
    return out
