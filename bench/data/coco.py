"""COCO-format detection data for training and evaluation (real COCO and the embedded set).

The same loader reads `instances_*.json` with pycocotools for both, so the mini study goes
through exactly the code the COCO study uses.
"""

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO


class AnnotationError(ValueError):
    """An annotation file that is not COCO's format (named, with what to do)."""


def load_coco(ann_file):
    import contextlib
    import io
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            return COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, AssertionError) as e:
        # a truncated download, or not COCO's layout; json's error says where
        raise AnnotationError(f"{ann_file}: not a COCO annotation file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); download or "
                         f"generate it again") from None


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets in torchvision's detection format (boxes xyxy, labels, masks).

    Training drops crowd annotations, degenerate boxes and images left without any
    annotation, as detectron2 does (FILTER_EMPTY_ANNOTATIONS).
    """

    def __init__(self, image_dir, ann_file, image_ids=None, train=True, masks=True, coco=None,
                 polygons=False, keypoints=0):
        self.image_dir = str(image_dir)
        self.coco = coco or load_coco(ann_file)
        self.train = train
        self.masks = masks
        # `keypoints` K > 0: target["keypoints"] (N, K, 3), checked against the file here
        self.keypoints = keypoints
        if keypoints:
            self.flip_order = check_keypoints(self.coco, ann_file, keypoints)
        # also each instance's polygons (target["polygons"]: per instance a list of flat
        # x, y arrays, or None for an RLE mask), for mask targets rasterized per RoI
        self.polygons = polygons and masks
        self.cat_ids = sorted(self.coco.getCatIds())
        self.label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}  # 0 is background
        ids = sorted(self.coco.imgs) if image_ids is None else list(image_ids)
        if train:
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
        if train and keypoints:  # detectron2's MIN_KEYPOINTS_PER_IMAGE 1: a labelled keypoint
            ids = [i for i in ids if any(self._usable(a) and a.get("num_keypoints", 0) > 0
                                         for a in self.coco.imgToAnns.get(i, []))]
        self.ids = ids

    @staticmethod
    def _usable(ann):
        return not ann.get("iscrowd", 0) and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1

    def __len__(self):
        return len(self.ids)

    def landscape(self):
        """Per image: wider than high (the two groups of aspect-ratio grouping)."""
        return [self.coco.imgs[i]["width"] > self.coco.imgs[i]["height"] for i in self.ids]

    def load_image(self, image_id):
        info = self.coco.imgs[image_id]
        path = f"{self.image_dir}/{info['file_name']}"
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:  # PIL's "Truncated File Read" names no file
            raise OSError(f"image {path} is unreadable ({e}); restore it, or regenerate the "
                          f"dataset") from None
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # uint8 CHW

    def get(self, index, hflip=False):
        image_id = self.ids[index]
        img = self.load_image(image_id)
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = dict(image_id=image_id, boxes=boxes,
                      labels=torch.tensor([self.label_of[a["category_id"]] for a in anns],
                                          dtype=torch.int64))
        if self.masks:
            h, w = img.shape[1:]
            masks = [self._mask(a, h, w) for a in anns]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, h, w), dtype=torch.uint8))
        if self.polygons:
            target["polygons"] = [polygons_of(a) for a in anns]
        if self.keypoints:
            kps = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32)
            kps = kps.reshape(-1, self.keypoints, 3)
            # COCO's keypoints are pixel indices; +0.5 puts them at the pixel's centre in
            # continuous coordinates, as detectron2 loads them (predictions lose it again)
            labelled = kps[..., 2:] > 0
            kps[..., :2] = torch.where(labelled, kps[..., :2] + 0.5, kps[..., :2])
            target["keypoints"] = kps
        if hflip:
            w = img.shape[2]
            img = img.flip(-1)
            target["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0],
                                           boxes[:, 3]], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
            if self.keypoints:  # x -> w - x, and each left keypoint takes its right's place
                kps = target["keypoints"].clone()
                kps[..., 0] = torch.where(kps[..., 2] > 0, w - kps[..., 0], kps[..., 0])
                target["keypoints"] = kps[:, self.flip_order]
            if self.polygons:  # x -> w - x, as the boxes and the pixels (x + 0.5 -> w - x - 0.5)
                target["polygons"] = [None if polys is None else
                                      [np.stack([w - p[0::2], p[1::2]], 1).ravel() for p in polys]
                                      for polys in target["polygons"]]
        return img, target

    def __getitem__(self, index):
        return self.get(index)

    def _mask(self, ann, h, w):
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = seg
        return mask_utils.decode(rle)


def check_keypoints(coco, ann_file, count: int):
    """The keypoint order after a flip, for a file whose one category has `count` named
    keypoints and whose annotations each have 3 x `count` numbers; else one line naming the
    file and the fix."""
    from bench.data.people import flip_permutation
    cats = coco.loadCats(coco.getCatIds())
    named = [c for c in cats if c.get("keypoints")]
    if not named:
        raise AnnotationError(f"{ann_file}: no category has `keypoints` (an instances file, not "
                              f"a person_keypoints one); use data.dataset coco-keypoints or "
                              f"people, or model.arch mask_rcnn / faster_rcnn")
    if len(cats) != 1 or len(named[0]["keypoints"]) != count:
        raise AnnotationError(f"{ann_file}: {len(cats)} categories, keypoints "
                              f"{[len(c.get('keypoints', [])) for c in cats]}; a keypoint run "
                              f"needs one category with model.num_keypoints={count} keypoints")
    for ann in coco.anns.values():
        if len(ann.get("keypoints", [])) != 3 * count:
            raise AnnotationError(f"{ann_file}: annotation {ann.get('id')} has "
                                  f"{len(ann.get('keypoints', []))} keypoint numbers, not "
                                  f"3 x {count}; regenerate or fix the file, or set "
                                  f"model.num_keypoints")
        # COCOeval ignores a person by this field, and training skips images by it
        labelled = sum(1 for v in ann["keypoints"][2::3] if v > 0)
        if ann.get("num_keypoints") != labelled:
            raise AnnotationError(f"{ann_file}: annotation {ann.get('id')} has num_keypoints "
                                  f"{ann.get('num_keypoints')!r} but {labelled} labelled "
                                  f"keypoints (v > 0); set num_keypoints to that count, as "
                                  f"COCO's files do")
    return flip_permutation(named[0]["keypoints"])


def polygons_of(ann):
    """An annotation's polygons as float64 arrays (x0, y0, x1, y1, ...), or None when its mask
    is RLE. Polygons of fewer than 3 points (pycocotools would read a 4-number one as a box)
    or with an odd count of numbers are dropped; an annotation left with none is None too,
    so its mask target comes from its bitmask."""
    seg = ann.get("segmentation")
    if not isinstance(seg, list):
        return None
    polys = [np.asarray(p, dtype=np.float64) for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    return polys or None
