"""Dataset names used in recipes -> files on disk.

* `coco`: real COCO 2017 where detectron2 expects it, `$DETECTRON2_DATASETS/coco`
  (default `./datasets/coco`), or wherever `--coco PATH` / `$BENCH_COCO` says.
* `shapes`: the embedded COCO stand-in of the mini study (generated on first use).
* `shapes-tiny`: the same generator, tiny, for tests.
* `coco-keypoints`: COCO 2017's person keypoints (`person_keypoints_*2017.json`).
* `people`, `people-tiny`: the embedded person-keypoint stand-in (bench.data.people).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from bench.data import people, synthetic
from bench.paths import cache_root

EMBEDDED = {
    "shapes": synthetic.TargetConfig(),
    "shapes-tiny": synthetic.TargetConfig(train_images=64, val_images=16),
    "people": people.PeopleConfig(),
    "people-tiny": people.PeopleConfig(train_images=48, val_images=12),
}
# COCO's person keypoints: the same images, another annotation file
COCO_ANNOTATIONS = {"coco": "instances", "coco-keypoints": "person_keypoints"}
DATASETS = tuple(COCO_ANNOTATIONS) + tuple(EMBEDDED)
KEYPOINT_DATASETS = ("coco-keypoints",) + tuple(n for n, c in EMBEDDED.items()
                                                if isinstance(c, people.PeopleConfig))


class DatasetMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class DatasetFiles:
    name: str
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path
    subsets_dir: Path


def coco_root() -> Path:
    if os.environ.get("BENCH_COCO"):
        return Path(os.environ["BENCH_COCO"]).expanduser().absolute()
    return (Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser() / "coco").absolute()


def resolve(name: str, generate: bool = True) -> DatasetFiles:
    if name in COCO_ANNOTATIONS:
        prefix = COCO_ANNOTATIONS[name]
        root = coco_root()
        ann = root / "annotations" / f"{prefix}_train2017.json"
        if not ann.is_file():
            raise DatasetMissing(
                f"COCO not found: {ann} does not exist; "
                + (f"--coco (BENCH_COCO) points at {root}, which must hold COCO 2017's "
                   f"annotations/, train2017/ and val2017/" if os.environ.get("BENCH_COCO") else
                   "put COCO 2017 under $DETECTRON2_DATASETS/coco or pass --coco PATH (make "
                   "reproduce-he2019 COCO=PATH)")
                + ", or run `make mini` for the embedded dataset")
        # each annotation file draws its own subsets (person_keypoints' images are fewer)
        files = DatasetFiles(name, root / "train2017", ann, root / "val2017",
                             root / "annotations" / f"{prefix}_val2017.json",
                             root / "bench_subsets" / ("" if prefix == "instances" else prefix))
        for what in (files.train_images, files.val_images, files.val_annotations):
            if not what.exists():
                raise DatasetMissing(f"COCO at {root} is incomplete: {what} does not exist; "
                                     f"COCO 2017 needs train2017/, val2017/ and annotations/")
        return files
    if name in EMBEDDED:
        cfg = EMBEDDED[name]
        root = cache_root() / cfg.name
        if generate:
            root = synthetic.ensure(cfg)
        elif synthetic.check_complete(root, cfg):
            raise DatasetMissing(f"embedded dataset {name!r} is not generated at {root}; "
                                 f"run `bench data`")
        prefix = getattr(cfg, "annotation_prefix", "instances")
        return DatasetFiles(name, root / "train", root / "annotations" / f"{prefix}_train.json",
                            root / "val", root / "annotations" / f"{prefix}_val.json",
                            root / "subsets")
    raise DatasetMissing(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")


def subset_file(files: DatasetFiles, size: int, seed: int = 0) -> Path:
    """The nested-subset id list of `size` images; embedded datasets draw it on first use."""
    from bench.data import subsets
    path = subsets.subset_path(files.subsets_dir, size, seed)
    if not path.is_file():
        if files.name in COCO_ANNOTATIONS:
            out = "" if files.name == "coco" else f" --out {files.subsets_dir}"
            raise DatasetMissing(f"subset file {path} is missing; run `bench subsets --annotations "
                                 f"{files.train_annotations}{out}`")
        subsets.write_subsets(files.train_annotations, [size], files.subsets_dir, seed)
    return path


def train_ids(files: DatasetFiles, data):
    """The image ids a run trains on (`data` is its DataSpec): None for the whole training
    set, else its nested subset, checked against the annotations."""
    if data.train_images is None:
        return None
    from bench.data import subsets
    path = subset_file(files, data.train_images, data.subset_seed)
    return subsets.read_subset(path, files.train_annotations, size=data.train_images,
                               seed=data.subset_seed)
