"""The embedded VOC stand-in: the shapes scenes written in PASCAL VOC's own layout.

The real VOC study trains on VOC2007 trainval + VOC2012 train and evaluates on VOC2012 val,
two year folders read through one converter (bench.data.voc). This export has the same
shape, so the converter, the `difficult` flag and VOC's metric run for real on a CPU:

    VOC2007/Annotations/000001.xml ...      one XML per image, VOC's fields
    VOC2007/ImageSets/Main/{trainval,train,val}.txt
    VOC2007/JPEGImages/000001.jpg ...
    VOC2012/... 2012_000001 ...             train, val (numbered after train) and trainval

The scenes are the shapes dataset's (bench.data.synthetic), with fewer objects per image by
default (at most 3: VOC images hold 2.4 objects on average, COCO's 7.3), and their own
seeds, so none is an image of the COCO-format set. Boxes are VOC's 1-based, inclusive
pixel indices of each object's visible part. An object is `difficult` when less than
half of it is visible (the rest under other objects) or its visible box is under
DIFFICULT_SIDE pixels on its shorter side: VOC's annotators marked the objects that are
hard to recognize without context, and both are what makes a shape hard to tell here.
`truncated` is 1 where the visible box touches the image border.
"""

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

VERSION = 1
# (year folder, image set, split code of the scene seeds, file id pattern); VOC2007 names its
# images by number only, VOC2012 by year and number
PARTS = (("VOC2007", "trainval", 20, "{:06d}"), ("VOC2012", "train", 21, "2012_{:06d}"),
         ("VOC2012", "val", 22, "2012_{:06d}"))
DIFFICULT_VISIBLE = 0.5     # under half of the object visible
DIFFICULT_SIDE = 12         # or a visible box under 12 px on its shorter side: together
                            # about 8% of the objects (measured on 300 val scenes)


@dataclass(frozen=True)
class VocShapesConfig:
    """The embedded VOC stand-in (defaults: the mini VOC study's)."""
    seed: int = 0
    voc2007_trainval: int = 250
    voc2012_train: int = 250
    voc2012_val: int = 300
    image_size: int = 128
    max_objects: int = 3
    min_diameter: float = 14.0
    max_diameter: float = 80.0

    @property
    def name(self):
        return (f"shapes-voc-v{VERSION}-s{self.seed}-{self.voc2007_trainval}+"
                f"{self.voc2012_train}x{self.voc2012_val}-{self.image_size}px")

    def count(self, folder, image_set) -> int:
        return getattr(self, f"{folder.lower()}_{image_set}")


def is_difficult(mask, visible) -> bool:
    ys, xs = np.nonzero(visible)
    side = min(int(xs.max()) - int(xs.min()) + 1, int(ys.max()) - int(ys.min()) + 1)
    return visible.sum() < DIFFICULT_VISIBLE * mask.sum() or side < DIFFICULT_SIDE


def annotation_xml(folder, file_id, size, objects) -> bytes:
    """VOC's XML for one image; `objects`: (name, difficult, truncated, xmin, ymin, xmax,
    ymax), 1-based inclusive pixel indices."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{file_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "bench shapes-voc"
    s = ET.SubElement(root, "size")
    for key, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(s, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, difficult, truncated, *box in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = str(int(truncated))
        ET.SubElement(o, "difficult").text = str(int(difficult))
        b = ET.SubElement(o, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            ET.SubElement(b, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _chunk(args):
    from PIL import Image

    from bench.data import synthetic
    cfg, folder, code, pattern, first, root, indices = args
    scene = synthetic.TargetConfig(seed=cfg.seed, image_size=cfg.image_size,
                                   max_objects=cfg.max_objects, min_diameter=cfg.min_diameter,
                                   max_diameter=cfg.max_diameter)
    out = []
    for i in indices:
        img, layers = synthetic.render_layers(scene, code, i)
        file_id = pattern.format(first + i)
        objects = []
        for layer in layers:
            ys, xs = np.nonzero(layer["visible"])
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
            truncated = x0 == 0 or y0 == 0 or x1 == cfg.image_size - 1 or \
                y1 == cfg.image_size - 1
            objects.append((layer["name"], is_difficult(layer["mask"], layer["visible"]),
                            truncated, x0 + 1, y0 + 1, x1 + 1, y1 + 1))
        jpeg = os.path.join(root, folder, "JPEGImages", f"{file_id}.jpg")
        Image.fromarray(img).save(jpeg, quality=synthetic.JPEG_QUALITY)
        xml = os.path.join(root, folder, "Annotations", f"{file_id}.xml")
        with open(xml, "wb") as f:
            f.write(annotation_xml(folder, file_id, cfg.image_size, objects))
        out.append((folder, file_id, os.path.getsize(jpeg), os.path.getsize(xml)))
    return out


def write(cfg: VocShapesConfig, root, workers: int, parallel, chunks) -> dict:
    """Generate the two year folders under `root` (bench.data.synthetic.ensure's writer);
    returns the manifest's {relative path: size, or hash for the image lists}."""
    from bench.hashing import file_sha256
    files, lists = {}, {}
    for folder in sorted({p[0] for p in PARTS}):
        for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
            (root / folder / sub).mkdir(parents=True)
    numbered = {}  # per year folder, the images numbered so far: its lists share no id
    for folder, image_set, code, pattern in PARTS:
        n = cfg.count(folder, image_set)
        first = numbered.get(folder, 0) + 1
        numbered[folder] = first - 1 + n
        jobs = [(cfg, folder, code, pattern, first, str(root), idx)
                for idx in chunks(n, max(workers, 1) * 4)]
        written = sorted(parallel(_chunk, jobs, workers), key=lambda r: r[1])
        lists[(folder, image_set)] = [file_id for _, file_id, _, _ in written]
        for _, file_id, jpeg_bytes, xml_bytes in written:
            files[f"{folder}/JPEGImages/{file_id}.jpg"] = jpeg_bytes
            files[f"{folder}/Annotations/{file_id}.xml"] = xml_bytes
    # the other lists VOC ships: VOC2007's trainval halved into train and val, VOC2012's
    # trainval the union of its two
    ids07 = lists[("VOC2007", "trainval")]
    lists[("VOC2007", "train")], lists[("VOC2007", "val")] = ids07[0::2], ids07[1::2]
    lists[("VOC2012", "trainval")] = sorted(lists[("VOC2012", "train")]
                                            + lists[("VOC2012", "val")])
    for (folder, image_set), ids in sorted(lists.items()):
        rel = f"{folder}/ImageSets/Main/{image_set}.txt"
        (root / rel).write_text("".join(f"{i}\n" for i in sorted(ids)))
        files[rel] = file_sha256(root / rel)
    return files
