"""The embedded person-keypoint dataset: our stand-in for COCO's person keypoints.

Articulated stick figures (a head, a torso and eight limb segments) with COCO's 17 named
keypoints, its skeleton and its left/right pairs, posed at random (torso tilt, each limb's
angle and bend, facing front or in profile), cut by the image border, occluding each other
and set among the shapes dataset's clutter on its backgrounds. Annotations are COCO's
person_keypoints format: per person the visible mask (RLE), its box and area, and 17
(x, y, v) triples as pixel indices, v = 2 visible, 1 labelled but hidden (behind another
figure, or the far eye of a profile), 0 not labelled (outside the image, or the far ear of a
profile; x = y = 0 then), and `num_keypoints` the labelled ones. pycocotools evaluates it
with COCO's OKS sigmas, exactly as COCO.
"""

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from bench.data import shapes

VERSION = 1

# COCO's person keypoints, in COCO's order, its skeleton (1-based, as in its annotation
# files) and the pairs a horizontal flip swaps (found from the names, as detectron2 does)
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
             "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
             "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
SKELETON = [[16, 14], [14, 12], [17, 15], [15, 13], [12, 13], [6, 12], [7, 13], [6, 7], [6, 8],
            [7, 9], [8, 10], [9, 11], [2, 3], [1, 2], [1, 3], [2, 4], [3, 5], [4, 6], [5, 7]]
CATEGORY = dict(id=1, name="person", supercategory="person", keypoints=list(KEYPOINTS),
                skeleton=SKELETON)


def flip_permutation(names):
    """The keypoint order after a horizontal flip: each left_* takes its right_*'s place."""
    index = {n: i for i, n in enumerate(names)}
    swap = {n: ("right_" + n[5:] if n.startswith("left_") else
                "left_" + n[6:] if n.startswith("right_") else n) for n in names}
    return [index.get(swap[n], i) for i, n in enumerate(names)]


@dataclass(frozen=True)
class PeopleConfig:
    """The embedded person-keypoint set (defaults: the mini keypoint study's)."""
    seed: int = 0
    train_images: int = 2000
    val_images: int = 300
    image_size: int = 128
    max_people: int = 3
    min_height: float = 40.0    # standing height in pixels (a figure is about 0.3 as wide)
    max_height: float = 110.0

    annotation_prefix = "person_keypoints"

    @property
    def name(self):
        return (f"people-v{VERSION}-s{self.seed}-{self.train_images}x{self.val_images}-"
                f"{self.image_size}px")


def _rng(seed, split, index):
    return np.random.default_rng(np.random.SeedSequence([seed, split, index, VERSION, 17]))


def _rot(v, angle):
    c, s = math.cos(angle), math.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def random_figure(rng, size, height):
    """A posed figure: its 17 keypoints (image coordinates, float), which face keypoints its
    facing hides (1) or leaves unlabelled (0), and the parts to draw."""
    h, w = size
    up = -math.pi / 2 + rng.normal(0, 0.25)            # torso direction (image y points down)
    d = np.array([math.cos(up), math.sin(up)])         # from the hips to the neck
    side = np.array([-d[1], d[0]])                     # the figure's left, facing the camera
    # mostly inside the image (the head is 0.48 heights above the hips, the feet at most
    # 0.45 below), sometimes cut by its border, as people in photos
    lo, hi = 0.4 * height, h - 0.35 * height
    hip = np.array([rng.uniform(0.05 * w, 0.95 * w),
                    rng.uniform(lo, hi) if hi > lo else h / 2 + 0.05 * height])
    neck = hip + 0.30 * height * d
    k = np.zeros((17, 2))
    k[5], k[6] = neck + 0.11 * height * side, neck - 0.11 * height * side      # shoulders
    k[11], k[12] = hip + 0.07 * height * side, hip - 0.07 * height * side      # hips
    down = -d
    for shoulder, elbow, wrist, sign in ((5, 7, 9, 1), (6, 8, 10, -1)):
        a = rng.uniform(-0.3, 2.4) * sign              # the arm swings out to its own side
        upper = _rot(down, -a) * 0.16 * height
        k[elbow] = k[shoulder] + upper
        bend = rng.uniform(0, 2.2) * (1 if rng.random() < 0.5 else -1)
        k[wrist] = k[elbow] + _rot(upper / np.linalg.norm(upper), bend) * 0.15 * height
    for hip_i, knee, ankle, sign in ((11, 13, 15, 1), (12, 14, 16, -1)):
        a = rng.uniform(-0.2, 0.9) * sign
        thigh = _rot(down, -a) * 0.23 * height
        k[knee] = k[hip_i] + thigh
        bend = rng.uniform(0, 1.6) * (-sign if rng.random() < 0.5 else sign)
        k[ankle] = k[knee] + _rot(thigh / np.linalg.norm(thigh), bend) * 0.22 * height
    head = neck + 0.11 * height * d
    r = 0.065 * height
    facing = rng.choice(["front", "left", "right"], p=[0.6, 0.2, 0.2])
    face_v = np.full(5, 2)
    if facing == "front":
        k[0] = head - 0.1 * r * d
        k[1], k[2] = head + 0.4 * r * side + 0.3 * r * d, head - 0.4 * r * side + 0.3 * r * d
        k[3], k[4] = head + 0.95 * r * side, head - 0.95 * r * side
    else:  # in profile: the nose points to one side, the far eye is hidden, the far ear unseen
        s = 1 if facing == "left" else -1
        k[0] = head + 1.0 * r * s * side
        near_eye, far_eye = (1, 2) if s == 1 else (2, 1)
        near_ear, far_ear = (3, 4) if s == 1 else (4, 3)
        k[near_eye] = head + 0.6 * r * s * side + 0.3 * r * d
        k[far_eye] = head + 0.45 * r * s * side + 0.3 * r * d
        k[near_ear] = head - 0.1 * r * s * side
        k[far_ear] = head - 0.1 * r * s * side
        face_v[far_eye], face_v[far_ear] = 1, 0
    width = max(2, int(round(0.055 * height)))
    limbs = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]
    torso = [k[5], k[6], k[12], k[11]]
    return dict(keypoints=k, face_v=face_v, head=(head, r), torso=torso,
                limbs=[(k[a], k[b]) for a, b in limbs], width=width)


def figure_mask(fig, size):
    h, w = size
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([tuple(p) for p in fig["torso"]], fill=255)
    for a, b in fig["limbs"]:
        draw.line([tuple(a), tuple(b)], fill=255, width=fig["width"])
        for p in (a, b):  # round joints
            draw.ellipse([p[0] - fig["width"] / 2, p[1] - fig["width"] / 2,
                          p[0] + fig["width"] / 2, p[1] + fig["width"] / 2], fill=255)
    (cx, cy), r = fig["head"]
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return np.asarray(canvas) >= 128


def render_scene(cfg: PeopleConfig, split_code: int, index: int):
    """One image and its people: [(visible mask, 17 x 3 keypoints as pixel indices)]."""
    rng = _rng(cfg.seed, split_code, index)
    size = (cfg.image_size, cfg.image_size)
    img = shapes.background(rng, *size)
    layers = []
    for _ in range(int(rng.integers(1, cfg.max_people + 1))):
        height = float(np.exp(rng.uniform(np.log(cfg.min_height), np.log(cfg.max_height))))
        fig = random_figure(rng, size, height)
        layers.append(dict(fig=fig, mask=figure_mask(fig, size)))
    for _ in range(int(rng.integers(0, 3))):  # unlabelled clutter shapes between the people
        name = list(shapes.SHAPES)[rng.integers(len(shapes.SHAPES))]
        diameter = float(np.exp(rng.uniform(np.log(14), np.log(60))))
        layers.append(dict(fig=None, mask=shapes.shape_mask(name, size, **shapes.random_pose(
            rng, size, diameter))))
    layers = [layers[i] for i in rng.permutation(len(layers))]
    # a person mostly hidden is dropped, as the shapes set drops its objects
    kept = shapes.drop_hidden(layers, size)
    img = shapes.paint(rng, img, kept)
    people = []
    for layer in kept:
        if layer["fig"] is None:
            continue
        people.append((layer["visible"], _labels(layer["fig"], layer["visible"], size)))
    return shapes.finish(rng, img), people


def _labels(fig, visible, size):
    """COCO's (x, y, v) per keypoint, x and y pixel indices: v 0 outside the image (and the
    far ear of a profile), 1 hidden (behind another figure or the far eye), 2 visible."""
    h, w = size
    out = np.zeros((17, 3), dtype=np.int64)
    for i, (x, y) in enumerate(fig["keypoints"]):
        px, py = int(math.floor(x)), int(math.floor(y))
        if not (0 <= px < w and 0 <= py < h):
            continue
        v = int(fig["face_v"][i]) if i < 5 else 2
        if v == 0:
            continue
        if v == 2 and not visible[py, px]:
            v = 1  # on the figure but covered by another one in front of it
        out[i] = (px, py, v)
    return out


def _chunk(args):
    from pycocotools import mask as mask_utils

    cfg, split_code, image_dir, indices = args
    out = []
    for i in indices:
        img, people = render_scene(cfg, split_code, i)
        file_name = f"{i + 1:012d}.jpg"
        Image.fromarray(img).save(os.path.join(image_dir, file_name), quality=92)
        anns = []
        for visible, kps in people:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            anns.append(dict(category_id=1,
                             segmentation=dict(size=[int(v) for v in rle["size"]],
                                               counts=rle["counts"].decode("ascii")),
                             area=int(visible.sum()),
                             bbox=[x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                             iscrowd=0, keypoints=[int(v) for v in kps.ravel()],
                             num_keypoints=int((kps[:, 2] > 0).sum())))
        out.append((i, file_name, anns))
    return out


def write(cfg: PeopleConfig, root, workers: int, parallel, chunks) -> dict:
    """Generate the dataset under `root` (bench.data.synthetic.ensure's writer); returns the
    manifest's {relative path: size or annotation hash}."""
    import json

    from bench.hashing import file_sha256
    files = {}
    for split_code, (split, n) in enumerate([("train", cfg.train_images),
                                             ("val", cfg.val_images)]):
        image_dir = root / split
        image_dir.mkdir(parents=True)
        jobs = [(cfg, split_code, str(image_dir), idx) for idx in chunks(n, max(workers, 1) * 4)]
        images, annotations = [], []
        for i, file_name, anns in sorted(parallel(_chunk, jobs, workers)):
            images.append(dict(id=i + 1, file_name=file_name, height=cfg.image_size,
                               width=cfg.image_size))
            for ann in anns:
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, **ann))
        coco = dict(info=dict(description="bench embedded people dataset (COCO person "
                                          "keypoints stand-in)", version=str(VERSION),
                              config=asdict(cfg)),
                    licenses=[], images=images, annotations=annotations, categories=[CATEGORY])
        ann_file = root / "annotations" / f"person_keypoints_{split}.json"
        ann_file.parent.mkdir(exist_ok=True)
        ann_file.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))
        files[f"annotations/person_keypoints_{split}.json"] = file_sha256(ann_file)
        for img in images:
            files[f"{split}/{img['file_name']}"] = (image_dir / img["file_name"]).stat().st_size
    return files
