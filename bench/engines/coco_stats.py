"""COCOeval's stats per task as every engine writes them into its eval rows (`bbox/AP`,
..., `segm/ARl`, `keypoints/AP` .. `keypoints/ARl`), and the stats of a model that detects
nothing."""

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# COCOeval's 10 keypoint stats (OKS; at most 20 detections per image, no "small" range)
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def stat_names(iou_type: str):
    return KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES


# COCOeval's object size ranges (area in pixels), as its params.areaRng
_SIZE_RANGES = {"": (0, 1e10), "s": (0, 32 ** 2), "m": (32 ** 2, 96 ** 2), "l": (96 ** 2, 1e10)}


def no_detection_stats(coco_gt, image_ids=None, iou_type: str = "bbox") -> dict:
    """The 12 stats COCOeval would give no detection, which it cannot score (loadRes fails
    on an empty list): 0, or NaN for a size range without ground truth, as it reports with
    detections. Keeps a model that detects nothing on the same footing as one that does."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(image_ids) if image_ids is not None
                                              else [], iscrowd=False))
    if iou_type == "keypoints":  # COCOeval ignores people without a labelled keypoint
        anns = [a for a in anns if a.get("num_keypoints", 0) > 0]
    areas = [a["area"] for a in anns]
    out = {}
    for name in stat_names(iou_type):
        size = name[2:] if name[2:] in ("s", "m", "l") else ""
        lo, hi = _SIZE_RANGES[size]
        out[name] = 0.0 if any(lo <= a <= hi for a in areas) else float("nan")
    return out
