"""The committed copy of a study's numbers: each run dir's spec.yaml, status.json and
metrics.jsonl (a few kB per run), and the per-image results of its last evaluation (for the
intervals over val images; about 100 kB for a mini run), under results/<study>/runs/, so
`make figures` redraws everything from git alone. Checkpoints, logs, TensorBoard files and
the earlier evaluations' per-image results stay in the runs root."""

import shutil
from pathlib import Path

from bench.rundir import RunDir

FILES = ("spec.yaml", "status.json", "metrics.jsonl")


def collect(study_runs: Path, dest: Path) -> int:
    """Mirror the run dirs under `study_runs` into `dest` (runs gone from the source are
    removed); returns the number of runs copied."""
    study_runs, dest = Path(study_runs), Path(dest)
    runs = sorted(p for p in study_runs.iterdir() if (p / "spec.yaml").is_file()) \
        if study_runs.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no run dir under {study_runs}; run `bench run` first, or "
                                f"pass --runs-root")
    dest.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in runs}
    for old in dest.iterdir():
        if old.is_dir() and old.name not in names:
            shutil.rmtree(old)
    for run in runs:
        (dest / run.name).mkdir(exist_ok=True)
        for name in FILES:
            src = run / name
            if name == "metrics.jsonl" and src.is_file():
                # a row being written when we copy is torn: keep whole lines only
                text = src.read_text()
                (dest / run.name / name).write_text(text[:text.rfind("\n") + 1])
            elif src.is_file():
                shutil.copyfile(src, dest / run.name / name)
            else:  # gone from the run dir (a reset run): no stale copy either
                (dest / run.name / name).unlink(missing_ok=True)
        _copy_last_per_image(RunDir(run), RunDir(dest / run.name))
    return len(runs)


def _copy_last_per_image(src: RunDir, dst: RunDir):
    # the last eval of the *copied* metrics (a run still training may have evaluated again
    # since), so the committed rows and per-image file always belong together
    evals = [r["iteration"] for r in dst.read_metrics() if r.get("type") == "eval"] \
        if dst.metrics_file.is_file() else []
    keep = src.per_image_file(max(evals)) if evals else None
    if dst.per_image.is_dir():
        for old in dst.per_image.iterdir():
            if keep is None or old.name != keep.name:
                old.unlink()
    if keep is not None and keep.is_file():
        dst.per_image.mkdir(parents=True, exist_ok=True)
        target = dst.per_image_file(max(evals))
        tmp = target.with_name(target.name + ".tmp")  # never a torn copy under the real name
        shutil.copyfile(keep, tmp)
        tmp.replace(target)
