"""Benchmark: what evaluating images of different sizes in one batch costs a GN model.

Until spec version 5 the torchvision engine evaluated 8 images per forward pass in image-id
order, so a portrait and a landscape image shared one padded batch and every GroupNorm
layer normalized over the padding. The embedded data cannot show it (every image is
128 x 128), so this cuts the run's validation images to three sizes in turn (square,
landscape, portrait: COCO's mix in miniature), with their annotations cropped alike, and
evaluates the run's final checkpoint three ways: mixed batches of 8 (the old path), batches
of 8 of one size (today's), and one image at a time (Detectron's and detectron2's). It
prints box / mask AP and the evaluation time of each.

    python -m bench.engines.torchvision.eval_batching runs/parity/<run> [--batch 8]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from bench import checkpoint
from bench.data.coco import CocoDetection
from bench.engines.torchvision import evaluate as ev
from bench.engines.torchvision.model import build_detector, use_input_sizes
from bench.engines.torchvision.train import datasets_for
from bench.rundir import RunDir

SIZES = ((128, 128), (96, 128), (128, 96))  # (height, width) in turn


def mixed_size_copy(val_set, dest: Path) -> CocoDetection:
    """`val_set` with image k cut to SIZES[k % 3] from its top-left corner; each object's
    mask is cut alike, its box is its cut mask's, and objects cut away entirely are dropped."""
    gt = val_set.coco
    images, annotations = [], []
    for k, image_id in enumerate(val_set.ids):
        h, w = SIZES[k % len(SIZES)]
        info = gt.imgs[image_id]
        Image.open(f"{val_set.image_dir}/{info['file_name']}").crop((0, 0, w, h)).save(
            dest / info["file_name"])
        images.append({**info, "height": h, "width": w})
        for ann in gt.imgToAnns.get(image_id, []):
            mask = np.ascontiguousarray(gt.annToMask(ann)[:h, :w])
            if mask.sum() == 0:
                continue
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({**ann, "segmentation": rle,
                                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                                "area": float(mask_utils.area(rle))})
    file = dest / "instances_mixed.json"
    file.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": gt.dataset["categories"]}))
    return CocoDetection(dest, file, train=False, masks=val_set.masks)


@torch.no_grad()
def _predict_mixed(model, dataset, batch_size):
    """The old path: consecutive images in id order, whatever their sizes."""
    model.eval()
    use_input_sizes(model, train=False)
    boxes, segms, kps = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset.get(i) for i in range(start, min(start + batch_size, len(dataset)))]
        outputs = model([img.float() / 255 for img, _ in items])
        for (_, target), out in zip(items, outputs):
            ev._append_results(dataset, target["image_id"], out, boxes, segms, kps)
    return boxes, segms, kps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rd = RunDir(args.run_dir)
    spec = rd.read_spec()
    train_set, val_set = datasets_for(spec)
    model = build_detector(spec.model, len(train_set.cat_ids), spec.data)
    iteration, state = checkpoint.load_latest(rd.checkpoints, log=lambda msg: None)
    if state is None:
        raise SystemExit(f"{rd.checkpoints}: no checkpoint to evaluate; train the run first")
    model.load_state_dict(state["model"])
    masks = spec.model.arch == "mask_rcnn"
    with tempfile.TemporaryDirectory() as tmp:
        mixed = mixed_size_copy(val_set, Path(tmp))
        ways = {f"mixed sizes, {args.batch} per pass (old)":
                lambda: _predict_mixed(model, mixed, args.batch),
                f"one size, up to {args.batch} per pass (now)":
                lambda: ev.predict(model, mixed, "cpu", batch_size=args.batch),
                "one image per pass (Detectron, detectron2)":
                lambda: ev.predict(model, mixed, "cpu", batch_size=1)}
        print(f"{rd.path.name}, iteration {iteration}: {len(mixed)} val images cut to "
              f"{' / '.join(f'{h}x{w}' for h, w in SIZES)} (h x w) in turn; 1 CPU thread")
        print(f"{'evaluation':46s} {'box AP':>7s} {'mask AP':>8s} {'predict s':>10s}")
        for name, run in ways.items():
            t0 = time.perf_counter()
            boxes, segms, _ = run()
            seconds = time.perf_counter() - t0
            box = ev.coco_stats(mixed.coco, boxes, "bbox", mixed.ids)["bbox/AP"]
            mask = ev.coco_stats(mixed.coco, segms, "segm", mixed.ids)["segm/AP"] if masks else float("nan")
            print(f"{name:46s} {box:7.2f} {mask:8.2f} {seconds:10.1f}")


if __name__ == "__main__":
    main()
