"""Dataset names used in recipes -> files on disk.

* `coco`: real COCO 2017 where detectron2 expects it, `$DETECTRON2_DATASETS/coco`
  (default `./datasets/coco`), or wherever `--coco PATH` / `$BENCH_COCO` says.
* `shapes`: the embedded COCO stand-in of the mini study (generated on first use).
* `shapes-tiny`: the same generator, tiny, for tests.
* `coco-keypoints`: COCO 2017's person keypoints (`person_keypoints_*2017.json`).
* `people`, `people-tiny`: the embedded person-keypoint stand-in (bench.data.people).
* `voc`: PASCAL VOC in its own layout, `$DETECTRON2_DATASETS/VOC2007` and `.../VOC2012` (or
  under `--voc PATH` / `$BENCH_VOC`): trained on VOC2007 trainval + VOC2012 train, evaluated
  on VOC2012 val, the paper's Sec. 5.2 split; converted once into COCO-format files in the
  data cache (bench.data.voc).
* `shapes-voc`, `shapes-voc-tiny`: the embedded VOC stand-in, the shapes scenes written in
  VOC's layout (bench.data.shapes_voc), read through the same converter.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from bench.data import people, shapes, shapes_voc, synthetic, voc
from bench.paths import cache_root

EMBEDDED = {
    "shapes": synthetic.TargetConfig(),
    "shapes-tiny": synthetic.TargetConfig(train_images=64, val_images=16),
    "people": people.PeopleConfig(),
    "people-tiny": people.PeopleConfig(train_images=48, val_images=12),
    "shapes-voc": shapes_voc.VocShapesConfig(),
    "shapes-voc-tiny": shapes_voc.VocShapesConfig(voc2007_trainval=24, voc2012_train=24,
                                                  voc2012_val=16),
}
# COCO's person keypoints: the same images, another annotation file
COCO_ANNOTATIONS = {"coco": "instances", "coco-keypoints": "person_keypoints"}
# The paper's VOC split (Sec. 5.2): VOC2007 trainval + VOC2012 train, evaluated on VOC2012 val
VOC_SPLITS = voc.VocSplits(train=(("VOC2007", "trainval"), ("VOC2012", "train")),
                           val=(("VOC2012", "val"),))
VOC = {"voc": VOC_SPLITS}
VOC.update({n: voc.VocSplits(VOC_SPLITS.train, VOC_SPLITS.val, tuple(shapes.TARGET_SHAPES))
            for n, c in EMBEDDED.items() if isinstance(c, shapes_voc.VocShapesConfig)})
DATASETS = tuple(COCO_ANNOTATIONS) + ("voc",) + tuple(EMBEDDED)
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


def voc_root() -> Path:
    """The folder holding VOC2007/ and VOC2012/ (detectron2's place for them)."""
    if os.environ.get("BENCH_VOC"):
        return Path(os.environ["BENCH_VOC"]).expanduser().absolute()
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser().absolute()


def voc_metric(name: str):
    """The VOC AP a dataset is scored by ("area" or "11point", bench.voc_eval), or None for
    a dataset COCOeval scores."""
    return VOC[name].metric if name in VOC else None


def _voc_files(name: str, root: Path) -> DatasetFiles:
    """A VOC layout under `root` as COCO-format files (converted on first use, bench.data.voc)
    in the data cache; images load from `root` (file names start with the year folder)."""
    out = voc.ensure_converted(root, VOC[name], cache_root() / "voc-coco" / name)
    return DatasetFiles(name, root, out / "annotations" / "instances_train.json", root,
                        out / "annotations" / "instances_val.json", out / "subsets")


def resolve(name: str, generate: bool = True) -> DatasetFiles:
    if name == "voc":
        root = voc_root()
        folders = sorted({folder for folder, _ in VOC_SPLITS.train + VOC_SPLITS.val})
        missing = [root / f for f in folders if not (root / f).is_dir()]
        if missing:
            where = (f"--voc (BENCH_VOC) points at {root}, which must hold both"
                     if os.environ.get("BENCH_VOC") else
                     "put both under $DETECTRON2_DATASETS or pass --voc PATH to the folder "
                     "holding")
            raise DatasetMissing(f"PASCAL VOC not found: {missing[0]} does not exist; {where} "
                                 f"({' and '.join(folders)}, as VOCdevkit unpacks them), or "
                                 f"run recipes/mini-voc on the embedded VOC stand-in")
        return _voc_files(name, root)
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
        if name in VOC:  # written in VOC's own layout: read as the real VOC is
            return _voc_files(name, root)
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
