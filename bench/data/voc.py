"""PASCAL VOC read from its own layout, converted once into COCO-format files in the cache.

VOC keeps one folder per year (VOC2007/, VOC2012/, as VOCdevkit unpacks them), each with one
XML file per image (Annotations/<id>.xml), the image lists of its splits
(ImageSets/Main/<split>.txt) and the images (JPEGImages/<id>.jpg). The suite's loader,
nested subsets, detectron2 registration and evaluation all read COCO's format, so a VOC
dataset (a list of (year folder, image set) pairs per split) is converted into
`instances_train.json` / `instances_val.json` under the data cache, never into the user's
dataset folder. `file_name` is relative to the folder that holds the year folders
(`VOC2012/JPEGImages/2008_000008.jpg`), so images of both years load from one image root.

The conversion follows detectron2's VOC loader (detectron2/data/datasets/pascal_voc.py):
* VOC's boxes are 1-based, inclusive pixel indices; xmin and ymin lose 1 and xmax, ymax stay,
  so a box (1, 1, W, H) covers the whole W x H image in continuous coordinates:
  COCO bbox [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1].
* `difficult` objects stay in the training set (detectron2 keeps them: its loader's comment
  says that in limited experiments they did not hurt); each annotation keeps its flag in a
  `difficult` field (iscrowd stays 0, which would have the loaders drop it), and VOC's
  metric (bench.voc_eval) ignores those objects.
* an object without <difficult> counts as not difficult (VOC2012 leaves it out for some
  objects outside the detection lists); one without a name, a box or a known class is an
  error.
Image ids are 1, 2, ... in list order (VOC's ids, `2008_000008` or `000005`, are not
numbers COCO can take, and the two years' ids overlap); each image keeps `voc_id` and
`voc_folder`.

A conversion is keyed by a hash of what it reads: the converter's version, the classes,
each image list's content and every listed XML file's size and modification time. An edited
list or annotation makes a new conversion (in its own folder, with its own subsets); an
unchanged dataset is converted once. Every problem is one line naming the file and the fix,
found before any training (bench.preflight resolves each dataset).
"""

import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from bench.data.coco import AnnotationError

CONVERTER_VERSION = 1
# VOC's 20 classes in the devkit's order (category ids 1..20 in this order)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
FIX = "restore it from the VOC tar file (VOCtrainval_*.tar)"


class VocLayoutError(AnnotationError):
    """A VOC folder that is incomplete or not VOC's format (names the file and the fix)."""


@dataclass(frozen=True)
class VocSplits:
    """Which (year folder, image set) lists make each split, and the classes in order."""
    train: Tuple[Tuple[str, str], ...]
    val: Tuple[Tuple[str, str], ...]
    classes: Tuple[str, ...] = VOC_CLASSES

    @property
    def val_year(self) -> int:
        return int(self.val[0][0][-4:])

    @property
    def metric(self) -> str:
        """VOC's AP for this val set: the 11-point AP of VOC2007, the area under the curve
        from VOC2010 on (the year decides, as Detectron and detectron2 decide it)."""
        return "11point" if self.val_year < 2010 else "area"


def image_set_path(root: Path, folder: str, image_set: str) -> Path:
    return Path(root) / folder / "ImageSets" / "Main" / f"{image_set}.txt"


def read_image_set(root: Path, folder: str, image_set: str):
    path = image_set_path(root, folder, image_set)
    try:
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise VocLayoutError(f"{path}: no such image list; {folder} needs ImageSets/Main/"
                             f"{image_set}.txt, {FIX}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VocLayoutError(f"{path}: unreadable image list ({e}); {FIX}") from None


def _number(parent, tag, xml_path, where):
    node = parent.find(tag)
    try:
        return float(node.text)
    except (AttributeError, TypeError, ValueError):
        what = "has no" if node is None or node.text is None else \
            f"has the non-number {node.text.strip()!r} as"
        raise VocLayoutError(f"{xml_path}: {what} <{tag}> ({where}); {FIX}") from None


def parse_annotation(xml_path: Path, classes):
    """(width, height, [(class index, difficult, xmin, ymin, xmax, ymax)]) of one VOC XML
    file, boxes as VOC writes them (1-based, inclusive)."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise VocLayoutError(f"{xml_path}: missing (its image is listed in ImageSets/Main); "
                             f"{FIX}") from None
    except ET.ParseError as e:
        raise VocLayoutError(f"{xml_path}: not a VOC annotation file (XML: {e}); {FIX}") \
            from None
    size = root.find("size")
    if size is None:
        raise VocLayoutError(f"{xml_path}: has no <size>; {FIX}")
    width, height = (_number(size, tag, xml_path, "in <size>") for tag in ("width", "height"))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = obj.findtext("name", "").strip()
        if not name:
            raise VocLayoutError(f"{xml_path}: has no <name> (object {k + 1}); {FIX}")
        if name not in classes:
            raise VocLayoutError(f"{xml_path}: object {k + 1} is a {name!r}, not one of the "
                                 f"dataset's {len(classes)} classes ({', '.join(classes[:3])}, "
                                 f"...); fix the file or the dataset's class list")
        box = obj.find("bndbox")
        if box is None:
            raise VocLayoutError(f"{xml_path}: has no <bndbox> (object {k + 1}); {FIX}")
        xmin, ymin, xmax, ymax = (_number(box, t, xml_path, f"object {k + 1}")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        if not (1 <= xmin <= xmax and 1 <= ymin <= ymax):
            raise VocLayoutError(f"{xml_path}: object {k + 1} has the box ({xmin:g}, {ymin:g}, "
                                 f"{xmax:g}, {ymax:g}), not 1-based pixel indices with xmin <= "
                                 f"xmax and ymin <= ymax; {FIX}")
        difficult = int(_number(obj, "difficult", xml_path, f"object {k + 1}")) \
            if obj.find("difficult") is not None else 0
        objects.append((classes.index(name), difficult, xmin, ymin, xmax, ymax))
    return width, height, objects


def to_coco(root: Path, parts, classes, what: str) -> dict:
    """The COCO-format dict of the images of `parts` ((folder, image set), ...)."""
    images, annotations = [], []
    for folder, image_set in parts:
        listed = image_set_path(root, folder, image_set)
        for voc_id in read_image_set(root, folder, image_set):
            rel = f"{folder}/JPEGImages/{voc_id}.jpg"
            if not (root / rel).is_file():
                raise VocLayoutError(f"{root / rel}: missing (listed in {listed}); {FIX}")
            width, height, objects = parse_annotation(
                root / folder / "Annotations" / f"{voc_id}.xml", classes)
            image_id = len(images) + 1
            images.append(dict(id=image_id, file_name=rel, width=int(width), height=int(height),
                               voc_id=voc_id, voc_folder=folder))
            for cls, difficult, xmin, ymin, xmax, ymax in objects:
                w, h = xmax - xmin + 1, ymax - ymin + 1
                annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                        category_id=cls + 1, bbox=[xmin - 1, ymin - 1, w, h],
                                        area=w * h, iscrowd=0, difficult=difficult))
    return dict(info=dict(description=f"PASCAL VOC ({what}) converted by bench.data.voc",
                          version=str(CONVERTER_VERSION),
                          parts=[list(p) for p in parts]),
                licenses=[], images=images, annotations=annotations,
                categories=[dict(id=k + 1, name=n, supercategory="voc")
                            for k, n in enumerate(classes)])


def conversion_key(root: Path, splits: VocSplits) -> str:
    """A hash of everything the conversion reads but the pixels: the lists' contents and
    each listed annotation's size and modification time (stat only: cheap on every run)."""
    h = hashlib.sha256(json.dumps([CONVERTER_VERSION, list(splits.classes),
                                   [list(p) for p in splits.train],
                                   [list(p) for p in splits.val]]).encode())
    for folder, image_set in splits.train + splits.val:
        for voc_id in read_image_set(root, folder, image_set):
            xml = root / folder / "Annotations" / f"{voc_id}.xml"
            try:
                st = xml.stat()
                h.update(f"{folder}/{voc_id}:{st.st_size}:{st.st_mtime_ns};".encode())
            except FileNotFoundError:
                raise VocLayoutError(f"{xml}: missing (listed in "
                                     f"{image_set_path(root, folder, image_set)}); {FIX}") \
                    from None
    return h.hexdigest()[:16]


def ensure_converted(root: Path, splits: VocSplits, out_dir: Path) -> Path:
    """`out_dir`/<key>/ holding annotations/instances_{train,val}.json of the VOC folders
    under `root`, converting when this key has no complete conversion yet."""
    root = Path(root)
    target = Path(out_dir) / conversion_key(root, splits)
    files = [target / "annotations" / f"instances_{s}.json" for s in ("train", "val")]
    if all(f.is_file() for f in files):
        return target
    # written into a temporary folder and renamed into place: a killed conversion never
    # looks complete, and two processes converting at once both end with the same files
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "annotations").mkdir(parents=True)
    for split, parts in (("train", splits.train), ("val", splits.val)):
        doc = to_coco(root, parts, splits.classes, split)
        (tmp / "annotations" / f"instances_{split}.json").write_text(
            json.dumps(doc, sort_keys=True, separators=(",", ":")))
    try:
        os.replace(tmp, target)
    except OSError:
        if all(f.is_file() for f in files):  # another process finished the same one first
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a conversion someone emptied: set it aside, this one takes its place
            stale = target.with_name(f"{target.name}.stale-{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
    return target
