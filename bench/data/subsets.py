"""Nested, seeded training subsets stored as image-id lists (1k ⊂ 3.5k ⊂ 10k ⊂ 35k ⊂ all).

One seeded permutation of the sorted image ids is drawn once; a subset of size n is its
first n ids, so every smaller subset lies inside every larger one, and no subset is ever
re-drawn per run. Each file records the hash of the annotation file it was drawn from and
of its own id list; a run refuses to start when either does not match.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from bench.data.coco import load_coco
from bench.hashing import file_sha256
from bench.rundir import atomic_write_text


def ids_sha256(ids) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def eligible_ids(ann_file):
    """Images a detector can train on: with at least one non-crowd annotation."""
    coco = load_coco(ann_file)
    return sorted(i for i in coco.imgs
                  if any(not a.get("iscrowd", 0) for a in coco.imgToAnns.get(i, [])))


def nested_subsets(ids, sizes, seed=0):
    """{size: ids}: prefixes of one seeded permutation, so smaller ⊂ larger."""
    ids = sorted(ids)
    for n in sizes:
        if n > len(ids):
            raise ValueError(f"subset of {n} images asked, but only {len(ids)} are eligible")
    order = np.random.default_rng(np.random.SeedSequence([seed, len(ids)])).permutation(len(ids))
    return {n: sorted(int(ids[k]) for k in order[:n]) for n in sizes}


def subset_path(directory, size, seed=0) -> Path:
    return Path(directory) / f"train_{size}_seed{seed}.json"


def write_subsets(ann_file, sizes, directory, seed=0):
    """Write one JSON file per size; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ann_hash = file_sha256(ann_file)
    paths = []
    for n, ids in nested_subsets(eligible_ids(ann_file), sizes, seed).items():
        doc = {"annotations": Path(ann_file).name, "annotations_sha256": ann_hash, "seed": seed,
               "size": n, "image_ids_sha256": ids_sha256(ids), "image_ids": ids}
        path = subset_path(directory, n, seed)
        # atomic: the scratch and imagenet runs of a pair may draw the same subset at once
        atomic_write_text(path, json.dumps(doc, indent=0))
        paths.append(path)
    return paths


def read_subset(path, ann_file, size=None, seed=None):
    """The image ids of a subset file, after checking it belongs to `ann_file`, is intact and
    (when given) has the size and seed the run asks for."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        ids, recorded = doc["image_ids"], doc["image_ids_sha256"]
        ann_hash = doc["annotations_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable subset file ({type(e).__name__}: {e}); delete it "
                         f"and draw it again with `bench subsets` (the same seed gives the same "
                         f"ids)") from None
    if ids_sha256(ids) != recorded:
        raise ValueError(f"{path}: image ids do not match their recorded hash (edited or corrupt); "
                         f"delete it to have it drawn again")
    if (size is not None and len(ids) != size) or (seed is not None and doc.get("seed") != seed):
        raise ValueError(f"{path}: holds {len(ids)} ids drawn with seed {doc.get('seed')}, but "
                         f"the run asks for {size} with seed {seed}; delete it and draw it again")
    if file_sha256(ann_file) != ann_hash:
        raise ValueError(f"{path} was drawn from another {Path(ann_file).name} than {ann_file}; "
                         f"delete it to draw the subset from this annotation file")
    return ids


def run_command(ann: Path, sizes, out, seed: int):
    """`bench subsets`: write the nested subsets of `ann` (default folder: bench_subsets/
    beside annotations/, where `bench run` looks) and print what each holds."""
    from bench.spec import SpecError
    if not ann.is_file():
        raise FileNotFoundError(f"--annotations {ann}: no such file; give the path of "
                                f"instances_train2017.json")
    out = Path(out) if out else ann.parent.parent / "bench_subsets"
    bad = [n for n in sizes if n <= 0]
    if bad:
        raise SpecError(f"--sizes {bad[0]}: a subset is a positive number of images")
    from bench.data.coco import AnnotationError
    try:
        paths = write_subsets(ann, sorted(sizes), out, seed)
    except AnnotationError:  # already names the file and the fix
        raise
    except ValueError as e:  # more images asked than the file has
        raise SpecError(f"{ann}: {e}") from None
    for path in paths:
        doc = json.loads(path.read_text())
        print(f"{path}: {doc['size']} images, ids sha256 {doc['image_ids_sha256'][:12]}, "
              f"from {doc['annotations']} sha256 {doc['annotations_sha256'][:12]}")
