"""Recipes: a study as a small YAML file, validated and expanded into RunSpecs.

    study: mini                       # name; run dirs go under <runs root>/<study>/
    description: ...
    base: _common.yaml                # optional, one level only, relative to this file
    run: {model: {...}, data: {...}, solver: {...}, ...}   # the shared base run (RunSpec fields)
    vary:                             # axes, crossed: schedule, train_images, norm, ...
      schedule: [1x, 2x, 3x]
      train_images: [500, null]       # null: the whole training set
    compare:
      init: [scratch, imagenet]       # every point of the axes becomes a matched pair
      imagenet: {model: {freeze_at: 2}}   # optional: a fine-tuning convention of one side
    pretrain: {...}                   # optional: how `bench pretrain` makes run.pretrained
    plugins: [my_backbone.py]         # optional: user code to import (e.g. a new backbone)
    unsupported: REASON               # an experiment of the paper no engine can express yet:
                                      # listed by `bench plan` with the reason, expands to no run

Pairs share everything except the init by construction: each axis point is expanded once,
then copied per init. Everything is checked before any training starts; errors name the
file, the key and the allowed values. A directory means every `*.yaml` in it except files
starting with `_` (shared bases).
"""

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from bench import plugins, schedule
from bench.spec import PER_INIT_FIELDS, PretrainSpec, RunSpec, SpecError, from_dict, replace

TOP_KEYS = ("study", "description", "base", "run", "vary", "compare", "pretrain", "unsupported",
            "plugins", "slurm", "fork")
# The paper's words for the axes a study varies -> RunSpec fields.
AXIS_ALIASES = {
    "schedule": "solver.schedule", "train_images": "data.train_images", "norm": "model.norm",
    "backbone": "model.backbone", "depth": "model.depth", "arch": "model.arch", "seed": "seed",
    "batch": "solver.batch", "dataset": "data.dataset",
}
INITS = ("scratch", "imagenet")


@dataclass
class Study:
    name: str
    path: Path
    description: str
    runs: List[RunSpec]
    pairs: List[tuple]                 # (scratch RunSpec, imagenet RunSpec)
    pretrain: Optional[PretrainSpec] = None
    axes: dict = field(default_factory=dict)
    unsupported: Optional[str] = None  # why this experiment has no runs yet
    # where `bench run --slurm` puts the runs (bench.slurm.SlurmOptions); not part of any run
    slurm: dict = field(default_factory=dict)
    # shorter schedules start from the longest run's checkpoints (bench.fork); false: each
    # run trains from iteration 0. Either way the same runs, the same run ids.
    fork: bool = True


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal keys without a word; a recipe with `run:` twice
    would silently lose the first section, so a repeated key is an error here."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        doc = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise SpecError(f"{path}: no such recipe file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a recipe file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: is not a text (UTF-8) file; a recipe is YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{path}: a recipe is a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = [k for k in doc if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(TOP_KEYS)}")
    return doc


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(d: dict, key: str, value):
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise SpecError(f"--set {key}: {p} is not a section")
    d[parts[-1]] = value


def parse_overrides(items) -> dict:
    """['solver.batch=4', 'vary.schedule=[1x]'] -> {'solver.batch': 4, ...} (YAML values)."""
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set solver.batch=4")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"--set {item!r}: the value is not valid YAML; quote lists as "
                            f"--set 'vary.schedule=[1x, 2x]'") from None
    return out


def doc_base_name(path: Path, base_path: Path) -> str:
    try:
        return str(base_path.relative_to(path.parent.resolve()))
    except ValueError:
        return str(base_path)


def load_doc(path, overrides=None) -> dict:
    path = Path(path)
    doc = _read_yaml(path)
    if "base" in doc:
        base_path = (path.parent / str(doc["base"])).resolve()
        if not base_path.is_file():
            raise SpecError(f"{path}: base: {doc['base']!r} is not a recipe file ({base_path}); "
                            f"the path is relative to {path.parent}")
        base = _read_yaml(base_path)
        if "base" in base:
            raise SpecError(f"{base_path}: a base recipe may not have its own `base:` (one level "
                            f"only, to keep recipes readable); merge it into {path.name}")
        doc = _merge(base, {k: v for k, v in doc.items() if k != "base"})
        doc["_base"] = str(doc_base_name(path, base_path))
    # An unsupported study has no runs: a command's --set (say, over recipes/he2019/) has
    # nothing to change there
    for key, value in (overrides or {} if "unsupported" not in doc else {}).items():
        head = key.split(".")[0]
        target = (key if head in ("vary", "compare", "pretrain", "study", "slurm", "fork")
                  else f"run.{key}")
        if doc.get(target.split(".")[0]) is None:
            doc[target.split(".")[0]] = {}
        _set_dotted(doc, target, value)
    return doc


POSITIVE = ("solver.batch", "solver.ref_batch", "solver.unit_iters", "solver.base_lr", "gpus",
            "checkpoint.period", "checkpoint.keep", "model.width", "model.norm_groups",
            "model.fpn_channels", "model.box_head_fcs", "model.num_keypoints",
            "model.keypoint_head_convs", "model.keypoint_head_dim",
            "model.keypoint_pooler_resolution", "data.train_min_size", "data.train_max_size",
            "data.test_min_size", "data.test_max_size")
NON_NEGATIVE = ("eval.period", "solver.warmup_iters", "model.freeze_at", "solver.micro_batch",
                "solver.bias_lr_factor", "solver.weight_decay_bias", "model.box_loss_beta",
                "model.rpn_box_loss_beta")


def _get(spec, dotted):
    for part in dotted.split("."):
        spec = getattr(spec, part)
    return spec


def _check_ranges(spec: RunSpec, where: str):
    for key in POSITIVE:
        value = _get(spec, key)
        if not ((min(value) if value else 0) if isinstance(value, tuple) else value) > 0:
            raise SpecError(f"{where}: {key}={_get(spec, key)!r} must be greater than 0")
    for key in NON_NEGATIVE:  # None: an optional value left unset
        if _get(spec, key) is not None and _get(spec, key) < 0:
            raise SpecError(f"{where}: {key}={_get(spec, key)!r} must not be negative")
    n = spec.data.train_images
    if n is not None and n <= 0:
        raise SpecError(f"{where}: data.train_images={n} must be a positive number of images, "
                        f"or null for the whole training set")


def _check_pair_rules(spec: RunSpec, where: str):
    """Impossible combinations, caught before any GPU time is spent."""
    _check_ranges(spec, where)
    if spec.init == "scratch":
        if spec.model.freeze_at != 0:
            raise SpecError(f"{where}: model.freeze_at={spec.model.freeze_at} with init=scratch; "
                            f"a scratch run trains every stage, set model.freeze_at: 0")
        if spec.model.norm == "FrozenBN":
            raise SpecError(f"{where}: model.norm=FrozenBN with init=scratch; frozen statistics "
                            f"need a pre-trained model, use GN or SyncBN")
    elif not spec.pretrained:
        raise SpecError(f"{where}: init=imagenet needs run.pretrained: PATH (a checkpoint)")
    if spec.solver.batch % spec.gpus:
        raise SpecError(f"{where}: solver.batch={spec.solver.batch} does not divide over "
                        f"gpus={spec.gpus}")
    per_gpu = spec.solver.batch // spec.gpus
    if spec.solver.micro_batch and per_gpu % spec.solver.micro_batch:
        raise SpecError(f"{where}: solver.micro_batch={spec.solver.micro_batch} does not divide "
                        f"the {per_gpu} images per GPU (solver.batch {spec.solver.batch} over "
                        f"gpus {spec.gpus}); choose a divisor, or 0 for one pass per GPU")
    from bench.backbones import BACKBONES
    if spec.model.backbone not in BACKBONES:
        raise SpecError(f"{where}: model.backbone {spec.model.backbone!r} is not registered; "
                        f"allowed: {', '.join(sorted(BACKBONES))}")
    from bench.data.registry import DATASETS, KEYPOINT_DATASETS, VOC
    if spec.data.dataset not in DATASETS:
        raise SpecError(f"{where}: data.dataset {spec.data.dataset!r} is unknown; allowed: "
                        f"{', '.join(DATASETS)}")
    if spec.data.dataset in VOC and spec.model.arch != "faster_rcnn":
        raise SpecError(f"{where}: model.arch {spec.model.arch} on data.dataset "
                        f"{spec.data.dataset!r}; VOC's detection data has boxes only (no masks "
                        f"or keypoints), use model.arch: faster_rcnn")
    if spec.model.arch == "keypoint_rcnn" and spec.data.dataset not in KEYPOINT_DATASETS:
        raise SpecError(f"{where}: model.arch keypoint_rcnn needs keypoint annotations, which "
                        f"data.dataset {spec.data.dataset!r} has none of; use one of "
                        f"{', '.join(KEYPOINT_DATASETS)}")
    _check_cascade(spec.model, where)
    if spec.eval.tta and (not spec.eval.tta_min_sizes or min(spec.eval.tta_min_sizes) <= 0):
        raise SpecError(f"{where}: eval.tta is on but eval.tta_min_sizes="
                        f"{list(spec.eval.tta_min_sizes)} gives no test scale; list the shorter "
                        f"sides to test at (detectron2: [400, 500, ..., 1200]) or set eval.tta: "
                        f"false")
    if spec.eval.tta and spec.model.arch == "keypoint_rcnn":
        raise SpecError(f"{where}: eval.tta with model.arch keypoint_rcnn: test-time "
                        f"augmentation merges boxes and masks only (keypoints have none, nor "
                        f"in detectron2); set eval.tta: false")
    if spec.eval.tta and spec.eval.tta_max_size <= 0:
        raise SpecError(f"{where}: eval.tta_max_size={spec.eval.tta_max_size} must be greater "
                        f"than 0 (detectron2: 4000)")
    from bench import engines
    try:  # (the detectron2 engine checks its translation, needing no detectron2)
        engines.get(spec.engine).validate(spec)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def _check_cascade(m, where: str):
    """A cascade's per-stage lists must agree, and its first stage labels RoIs as the plain
    heads' sampling does (detectron2 asserts the same)."""
    if m.roi_heads != "cascade":
        return
    n = len(m.cascade_ious)
    lists = {"model.cascade_bbox_reg_weights": m.cascade_bbox_reg_weights,
             "model.cascade_loss_weights": m.cascade_loss_weights}
    for key, value in lists.items():
        if len(value) != n:
            raise SpecError(f"{where}: {key} has {len(value)} stages but model.cascade_ious has "
                            f"{n}; give one entry per stage")
    if n < 2 or m.cascade_ious[0] != 0.5:
        raise SpecError(f"{where}: model.cascade_ious={list(m.cascade_ious)} must list at least "
                        f"two stages, the first at 0.5 (the RoI sampling's IoU), e.g. "
                        f"[0.5, 0.6, 0.7]")
    if any(not 0 < t < 1 for t in m.cascade_ious):
        raise SpecError(f"{where}: model.cascade_ious={list(m.cascade_ious)}: each IoU must be "
                        f"between 0 and 1")
    if any(len(w) != 4 or min(w) <= 0 for w in m.cascade_bbox_reg_weights):
        raise SpecError(f"{where}: model.cascade_bbox_reg_weights: each stage needs 4 positive "
                        f"weights (wx, wy, ww, wh), e.g. [10, 10, 5, 5]")
    if any(w < 0 for w in m.cascade_loss_weights):
        raise SpecError(f"{where}: model.cascade_loss_weights must not be negative")


def run_name(spec: RunSpec) -> str:
    m = spec.model
    images = "all" if spec.data.train_images is None else str(spec.data.train_images)
    engine = "" if spec.engine == "torchvision" else f"-{spec.engine}"
    return (f"{m.detector_name}-{m.backbone_name}-{m.norm}-{spec.init}-{spec.solver.schedule}"
            f"-{images}img-seed{spec.seed}{engine}")


def load(path, overrides=None) -> Study:
    try:
        return _load(Path(path), overrides)
    except SpecError as e:
        raise _blame_set(e, overrides) from None


def _blame_set(error: SpecError, overrides) -> SpecError:
    """A bad value given with --set is the command line's fault, not the recipe's: say so
    (the recipe's error would name a key the file may not even hold)."""
    message = str(error)
    for key, value in (overrides or {}).items():
        for shown in (key, f"run.{key}"):
            at = message.find(f": {shown}: ")
            if at >= 0:
                return SpecError(f"--set {key}={value!r}: {message[at + len(shown) + 4:]} "
                                 f"(recipe {message[:at]})")
    return error


def _load(path: Path, overrides) -> Study:
    doc = load_doc(path, overrides)
    overridden = {key if key.split(".")[0] in ("vary", "compare", "pretrain", "study", "slurm",
                                               "fork")
                  else f"run.{key}" for key in (overrides or {})}
    where = str(path) + (f" (with base {doc['_base']})" if doc.get("_base") else "")
    name = doc.get("study")
    if not isinstance(name, str) or not name:
        raise SpecError(f"{where}: study: must be a non-empty name")
    if "unsupported" in doc:
        reason = doc["unsupported"]
        if not isinstance(reason, str) or not reason.strip():
            raise SpecError(f"{where}: unsupported: must say why no engine can run this study yet")
        extra = [k for k in ("run", "vary", "compare", "pretrain", "plugins") if k in doc]
        if extra:
            raise SpecError(f"{where}: {extra[0]}: an unsupported study has no runs; keep only "
                            f"study, description and unsupported (or remove unsupported)")
        return Study(name=name, path=path, description=doc.get("description", ""), runs=[],
                     pairs=[], unsupported=" ".join(reason.split()))
    plugin_entries = doc.get("plugins") or []
    if not isinstance(plugin_entries, list) or not all(isinstance(e, str) for e in plugin_entries):
        raise SpecError(f"{where}: plugins: must be a list of .py files (next to the recipe) or "
                        f"module names")
    try:
        plugin_paths = plugins.resolve(plugin_entries, path.parent)
        plugins.load(plugin_paths)
    except Exception as e:  # noqa: BLE001 - user code: any failure is one line naming it
        raise SpecError(f"{where}: plugins: {type(e).__name__}: {e}") from None
    run = doc.get("run") or {}
    if not isinstance(run, dict):
        raise SpecError(f"{where}: run: must be a mapping of RunSpec fields (model, data, solver, "
                        f"...), got {run!r}")
    for label in RunSpec.LABELS:
        if label in run:
            raise SpecError(f"{where}: run.{label} is set by the suite (study name, run name, "
                            f"top-level plugins:); remove it from run")
    if "init" in run:
        raise SpecError(f"{where}: run.init is set by compare.init (every run has a scratch and an "
                        f"imagenet twin); remove it from run")
    for section in ("model", "data", "solver", "eval", "checkpoint"):
        if run.get(section) is not None and not isinstance(run[section], dict):
            raise SpecError(f"{where}: run.{section}: must be a mapping of its fields, got "
                            f"{run[section]!r}")
    for k in ("max_iter", "steps", "lr"):
        if k in (run.get("solver") or {}):
            raise SpecError(f"{where}: run.solver.{k} is computed from solver.schedule, batch and "
                            f"base_lr; set those instead")
    base = from_dict(RunSpec, {**run, "study": name}, f"{where}: run")

    vary = doc.get("vary") or {}
    if not isinstance(vary, dict):
        raise SpecError(f"{where}: vary: must map axis names to lists of values")
    axes = {}
    for key, values in vary.items():
        field_key = AXIS_ALIASES.get(key, key)
        if field_key in axes:
            raise SpecError(f"{where}: vary.{key}: varies {field_key} a second time; keep one axis")
        if field_key in ("init", "pretrained", "study", "name") or field_key.endswith(
                ("solver.max_iter", "solver.steps", "solver.lr")):
            raise SpecError(f"{where}: vary.{key}: {field_key} cannot be an axis (init is set by "
                            f"compare, labels and computed values follow from the others)")
        if f"run.{field_key}" in overridden:
            raise SpecError(f"{where}: --set {field_key} would be overridden by vary.{key}; set "
                            f"vary.{key}=[...] instead")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: vary.{key}: must be a non-empty list of values")
        for v in values:  # type-check each value against the field it varies
            try:
                replace(base, **{field_key: v})
                from_dict(RunSpec, _merge(run, _nested(field_key, v)), f"{where}: vary.{key}")
            except (TypeError, AttributeError):
                raise SpecError(f"{where}: vary.{key}: unknown axis; allowed: "
                                f"{', '.join(AXIS_ALIASES)} or a dotted RunSpec field") from None
        axes[field_key] = values

    compare = doc.get("compare") or {"init": list(INITS)}
    if not isinstance(compare, dict) or not isinstance(compare.get("init"), list) or \
            sorted(compare["init"]) != sorted(INITS):
        raise SpecError(f"{where}: compare: must be `init: [scratch, imagenet]` (pairs differ "
                        f"only in their init)")
    per_init = {init: _per_init_overrides(compare, init, where) for init in INITS}
    extra = [k for k in compare if k not in ("init",) + INITS]
    if extra:
        raise SpecError(f"{where}: compare.{extra[0]}: unknown key; allowed: init, scratch, "
                        f"imagenet")

    runs, pairs = [], []
    for point in itertools.product(*axes.values()) if axes else [()]:
        changes = dict(zip(axes, point))
        shared = from_dict(RunSpec, _merge(run, _merge_all(changes)), f"{where}: run")
        _check_ranges(shared, f"{where} ({', '.join(f'{k}={v}' for k, v in changes.items())})")
        shared = replace(shared, study=name, solver=_resolve(shared.solver, where),
                         plugins=plugin_paths)
        pair = []
        for init in INITS:
            spec = replace(shared, init=init,
                           pretrained=shared.pretrained if init == "imagenet" else None,
                           **per_init[init])
            spec = replace(spec, name=run_name(spec))
            _check_pair_rules(spec, f"{where} ({spec.name})")
            pair.append(spec)
            runs.append(spec)
        pairs.append(tuple(pair))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{where}: two runs of the study are identical; remove the repeated axis "
                        f"value")
    pretrain = None
    if doc.get("pretrain") is not None:
        pretrain = from_dict(PretrainSpec, doc["pretrain"], f"{where}: pretrain")
        for key in ("epochs", "batch", "lr"):
            if not getattr(pretrain, key) > 0:
                raise SpecError(f"{where}: pretrain.{key}={getattr(pretrain, key)!r} must be "
                                f"greater than 0")
    forking = doc.get("fork", True)
    if not isinstance(forking, bool):
        raise SpecError(f"{where}: fork: must be true (shorter schedules start from the longest "
                        f"run's checkpoint at their first LR drop) or false, got {forking!r}")
    return Study(name=name, path=path, description=doc.get("description", ""), runs=runs,
                 pairs=pairs, pretrain=pretrain, axes=axes, slurm=_slurm_section(doc, where),
                 fork=forking)


def _slurm_section(doc, where) -> dict:
    from bench.slurm import SlurmOptions
    section = doc.get("slurm") or {}
    if not isinstance(section, dict):
        raise SpecError(f"{where}: slurm: must be a mapping of {', '.join(SlurmOptions.fields())}")
    try:
        SlurmOptions().updated(section, where)
    except ValueError as e:
        raise SpecError(str(e)) from None
    return dict(section)


def _per_init_overrides(compare, init, where) -> dict:
    """compare.<init>: {model: {freeze_at: 2}} -> {"model.freeze_at": 2}, whitelisted."""
    section = compare.get(init) or {}
    flat = {}

    def walk(d, prefix):
        if not isinstance(d, dict):
            raise SpecError(f"{where}: compare.{init}: must be a mapping such as "
                            f"{{model: {{freeze_at: 2}}}}")
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                flat[key] = v
    walk(section, "")
    for key, value in flat.items():
        if key not in PER_INIT_FIELDS:
            raise SpecError(f"{where}: compare.{init}.{key}: a pair may differ only in its init "
                            f"and these fine-tuning conventions: {', '.join(PER_INIT_FIELDS)}")
        head, field_name = key.split(".")
        typed = from_dict(type(getattr(RunSpec(), head)), {field_name: value},
                          f"{where}: compare.{init}.{head}")
        flat[key] = getattr(typed, field_name)  # e.g. a YAML list as the field's tuple
    return flat


def _nested(dotted: str, value) -> dict:
    out = {}
    _set_dotted(out, dotted, value)
    return out


def _merge_all(changes: dict) -> dict:
    out = {}
    for k, v in changes.items():
        out = _merge(out, _nested(k, v))
    return out


def _resolve(solver, where):
    try:
        return schedule.resolve(solver)
    except SpecError as e:
        raise SpecError(f"{where}: {e}") from None


def recipe_files(paths) -> List[Path]:
    """Expand directories into their recipe files (sorted, `_*.yaml` bases skipped)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.glob("*.yaml") if not f.name.startswith("_"))
            if not found:
                raise SpecError(f"{p}: no recipe (*.yaml) in this directory")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise SpecError(f"{p}: no such recipe file or directory")
    return out


def load_all(paths, overrides=None) -> List[Study]:
    return [load(f, overrides) for f in recipe_files(paths)]
