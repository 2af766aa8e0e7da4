"""`bench status`: one row per run of a study, read from its run dir while the study runs.

State, progress, the latest APs, the time left at the run's current speed, the GPU-hours it
has used so far (resumed sessions and work lost to a crash included) and where it runs.
A run marked running whose process is gone (checked when it ran on this machine) shows as
`interrupted`: the next `bench run` resumes it.
"""

import socket
import time
from pathlib import Path

from bench.rundir import RunDir
from bench.procs import running

COLUMNS = ["run", "state", "iteration", "box AP", "mask AP", "ETA", "GPU-h", "where", "updated"]


def _duration(seconds) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _ap(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def row(spec, run_dir, now=None) -> dict:
    now = time.time() if now is None else now
    rd = RunDir(run_dir)
    st = rd.read_status()
    state = st.get("state", "queued")
    here = st.get("host") == socket.gethostname()
    if state == "running" and here and not running(st.get("pid")):
        state = "interrupted"
    it, total = st.get("iteration", 0), spec.solver.max_iter
    evals = [r for r in rd.read_metrics() if r.get("type") == "eval"] if rd.metrics_file.exists() else []
    last = evals[-1] if evals else {}
    eta = "-"
    if state == "running" and st.get("sec_per_iter"):
        eta = _duration((total - it) * st["sec_per_iter"])
    seconds = st.get("train_seconds")
    return {"run": spec.run_id, "state": state, "iteration": f"{it}/{total}",
            # a VOC run's box number is VOC's mAP (voc/AP50)
            "box AP": _ap(last.get("bbox/AP", last.get("voc/AP50"))),
            # a keypoint run's second number is its keypoint AP (it has no mask)
            "mask AP": _ap(last.get("segm/AP", last.get("keypoints/AP"))),
            "ETA": eta, "GPU-h": "-" if seconds is None else f"{seconds * spec.gpus / 3600:.2f}",
            "where": st.get("where") or st.get("host") or "-",
            "updated": f"{_duration(now - st['updated'])} ago" if st.get("updated") else "-",
            "error": st.get("error") if state == "failed" else None,
            "gpu_hours": (seconds or 0.0) * spec.gpus / 3600}


def table(specs, run_dir_of) -> list:
    now = time.time()
    return [row(spec, run_dir_of(spec), now) for spec in specs]


def report(specs, root: Path):
    """Print `bench status`: one row per run, the count per state, GPU-hours used, and each
    failed run's error."""
    from bench.plan import print_table
    from bench.rundir import run_dir_for
    if not root.is_dir():
        raise FileNotFoundError(f"runs root {root} is not a directory (no run has started "
                                f"there); pass the one `bench run` used: --runs-root or "
                                f"$BENCH_RUNS")
    rows = table(specs, lambda s: run_dir_for(s, root))
    print_table(rows, COLUMNS)
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print(f"{len(rows)} runs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
          + f"; {sum(r['gpu_hours'] for r in rows):.2f} GPU-hours used")
    for r in rows:
        if r["error"]:
            print(f"  failed {r['run']}: {r['error']}")
