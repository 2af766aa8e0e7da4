"""Our datasets in detectron2's catalog: COCO or an embedded dataset, the training set cut
to the run's nested subset (the same image ids the torchvision engine trains on)."""

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from bench.data import registry


def register(data) -> tuple:
    """(train name, val name) for DataSpec `data`, registered in detectron2's catalogs."""
    files = registry.resolve(data.dataset)
    ids = registry.train_ids(files, data)
    size = "all" if ids is None else f"{len(ids)}-seed{data.subset_seed}"
    train, val = f"bench_{files.name}_train_{size}", f"bench_{files.name}_val"
    names = _keypoint_names(files.val_annotations) \
        if data.dataset in registry.KEYPOINT_DATASETS else None
    _register(train, files.train_annotations, files.train_images, ids, names)
    _register(val, files.val_annotations, files.val_images, None, names)
    return train, val


def _register(name, json_file, image_root, ids, keypoint_names=None):
    # A process may train several runs (a torchrun group, tests) from different cache
    # roots: the newest registration of a name wins, never a stale one.
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    keep = None if ids is None else set(ids)

    def load():
        dicts = load_coco_json(str(json_file), str(image_root), name)
        return dicts if keep is None else [d for d in dicts if d["image_id"] in keep]

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name)
    meta.set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco")
    names = keypoint_names
    if names:  # what detectron2's flips and keypoint evaluation read
        meta.set(keypoint_names=names, keypoint_flip_map=[
            (n, "right_" + n[5:]) for n in names if n.startswith("left_")
            and "right_" + n[5:] in names])


def _keypoint_names(json_file):
    """The keypoint names of a person_keypoints file (its val file: the smaller one)."""
    import json
    cats = json.loads(open(json_file).read()).get("categories", [])
    return next((list(c["keypoints"]) for c in cats if c.get("keypoints")), None)
