"""Per-image COCOeval results of one evaluation: what a bootstrap over val images needs.

COCO's AP is accumulated over images, so an interval that says how much of a difference the
choice of val images could make comes from resampling the images and accumulating again.
That needs, for every detection (up to COCOeval's last maxDets per image, all object
sizes): its image, category, score and, at each IoU threshold, whether it matched a
ground-truth object and whether it is ignored (matched to a crowd); and for every image and
category the number of ground-truth objects that count. `from_cocoeval` takes them from a
COCOeval after `evaluate()` (pycocotools' or faster-coco-eval's: both fill `evalImgs`);
both engines write them next to the eval row (`RunDir.write_per_image`), and
bench.analysis.bootstrap accumulates them again, with weights per image.
"""

from pathlib import Path

import numpy as np

FORMAT = 1
KEYS = ("image_ids", "cat_ids", "iou_thrs", "rec_thrs", "gt_count", "det_image", "det_cat",
        "det_score", "det_matched", "det_ignored")


class PerImageError(ValueError):
    """A per-image results file that is missing or unreadable (names the file and the fix)."""


def from_cocoeval(ev) -> dict:
    """The arrays of a COCOeval whose evaluate() has run, for its "all" object-size range."""
    p = ev.params
    cats = list(p.catIds) if p.useCats else [-1]
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    area = [tuple(r) for r in p.areaRng].index((0 ** 2, 1e5 ** 2))  # COCO's "all"
    gt_count = np.zeros((len(cats), n_img), dtype=np.int32)
    det_image, det_cat, det_score, det_matched, det_ignored = [], [], [], [], []
    for k in range(len(cats)):
        for i in range(n_img):
            e = ev.evalImgs[k * n_area * n_img + area * n_img + i]
            if e is None:
                continue
            gt_count[k, i] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
            n = len(e["dtScores"])
            if n:
                det_image.append(np.full(n, i, dtype=np.int32))
                det_cat.append(np.full(n, k, dtype=np.int32))
                det_score.append(np.asarray(e["dtScores"], dtype=np.float64))
                det_matched.append(np.asarray(e["dtMatches"]).reshape(len(p.iouThrs), n) > 0)
                det_ignored.append(np.asarray(e["dtIgnore"]).reshape(len(p.iouThrs), n) > 0)
    t = len(p.iouThrs)
    return dict(
        image_ids=np.asarray(p.imgIds, dtype=np.int64), cat_ids=np.asarray(cats, dtype=np.int64),
        iou_thrs=np.asarray(p.iouThrs, dtype=np.float64),
        rec_thrs=np.asarray(p.recThrs, dtype=np.float64), gt_count=gt_count,
        det_image=np.concatenate(det_image) if det_image else np.zeros(0, np.int32),
        det_cat=np.concatenate(det_cat) if det_cat else np.zeros(0, np.int32),
        det_score=np.concatenate(det_score) if det_score else np.zeros(0),
        det_matched=np.concatenate(det_matched, 1) if det_matched else np.zeros((t, 0), bool),
        det_ignored=np.concatenate(det_ignored, 1) if det_ignored else np.zeros((t, 0), bool))


def without_detections(coco_gt, image_ids, iou_type) -> dict:
    """The arrays COCOeval would give a model that detects nothing (it cannot score an empty
    result list): the ground truth only, as from_cocoeval reads it (crowds do not count)."""
    from pycocotools.cocoeval import Params
    p = Params(iouType=iou_type)
    images = np.unique(list(image_ids) if image_ids is not None else coco_gt.getImgIds())
    cats = sorted(coco_gt.getCatIds())
    col = {int(i): j for j, i in enumerate(images)}
    row = {c: k for k, c in enumerate(cats)}
    gt_count = np.zeros((len(cats), len(images)), dtype=np.int32)
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(col))):
        # COCOeval ignores crowds only: its _prepare overwrites "ignore" with "iscrowd"
        # (and, for keypoints, a person without a labelled keypoint: COCOeval ignores it)
        if iou_type == "keypoints" and not ann.get("num_keypoints", 0):
            continue
        if not ann.get("iscrowd", 0) and ann["category_id"] in row:
            gt_count[row[ann["category_id"]], col[ann["image_id"]]] += 1
    t = len(p.iouThrs)
    return dict(image_ids=images.astype(np.int64), cat_ids=np.asarray(cats, dtype=np.int64),
                iou_thrs=np.asarray(p.iouThrs), rec_thrs=np.asarray(p.recThrs),
                gt_count=gt_count, det_image=np.zeros(0, np.int32),
                det_cat=np.zeros(0, np.int32), det_score=np.zeros(0),
                det_matched=np.zeros((t, 0), bool), det_ignored=np.zeros((t, 0), bool))


def save(path: Path, per_task: dict) -> None:
    """{"bbox": arrays, "segm": arrays} into one compressed .npz, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"format": np.asarray(FORMAT)}
    for task, arrays in per_task.items():
        flat.update({f"{task}/{k}": v for k, v in arrays.items()})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **flat)
    tmp.replace(path)


def load(path: Path) -> dict:
    """{"bbox": arrays, ...} from `save`; a missing or damaged file is one line."""
    path = Path(path)
    try:
        with np.load(path) as z:
            if int(z["format"]) != FORMAT:
                raise PerImageError(f"{path}: per-image results of format {int(z['format'])}; "
                                    f"this suite reads format {FORMAT}; evaluate the run again")
            out = {}
            for key in z.files:
                if key != "format":
                    task, name = key.split("/", 1)
                    out.setdefault(task, {})[name] = z[key]
    except FileNotFoundError:
        raise PerImageError(f"{path}: no per-image results (a run evaluated before the suite "
                            f"kept them has none)") from None
    except PerImageError:
        raise
    except Exception as e:  # noqa: BLE001 - a torn copy raises BadZipFile, EOFError, zlib.error...
        raise PerImageError(f"{path}: unreadable per-image results ({type(e).__name__}: {e}); "
                            f"delete the file and evaluate the run again") from None
    for task, arrays in out.items():
        missing = [k for k in KEYS if k not in arrays]
        if missing:
            raise PerImageError(f"{path}: {task} lacks {', '.join(missing)}; evaluate the run "
                                f"again")
    return out
