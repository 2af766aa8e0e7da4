"""`bench parity`: the same recipe pair through both engines, side by side.

A parity study varies `engine: [torchvision, detectron2]` (recipes/parity): every run exists
once per engine with everything else equal. After `bench run` has trained it, this reads the
run dirs and sets, per run, the two engines' parameter counts, seconds per iteration and
final box / mask AP next to each other. The parameter counts come from building each
engine's model on the CPU (no run dir records them); everything else is measured in the runs.
"""

import dataclasses
import re
import statistics

from bench.rundir import RunDir
from bench.spec import SpecError

ENGINES = ("torchvision", "detectron2")


def check(study):
    """A one-line SpecError unless `study` runs every spec through both engines."""
    engines = {s.engine for s in study.runs}
    if engines != set(ENGINES):
        raise SpecError(f"{study.path}: a parity study varies `engine: [torchvision, "
                         f"detectron2]`; this one runs {', '.join(sorted(engines))} only")


def num_classes(spec) -> int:
    import json
    from bench.data import registry
    files = registry.resolve(spec.data.dataset)
    return len(json.loads(files.val_annotations.read_text())["categories"])


def parameters(spec) -> int:
    """Parameters of the model `spec`'s engine builds (on the CPU, weights random)."""
    from bench import engines
    return engines.get(spec.engine).parameters(spec, num_classes(spec))


def _measured(rd: RunDir, max_iter: int) -> dict:
    rows = rd.read_metrics()
    # the first train row includes start-up (data workers, allocator): the median skips it
    times = [r["time"] for r in rows if r.get("type") == "train" and "time" in r]
    # the final AP only: an unfinished run's last evaluation is not its result
    final = next((r for r in rows if r.get("type") == "eval" and r["iteration"] == max_iter),
                 {})
    return {"state": rd.read_status().get("state", "queued"),
            "s/iter": statistics.median(times) if times else None,
            "box AP": final.get("bbox/AP"), "mask AP": final.get("segm/AP")}


def _spread(values):
    """{"mean", "min", "max", "n", "of"} of the seeds' values that exist (None when none
    does): n of the `of` seeds have one."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    return {"mean": statistics.fmean(have), "min": min(have), "max": max(have),
            "n": len(have), "of": len(values)}


def rows(study, root, count=parameters):
    """One row per run of the torchvision engine, its seeds pooled, with its detectron2 twin's
    figures beside: parameter counts (`count(spec)`), median s/iter, and final box / mask AP
    as the mean over seeds with their min-max, and the difference of the means (tv - d2),
    given only when every seed of both engines has its final AP."""
    check(study)
    by_key = {}
    for spec in study.runs:
        twin = dataclasses.replace(spec, engine="torchvision", name="", seed=0)
        by_key.setdefault(twin, {}).setdefault(spec.engine, []).append(spec)
    out = []
    for specs in by_key.values():
        tv = specs["torchvision"][0]
        row = {"run": re.sub(r"-seed\d+", "", tv.name),
               "seeds": ",".join(str(s.seed) for s in specs["torchvision"])}
        for tag, engine in (("tv", "torchvision"), ("d2", "detectron2")):
            measured = [_measured(RunDir(root / s.study / s.run_id), s.solver.max_iter)
                        for s in specs[engine]]
            row[f"params {tag}"] = count(specs[engine][0])
            times = [m["s/iter"] for m in measured if m["s/iter"] is not None]
            row[f"s/iter {tag}"] = statistics.median(times) if times else None
            for key in ("box AP", "mask AP"):
                row[f"{key} {tag}"] = _spread([m[key] for m in measured])
            done = sum(m["state"] == "done" for m in measured)
            row[f"state {tag}"] = f"{done}/{len(measured)} done"
        for key in ("box AP", "mask AP"):
            a, b = row[f"{key} tv"], row[f"{key} d2"]
            complete = a and b and a["n"] == a["of"] and b["n"] == b["of"]
            row[f"{key} tv-d2"] = a["mean"] - b["mean"] if complete else None
        out.append(row)
    return out


COLUMNS = ["run", "seeds", "params tv", "params d2", "s/iter tv", "s/iter d2", "box AP tv",
           "box AP d2", "box AP tv-d2", "mask AP tv", "mask AP d2", "mask AP tv-d2", "state tv",
           "state d2"]


def report(studies, root):
    """`bench parity`'s table of each study, after training."""
    for study in studies:
        print(f"\n{study.name}: torchvision (tv) and detectron2 (d2) engines; AP in percent, "
              f"s/iter the median of the train rows")
        print(format_table(rows(study, root)))


def format_table(table) -> str:
    def fmt(column, v):
        if v is None:
            return "-"
        if isinstance(v, dict):  # seeds: mean [min-max], and how many have one if not all
            text = f"{v['mean']:.1f}"
            if v["n"] > 1:
                text += f" [{v['min']:.1f}-{v['max']:.1f}]"
            return text if v["n"] == v["of"] else f"{text} ({v['n']} of {v['of']})"
        if column.endswith("tv-d2"):
            return f"{v:+.1f}"
        if isinstance(v, float):
            return f"{v:.3f}"  # s/iter
        return f"{v:,}" if isinstance(v, int) else str(v)
    cells = [COLUMNS] + [[fmt(c, r.get(c)) for c in COLUMNS] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines + ["AP: mean over the seeds [min-max]; tv-d2: difference of the "
                              "means"])
