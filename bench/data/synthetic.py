"""The embedded datasets: generated deterministically from a seed into the data cache.

* target ("shapes-coco"): COCO-format instance segmentation, our stand-in for COCO.
  Layout as COCO's: `train/`, `val/` JPEGs and `annotations/instances_{train,val}.json`
  with RLE masks, so the same loader and pycocotools evaluation serve both.
* source ("shapes-cls"): a classification set with more classes than the target, our
  stand-in for ImageNet, in torchvision's ImageFolder layout `train/<class>/*.jpg`.
* the people set (bench.data.people) and the target scenes exported in PASCAL VOC's own
  layout (bench.data.shapes_voc) are written through the same cache machinery.

A dataset directory is complete only when its MANIFEST.json exists and every file it
lists has the recorded size and (for annotations) hash; generation writes into a temp
dir and renames it into place, so a killed generation never looks complete. An
incomplete or corrupt directory is regenerated.
"""

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.data import people, shapes, shapes_voc
from bench.hashing import file_sha256
from bench.interrupt import default_signals_in_child
from bench.paths import cache_root

GENERATOR_VERSION = 3
JPEG_QUALITY = 92


@dataclass(frozen=True)
class TargetConfig:
    """The embedded COCO stand-in. Defaults are the mini study's dataset."""
    seed: int = 0
    train_images: int = 2000
    val_images: int = 300
    image_size: int = 128
    max_objects: int = 6
    min_diameter: float = 14.0
    max_diameter: float = 80.0

    @property
    def name(self):
        return (f"shapes-coco-v{GENERATOR_VERSION}-s{self.seed}-{self.train_images}x"
                f"{self.val_images}-{self.image_size}px")


@dataclass(frozen=True)
class SourceConfig:
    """The embedded ImageNet stand-in: one dominant shape per image, all of SHAPES as classes."""
    seed: int = 0
    train_per_class: int = 300
    val_per_class: int = 40
    image_size: int = 64

    @property
    def name(self):
        return (f"shapes-cls-v{GENERATOR_VERSION}-s{self.seed}-{self.train_per_class}x"
                f"{self.val_per_class}-{self.image_size}px")


def _rng(seed, split, index):
    # One independent stream per image: the output does not depend on worker count or order.
    return np.random.default_rng(np.random.SeedSequence([seed, split, index, GENERATOR_VERSION]))


# ----------------------------------------------------------------------------- target

def render_scene(cfg: TargetConfig, split_code: int, index: int):
    """One target image and its instances: list of (category name, visible mask)."""
    img, labelled = render_layers(cfg, split_code, index)
    return img, [(layer["name"], layer["visible"]) for layer in labelled]


def render_layers(cfg: TargetConfig, split_code: int, index: int):
    """One target image and its labelled objects, bottom to top: dicts with the category
    `name`, the object's whole `mask` and its `visible` part (the VOC export marks the
    mostly covered ones `difficult` by the two)."""
    from pycocotools import mask as mask_utils  # noqa: F401  (imported for workers early)

    rng = _rng(cfg.seed, split_code, index)
    size = (cfg.image_size, cfg.image_size)
    img = shapes.background(rng, *size)

    # Place labelled objects and unlabelled clutter shapes in one z-order.
    n_obj = int(rng.integers(1, cfg.max_objects + 1))
    n_clutter = int(rng.integers(0, 3))
    layers = []
    for k in range(n_obj + n_clutter):
        labelled = k < n_obj
        name = (shapes.TARGET_SHAPES[rng.integers(len(shapes.TARGET_SHAPES))] if labelled
                else shapes.CLUTTER_SHAPES[rng.integers(len(shapes.CLUTTER_SHAPES))])
        diameter = float(np.exp(rng.uniform(np.log(cfg.min_diameter), np.log(cfg.max_diameter))))
        mask = shapes.shape_mask(name, size, **shapes.random_pose(rng, size, diameter))
        layers.append(dict(name=name, labelled=labelled, mask=mask))
    order = rng.permutation(len(layers))
    layers = [layers[i] for i in order]

    # Drop objects that end up mostly hidden (they would be unfair, unlabelled targets)
    visible_layers = shapes.drop_hidden(layers, size)
    img = shapes.paint(rng, img, visible_layers)
    return shapes.finish(rng, img), [layer for layer in visible_layers if layer["labelled"]]


def _target_chunk(args):
    from pycocotools import mask as mask_utils

    cfg, split_code, image_dir, indices = args
    out = []
    for i in indices:
        img, instances = render_scene(cfg, split_code, i)
        file_name = f"{i + 1:012d}.jpg"
        Image.fromarray(img).save(os.path.join(image_dir, file_name), quality=JPEG_QUALITY)
        anns = []
        for name, visible in instances:
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            anns.append(dict(
                category_id=shapes.TARGET_SHAPES.index(name) + 1,
                segmentation=dict(size=[int(v) for v in rle["size"]],
                                  counts=rle["counts"].decode("ascii")),
                area=int(visible.sum()),
                bbox=[x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                iscrowd=0))
        out.append((i, file_name, anns))
    return out


def _parallel(fn, jobs, workers):
    if workers <= 1:
        return [r for job in jobs for r in fn(job)]
    # fork, not spawn: spawn re-imports the caller's __main__, which in a script without a
    # main guard regenerates the dataset in every child, recursively. The workers touch only
    # numpy, PIL and pycocotools, never torch, so forking a torch-holding parent is safe.
    # The workers take the default signal handlers: the CLI's SIGTERM handler raises
    # KeyboardInterrupt, and Pool.terminate() (at the end of every map) sends SIGTERM.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=default_signals_in_child) as pool:
        return [r for part in pool.map(fn, jobs) for r in part]


def _chunks(n, parts):
    return [list(range(n))[k::parts] for k in range(parts) if k < n]


def _write_target(cfg: TargetConfig, root: Path, workers: int):
    categories = [dict(id=k + 1, name=n, supercategory="shape")
                  for k, n in enumerate(shapes.TARGET_SHAPES)]
    files = {}
    for split_code, (split, n) in enumerate([("train", cfg.train_images), ("val", cfg.val_images)]):
        image_dir = root / split
        image_dir.mkdir(parents=True)
        jobs = [(cfg, split_code, str(image_dir), idx) for idx in _chunks(n, max(workers, 1) * 4)]
        results = sorted(_parallel(_target_chunk, jobs, workers))
        images, annotations = [], []
        for i, file_name, anns in results:
            images.append(dict(id=i + 1, file_name=file_name, height=cfg.image_size,
                               width=cfg.image_size))
            for ann in anns:
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, **ann))
        coco = dict(info=dict(description="bench embedded shapes dataset (COCO stand-in)",
                              version=str(GENERATOR_VERSION), config=asdict(cfg)),
                    licenses=[], images=images, annotations=annotations, categories=categories)
        ann_file = root / "annotations" / f"instances_{split}.json"
        ann_file.parent.mkdir(exist_ok=True)
        ann_file.write_text(json.dumps(coco, sort_keys=True, separators=(",", ":")))
        files[f"annotations/instances_{split}.json"] = file_sha256(ann_file)
        for img in images:
            files[f"{split}/{img['file_name']}"] = (image_dir / img["file_name"]).stat().st_size
    return files


# ----------------------------------------------------------------------------- source

def render_source_image(cfg: SourceConfig, split_code: int, index: int, class_index: int):
    rng = _rng(cfg.seed, 100 + split_code, index)
    size = (cfg.image_size, cfg.image_size)
    img = shapes.background(rng, *size)
    # A small clutter shape behind the main object now and then, as in real photos.
    if rng.random() < 0.5:
        name = list(shapes.SHAPES)[rng.integers(len(shapes.SHAPES))]
        d = rng.uniform(0.15, 0.3) * cfg.image_size
        mask = shapes.shape_mask(name, size, **shapes.random_pose(rng, size, d))
        img = np.where(mask[..., None], shapes.object_texture(rng, img, mask), img)
    name = list(shapes.SHAPES)[class_index]
    d = rng.uniform(0.4, 0.9) * cfg.image_size
    c = cfg.image_size / 2
    pose = shapes.random_pose(rng, size, d)
    pose["center"] = (c + rng.uniform(-0.15, 0.15) * c * 2, c + rng.uniform(-0.15, 0.15) * c * 2)
    mask = shapes.shape_mask(name, size, **pose)
    img = np.where(mask[..., None], shapes.object_texture(rng, img, mask), img)
    return shapes.finish(rng, img)


def source_class_names():
    return [f"{k:02d}_{n}" for k, n in enumerate(shapes.SHAPES)]


def _source_chunk(args):
    cfg, split_code, split_dir, items = args
    out = []
    classes = source_class_names()
    for index, class_index in items:
        img = render_source_image(cfg, split_code, index, class_index)
        rel = f"{classes[class_index]}/{index:06d}.jpg"
        path = os.path.join(split_dir, rel)
        Image.fromarray(img).save(path, quality=JPEG_QUALITY)
        out.append((rel, os.path.getsize(path)))
    return out


def _write_source(cfg: SourceConfig, root: Path, workers: int):
    files = {}
    classes = source_class_names()
    for split_code, (split, per_class) in enumerate([("train", cfg.train_per_class),
                                                      ("val", cfg.val_per_class)]):
        split_dir = root / split
        for c in classes:
            (split_dir / c).mkdir(parents=True)
        items = [(k * len(classes) + c, c) for k in range(per_class) for c in range(len(classes))]
        jobs = [(cfg, split_code, str(split_dir), items[p::max(workers, 1) * 4])
                for p in range(max(workers, 1) * 4)]
        for rel, nbytes in _parallel(_source_chunk, jobs, workers):
            files[f"{split}/{rel}"] = nbytes
    return files


# ----------------------------------------------------------------------------- cache

def check_complete(root: Path, cfg) -> str:
    """'' if `root` holds exactly the dataset `cfg` describes, else why not (one line)."""
    manifest = root / "MANIFEST.json"
    if not manifest.is_file():
        return f"{manifest} is missing (generation never finished)"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return f"{manifest} is unreadable ({e})"
    if meta.get("config") != asdict(cfg) or meta.get("generator_version") != GENERATOR_VERSION:
        return f"{manifest} describes another dataset configuration"
    for rel, expected in meta["files"].items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing"
        if isinstance(expected, str):  # annotation files: content hash
            if file_sha256(path) != expected:
                return f"{path} does not match its recorded hash"
        elif path.stat().st_size != expected:
            return f"{path} has {path.stat().st_size} bytes, expected {expected}"
    return ""


def ensure(cfg, root: Path = None, workers: int = None, log=print) -> Path:
    """Return the directory of dataset `cfg`, generating (or regenerating) it if needed."""
    root = Path(root) if root else cache_root() / cfg.name
    problem = check_complete(root, cfg)
    if not problem:
        return root
    if root.exists():
        log(f"regenerating {root}: {problem}")
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    tmp = root.with_name(root.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if isinstance(cfg, people.PeopleConfig):
        files = people.write(cfg, tmp, workers, _parallel, _chunks)
    elif isinstance(cfg, shapes_voc.VocShapesConfig):
        files = shapes_voc.write(cfg, tmp, workers, _parallel, _chunks)
    else:
        writer = _write_target if isinstance(cfg, TargetConfig) else _write_source
        files = writer(cfg, tmp, workers)
    meta = dict(generator_version=GENERATOR_VERSION, config=asdict(cfg), files=files)
    (tmp / "MANIFEST.json").write_text(json.dumps(meta, sort_keys=True, indent=1))
    if not check_complete(root, cfg):  # another process finished the same dataset meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root
