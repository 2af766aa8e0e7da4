"""Everything checked before a study trains, so that what would fail a run hours in fails
in seconds: engines installed, dataset files and subsets, the ImageNet checkpoints each
pre-trained run loads, that every run fits the machine, and room on the runs root."""

import os
from pathlib import Path


class PreflightError(RuntimeError):
    """What would fail a run hours in, found before it starts."""


def check_dataset_files(files):
    """Both annotation files parse, and every val image is there: a run would otherwise
    fail at its first evaluation, hours in (train images are read all along; not stat'ed)."""
    from bench.data.coco import load_coco
    try:
        load_coco(files.train_annotations)
        val = load_coco(files.val_annotations)
    except ValueError as e:
        raise PreflightError(str(e)) from None
    missing = [im["file_name"] for im in val.imgs.values()
               if not (files.val_images / im["file_name"]).is_file()]
    if missing:
        raise PreflightError(f"{files.val_images}: {len(missing)} of the {len(val.imgs)} val "
                             f"images in {files.val_annotations.name} are missing (e.g. "
                             f"{missing[0]}); restore them, or regenerate the dataset")


def check_keypoint_files(files, count: int):
    """Both annotation files name `count` keypoints, and every person has 3 x `count`
    numbers: the file a keypoint run would fail on, named with the fix (bench.data.coco)."""
    from bench.data.coco import AnnotationError, check_keypoints, load_coco
    for ann in (files.train_annotations, files.val_annotations):
        try:
            check_keypoints(load_coco(ann), ann, count)
        except AnnotationError as e:
            raise PreflightError(str(e)) from None


def available(studies, specs, root):
    """`bench run --skip-unavailable` (what `make reproduce-he2019` runs): the runs whose data
    and ImageNet checkpoint this machine has, and one line per group left out. The paper's
    study spans COCO, PASCAL VOC and a GN ResNeXt-152 checkpoint nobody publishes; without
    this a missing VOC would stop the COCO runs too. Left out: every unfinished run on a
    dataset that is not there, and every unfinished pre-trained run whose checkpoint file is
    missing and which no `bench pretrain` makes (its scratch arm still trains). Nothing left
    is an error, as without the flag."""
    from bench.data import registry
    from bench.paths import resolve_cache_path
    from bench.rundir import is_done, run_dir_for
    study_of = {s.run_id: study for study in studies for s in study.runs}
    todo = [s for s in specs if not is_done(run_dir_for(s, root))]
    skipped, lines = set(), []
    for dataset in sorted({s.data.dataset for s in todo}):
        try:
            registry.resolve(dataset)
        except registry.DatasetMissing as e:
            out = [s for s in todo if s.data.dataset == dataset]
            skipped.update(s.run_id for s in out)
            lines.append(f"skipped {len(out)} runs on {dataset}: {e}")
    missing = {}
    for s in todo:
        if s.run_id in skipped or s.init != "imagenet" or not s.pretrained \
                or s.pretrained.startswith("torchvision:") or study_of[s.run_id].pretrain:
            continue
        f = resolve_cache_path(s.pretrained)
        if not f.is_file():
            missing.setdefault((str(study_of[s.run_id].path), s.pretrained, f), []).append(s)
    for (path, name, f), out in sorted(missing.items(), key=lambda kv: kv[0][:2]):
        skipped.update(s.run_id for s in out)
        lines.append(f"skipped the {len(out)} pre-trained runs of {path}: checkpoint {name} "
                     f"not found at {f}; put it there to train them (their scratch arm trains)")
    kept = [s for s in specs if s.run_id not in skipped]
    if not [s for s in kept if s in todo] and todo:
        raise PreflightError("nothing left to train: " + lines[0])
    return kept, lines


def check(studies, specs, root, slots=None, device="cpu", nodes=None):
    """Fail in seconds, before any training, on what would fail hours later."""
    from bench.data import registry, subsets
    from bench.imagenet import load_imagenet_backbone
    from bench.paths import resolve_cache_path
    from bench.rundir import is_done, run_dir_for
    study_of = {s.run_id: study for study in studies for s in study.runs}
    todo = [s for s in specs if not is_done(run_dir_for(s, root))]
    from bench import engines
    for engine in sorted({s.engine for s in todo}):
        engines.get(engine).require()  # not installed: one line on how to get it
    for dataset in sorted({s.data.dataset for s in specs}):
        registry.resolve(dataset)  # raises DatasetMissing naming the path and the fix
    for dataset in sorted({s.data.dataset for s in todo}):
        check_dataset_files(registry.resolve(dataset))
    for dataset, k in sorted({(s.data.dataset, s.model.num_keypoints) for s in todo
                              if s.model.arch == "keypoint_rcnn"}):
        check_keypoint_files(registry.resolve(dataset), k)
    if slots is not None:  # each run fits on this machine's GPUs (or CPU slots)
        from bench.runner import Nodes, check_fits
        check_fits(specs, slots, device, nodes or Nodes())
    if any(s.eval.backend == "faster-coco-eval" for s in todo):
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise PreflightError("eval.backend: faster-coco-eval is not installed; `pip install "
                                 "faster-coco-eval` (or bench[fast-eval]), or use eval.backend: "
                                 "pycocotools") from None
    for dataset, n, seed in sorted({(s.data.dataset, s.data.train_images, s.data.subset_seed)
                                    for s in todo if s.data.train_images is not None}):
        files = registry.resolve(dataset)
        try:
            path = registry.subset_file(files, n, seed)  # missing COCO subset: DatasetMissing
            subsets.read_subset(path, files.train_annotations, size=n, seed=seed)
        except ValueError as e:
            raise PreflightError(f"data.train_images={n} on {dataset}: {e}") from None
    checked = set()
    for s in todo:
        if s.init != "imagenet" or (s.engine, s.pretrained, s.model) in checked:
            continue
        checked.add((s.engine, s.pretrained, s.model))
        study = study_of[s.run_id]
        f = resolve_cache_path(s.pretrained)
        if not f.is_file() and not s.pretrained.startswith("torchvision:"):  # those download
            how = (f"run `bench pretrain {study.path}` first" if study.pretrain else
                   "put the ImageNet checkpoint the recipe names there")
            raise FileNotFoundError(f"{study.path}: pretrained checkpoint {s.pretrained} not "
                                    f"found at {f}; {how}")
        try:  # the checkpoint must load and cover the backbone, once per file and model
            state = load_imagenet_backbone(s.pretrained, s.model)
            engines.get(s.engine).check_pretrained(s, state)
        except (ValueError, FileNotFoundError) as e:
            raise PreflightError(f"{study.path}: {e}") from None
    from bench.group import under_torchrun
    one_at_a_time = (nodes is not None and nodes.nnodes > 1) or under_torchrun()
    parallel = 1 if one_at_a_time else len(todo) if slots is None else len(slots)
    check_storage(Path(root), todo, parallel)


def checkpoint_bytes(spec, _cache={}):
    """A checkpoint's size, as the run's engine estimates it (built once per model)."""
    key = (spec.engine, spec.model, spec.data)
    if key not in _cache:
        from bench import engines
        _cache[key] = engines.get(spec.engine).checkpoint_bytes(spec)
    return _cache[key]


def check_storage(root: Path, todo, parallel):
    """The runs root takes files and has room for the checkpoints of the runs about to start
    (each keeps checkpoint.keep, plus the one being written): a full disk found hours into a
    run costs that run's work since its last checkpoint, found here it costs nothing."""
    import shutil
    if not todo:
        return
    where = "; choose another with --runs-root or $BENCH_RUNS"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_bytes(bytes(4096))
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"runs root {root} is not writable ({e.strerror or e}){where}") from None
    from bench import fork
    from bench.checkpoint import list_checkpoints
    from bench.rundir import run_dir_for
    kept = {p: len(kids) for p, kids in fork.families(todo).items()}  # a parent's fork points

    def more_bytes(s):
        # A half-done run already holds some of its checkpoints: it needs only the rest,
        # and at least room for the one it writes next.
        size = checkpoint_bytes(s)
        peak = (s.checkpoint.keep + 1 + kept.get(s.run_id, 0)) * size
        held = sum(p.stat().st_size for _, p in
                   list_checkpoints(run_dir_for(s, root) / "checkpoints") if p.exists())
        return max(size, peak - held)

    need = sorted((more_bytes(s) for s in todo), reverse=True)[:max(parallel, 1)]
    free = shutil.disk_usage(root).free
    if free < sum(need):
        gib = 2 ** 30
        raise PreflightError(f"runs root {root}: {free / gib:.2f} GiB free but the {len(need)} "
                             f"run(s) about to start need about {sum(need) / gib:.2f} GiB more for "
                             f"checkpoints (checkpoint.keep + 1 each, and a parent's fork "
                             f"points, less those already saved); free some space{where}")
