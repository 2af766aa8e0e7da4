"""Measured training speed: the throughput table behind `bench plan`'s GPU-hour estimates.

`bench speed RECIPE...` times train steps (forward, backward, SGD step) of each distinct
model of a study on this machine's device, at the run's input size and per-GPU batch, on
synthetic images shaped like the run's dataset (COCO: 640x480 with 7 objects, the mean of
train2017), and with `--record` appends one row per model to `results/throughput.csv`.
Data loading is left out: it overlaps with compute in a real run.

The table's key is a hash of what decides a step's cost (engine, model, input sizes,
per-GPU batch, class count), so a plan finds a measurement only for exactly the model it
will run. Each row names the device, torch version and commit it was measured with; a
plan reports "no estimate" for anything not in the table, never a guess.
"""

import csv
import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.rundir import code_version

TABLE = Path(__file__).resolve().parent.parent / "results" / "throughput.csv"
# max_mem_gb: peak GPU memory on a GPU, peak resident memory of the process on a CPU
COLUMNS = ["speed_key", "device", "engine", "arch", "backbone", "norm", "input", "batch_per_gpu",
           "micro_batch", "amp", "sec_per_iter", "images_per_sec", "max_mem_gb", "iters_timed", "torch", "commit",
           "date"]
# What the synthetic step images look like for each dataset: (height, width), objects per
# image, classes. COCO train2017: most images are 640x480 (landscape), 7.3 instances each.
DATASET_SHAPES = {"coco": ((480, 640), 7, 80), "shapes": ((128, 128), 4, 8),
                  "shapes-tiny": ((128, 128), 4, 8),
                  # VOC: most images 500 x 375 (landscape), 2.4 objects each, 20 classes
                  "voc": ((375, 500), 2, 20), "shapes-voc": ((128, 128), 2, 8),
                  "shapes-voc-tiny": ((128, 128), 2, 8),
                  # COCO person keypoints: 262k people in the 64k train2017 images that have any
                  "coco-keypoints": ((480, 640), 4, 1),
                  # the embedded stand-in: 4,001 people in its 2,000 train images
                  "people": ((128, 128), 2, 1), "people-tiny": ((128, 128), 2, 1)}


# ModelSpec fields that change what a step computes but not what it costs
# Fields that do not change a step's cost. stride_in_1x1 moves a stride between the first
# two convolutions of three blocks (well under 1% of the detector's work); RoIAlign's
# alignment shifts its sample points by half a pixel. (Its sampling ratio and freeze_at do
# change the cost: a Detectron-convention run needs its own measurement.)
COST_FREE = ("pixel_mean", "pixel_std", "box_loss_beta", "rpn_box_loss_beta", "stride_in_1x1",
             "roi_align_aligned", "conv_init", "mask_logits_init")


def table_path() -> Path:
    return Path(os.environ.get("BENCH_THROUGHPUT", TABLE))


def speed_key(spec) -> str:
    """Hash of every spec field that changes the cost of one train step. Model fields at
    their default are left out, so a field added to ModelSpec later keeps old rows valid."""
    d = spec.data
    defaults = asdict(type(spec.model)())
    model = {k: v for k, v in asdict(spec.model).items()
             if v != defaults[k] and k not in COST_FREE}
    blob = {"engine": spec.engine, "model": model,
            "input": [d.train_min_size, d.train_max_size],
            "batch_per_gpu": spec.solver.batch // spec.gpus,
            "classes": DATASET_SHAPES.get(d.dataset, (None, None, None))[2]}
    # a step of several passes, or in mixed precision, costs differently (absent when off,
    # so rows measured before these options existed keep their keys)
    if spec.solver.micro_batch and spec.solver.micro_batch != blob["batch_per_gpu"]:
        blob["micro_batch"] = spec.solver.micro_batch
    if spec.solver.amp != "off":
        blob["amp"] = spec.solver.amp
    if _polygon_targets(spec):
        # each positive RoI's polygons rasterized on the CPU: a cost the rows measured
        # before polygon targets existed did not include
        blob["polygon_targets"] = True
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{torch.get_num_threads()} threads"


def read_table(path=None):
    path = Path(path or table_path())
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def lookup(spec, device_substring: str, rows=None):
    """The newest measured row for this spec's model on a device whose name contains
    `device_substring` (case-insensitive), or None."""
    rows = read_table() if rows is None else rows
    key, want = speed_key(spec), device_substring.lower()
    hits = [r for r in rows if r["speed_key"] == key and want in r["device"].lower()]
    return hits[-1] if hits else None


def gpu_hours(spec, row) -> float:
    """Iterations x measured s/iter x GPUs: assumes each GPU of a multi-GPU run does the
    measured single-GPU step at the same per-GPU batch (communication left out)."""
    return spec.solver.max_iter * float(row["sec_per_iter"]) * spec.gpus / 3600


def _polygon_targets(spec) -> bool:
    """COCO's masks are polygons: a Mask R-CNN run with polygon targets rasterizes them."""
    return (spec.model.arch == "mask_rcnn" and spec.model.mask_target == "polygon"
            and spec.data.dataset == "coco")


def _synthetic_batch(spec, n, generator, device):
    (h, w), objects, _ = DATASET_SHAPES[spec.data.dataset]
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, h, w, generator=generator).to(device))
        xy = torch.rand(objects, 2, generator=generator) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(objects, 2, generator=generator) * torch.tensor([w * 0.3, h * 0.3])
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(objects, h, w, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        labels = torch.randint(1, DATASET_SHAPES[spec.data.dataset][2] + 1, (objects,),
                               generator=generator)
        target = {"boxes": boxes.to(device), "labels": labels.to(device),
                  "masks": masks.to(device)}
        if spec.model.arch == "keypoint_rcnn":  # every keypoint labelled, inside its box
            k = spec.model.num_keypoints
            at = torch.rand(objects, k, 2, generator=generator)
            xy_k = boxes[:, None, :2] + at * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([xy_k, torch.full((objects, k, 1), 2.0)], 2) \
                .to(device)
        if _polygon_targets(spec):  # the box outlines as polygons, as COCO's annotations
            target["polygons"] = [[np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]
                                  for x0, y0, x1, y1 in boxes.int().tolist()]
        targets.append(target)
    return images, targets


def _reset_peak_rss():
    """Start this model's peak RSS from the current RSS: one command times several models,
    and getrusage's peak is the whole process's. Linux only (/proc/self/clear_refs, 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_gb() -> float:
    """Peak resident memory of this process since _reset_peak_rss (the CPU's analogue of GPU
    peak memory): VmHWM, else getrusage's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 2 ** 20   # kB
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def measure(spec, device="cpu", warmup=5, iters=20, log=print) -> dict:
    """Time `iters` train steps of `spec`'s model, with its engine's own step, after
    `warmup` untimed ones."""
    if spec.data.dataset not in DATASET_SHAPES:
        raise ValueError(f"no synthetic image shape for dataset {spec.data.dataset!r}")
    device = torch.device(device)
    torch.manual_seed(0)
    per_gpu = spec.solver.batch // spec.gpus
    g = torch.Generator().manual_seed(0)
    batches = [_synthetic_batch(spec, per_gpu, g, device) for _ in range(4)]
    from bench import engines
    step, micro = engines.get(spec.engine).train_step(spec, device, per_gpu, batches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()
    times = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    m, d = spec.model, spec.data
    row = {"speed_key": speed_key(spec), "device": device_name(device), "engine": spec.engine,
           "arch": m.detector_name, "backbone": m.backbone_name + (f"-w{m.width}" if m.width != 64
                                                          else "")
           + (f"-freeze{m.freeze_at}" if m.freeze_at else ""),
           "norm": m.norm, "input": f"{d.train_min_size}/{d.train_max_size}",
           "batch_per_gpu": per_gpu, "micro_batch": micro, "amp": spec.solver.amp,
           "sec_per_iter": f"{sec:.4f}",
           "images_per_sec": f"{per_gpu / sec:.3g}",
           "max_mem_gb": (f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f}"
                          if device.type == "cuda" else f"{_peak_rss_gb():.2f}"),
           "iters_timed": iters, "torch": torch.__version__.split("+")[0],
           "commit": code_version(), "date": time.strftime("%Y-%m-%d")}
    passes = f" ({per_gpu // micro} passes of {micro})" if micro != per_gpu else ""
    amp = f" {spec.solver.amp}" if spec.solver.amp != "off" else ""
    log(f"{row['engine']}: {row['arch']} {row['backbone']} {row['norm']} {row['input']} "
        f"x{per_gpu}/GPU{passes}{amp} on "
        f"{row['device']}: {sec:.3f} s/iter ({row['images_per_sec']} img/s), "
        f"peak {'GPU memory' if device.type == 'cuda' else 'process RSS'} {row['max_mem_gb']} GB")
    return row


def record(rows, path=None):
    """Append rows to the throughput table (created with its header if absent)."""
    path = Path(path or table_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    exists = path.is_file()
    if exists:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:  # a table from before a column was added: rewrite it
            rows = read_table(path) + list(rows)
            path.unlink()
            exists = False
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        if not exists:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def distinct_models(specs):
    """One spec per speed key, in order: a study's runs share a handful of models."""
    seen, out = set(), []
    for s in specs:
        k = speed_key(s)
        if k not in seen:
            seen.add(k)
            out.append(s)
    return out


def run_command(specs, device: str, vs_detectron2=False, force=False, to_table=False,
                warmup=5, iters=20):
    """`bench speed`: time each distinct model of `specs` on this machine (or take its row
    from the table), side by side with detectron2 when asked or on a GPU; `to_table` appends
    the new rows to the throughput table one at a time."""
    import importlib.util

    import torch
    has_d2 = importlib.util.find_spec("detectron2") is not None
    if vs_detectron2 and not has_d2:
        from bench import engines
        engines.get("detectron2").require()  # one line on how to install it
    # On a GPU the reference is timed whenever it is installed; on a CPU when asked
    compare = has_d2 and (vs_detectron2 or device == "cuda")
    rows = []
    here = device_name(torch.device(device))
    table = read_table()
    done = set()  # speed keys timed by this command

    def timed(spec):
        """This machine's row for `spec`: from the table, or measured now."""
        key = speed_key(spec)
        known = lookup(spec, here, table + rows)
        if known and (key in done or not force):
            if key not in done:
                print(f"{spec.run_id}: already measured on {here} (--force to measure again)")
            return known
        try:
            rows.append(measure(spec, device, warmup=warmup, iters=iters))
        except ValueError as e:  # an engine or dataset bench speed cannot time
            raise SystemExit(f"bench speed: {e}") from None
        done.add(key)
        if to_table:  # one at a time: a later model running out of memory loses nothing
            record(rows[-1:])
        return rows[-1]

    for s in distinct_models(specs):
        ours = timed(s)
        twin = _detectron2_twin(s) if compare else None
        if twin is not None:
            theirs = timed(twin)
            ratio = float(theirs["sec_per_iter"]) / float(ours["sec_per_iter"])
            print(f"  detectron2 / torchvision s/iter: {ratio:.2f} (the same model, "
                  f"{theirs['device']})")
    if to_table:
        print(f"{len(rows)} rows appended to {table_path()}")


def _detectron2_twin(spec):
    """`spec` run by the detectron2 engine, or None when detectron2 cannot build it."""
    import dataclasses

    from bench import engines
    if spec.engine != "torchvision":
        return None
    twin = dataclasses.replace(spec, engine="detectron2")
    try:
        engines.get("detectron2").validate(twin)
    except ValueError as e:
        print(f"  no detectron2 timing: {str(e).removeprefix('engine detectron2: ')}")
        return None
    if spec.solver.amp != "off":
        print(f"  no detectron2 timing: bench speed times detectron2 without AMP only "
              f"(solver.amp={spec.solver.amp})")
        return None
    return twin
