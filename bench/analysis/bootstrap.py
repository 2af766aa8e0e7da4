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
adding w at once is the same.

A pair's difference (scratch - pre-trained) is resampled with the same images for both
runs, which is what makes its interval narrower than the two runs' own.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np


class Accumulator:
    """One task's per-image results, sorted once, for AP under any image weights."""

    def __init__(self, arrays: Dict[str, np.ndarray]):
        self.image_ids = arrays["image_ids"]
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
        """COCO's AP (stats[0], in percent) with `weights[i]` copies of image i."""
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
