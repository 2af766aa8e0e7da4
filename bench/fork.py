"""A learning-curve family for the price of its longest run.

Under the paper's schedule rule the LR is constant (after the shared warm-up) until a
schedule's first drop, so a shorter schedule is the same run as a longer one up to that
drop: same weights, same data order (a function of the iteration, bench.data.sampler),
same RNG draws (reseeded per pass from the iteration). Runs that differ only in schedule
length form a family; its longest run is the parent, and every other member (a child) can
start from the parent's checkpoint at the child's first LR drop (its fork point) instead
of from iteration 0. Families come from the resolved RunSpecs, never from names.

The parent saves a checkpoint at every child's fork point and keeps it (`forks.json` in its
run dir lists them; keep-K never deletes them). A child forked from it is a complete run
dir: the parent's checkpoint at the fork point, the parent's metrics rows up to it (marked
`forked_from`), and a status at that iteration; training resumes there as after any stop.

The same holds the other way: two members train alike up to the earlier of their first LR
drops, so a new longest run (a study's schedules made longer) gets a head start from a
finished member already in the study's runs root, at its latest kept checkpoint before that
point (`head_start`): extending a study costs only the iterations it adds.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from bench.rundir import LOG_PERIOD, RunBusy, RunDir, atomic_write_text, run_dir_for

FORKS_FILE = "forks.json"


def family_key(spec) -> str:
    """The identity of a run with its schedule length taken out (within its study): equal
    for family members."""
    solver = dataclasses.replace(spec.solver, schedule="1x", max_iter=0, steps=())
    return f"{spec.study}/{dataclasses.replace(spec, solver=solver).identity()}"


def fork_point(parent, child) -> Optional[int]:
    """The iteration up to which `child` trains exactly as `parent` (its first LR drop), or
    None when it does not (not a shorter member of the same family)."""
    if family_key(parent) != family_key(child) or child.solver.max_iter >= parent.solver.max_iter:
        return None
    if not child.solver.steps:
        return None  # nothing of its own to train past the parent (and no final eval to do)
    f = min(child.solver.steps)
    # identical LR up to f: the parent drops no earlier (warm-up and base LR are shared)
    if f >= child.solver.max_iter or (parent.solver.steps and min(parent.solver.steps) < f):
        return None
    return f


def first_drop(spec) -> int:
    """The last iteration trained at the run's full LR (its end when it never drops)."""
    return min([*spec.solver.steps, spec.solver.max_iter])


def shared_prefix(a, b) -> Optional[int]:
    """The iteration up to which runs `a` and `b` train exactly alike (the earlier of their
    first LR drops), or None when they are not of one family."""
    if family_key(a) != family_key(b):
        return None
    return min(first_drop(a), first_drop(b))


def can_start_from(source, target, f) -> bool:
    """May `target` start at `source`'s state after iteration f? (Both still have training
    of their own left there, and neither has left the shared LR before f.)"""
    shared = shared_prefix(source, target)
    return shared is not None and 0 < f <= shared and f < target.solver.max_iter \
        and f < source.solver.max_iter


def families(specs) -> Dict[str, List[Tuple[object, int]]]:
    """{parent run id: [(child spec, fork iteration), ...]} over `specs`; the parent of a
    family is its longest run (a family whose two longest runs tie has none)."""
    groups: Dict[str, list] = {}
    for spec in specs:
        groups.setdefault(family_key(spec), []).append(spec)
    out = {}
    for members in groups.values():
        members = sorted(members, key=lambda s: -s.solver.max_iter)
        if len(members) < 2 or members[0].solver.max_iter == members[1].solver.max_iter:
            continue
        parent = members[0]
        children = [(c, fork_point(parent, c)) for c in members[1:]]
        children = [(c, f) for c, f in children if f]
        if children:
            out[parent.run_id] = children
    return out


def parent_of(specs) -> Dict[str, Tuple[object, int]]:
    """{child run id: (parent spec, fork iteration)}."""
    by_id = {s.run_id: s for s in specs}
    return {c.run_id: (by_id[p], f) for p, kids in families(specs).items() for c, f in kids}


# -- the parent's side ------------------------------------------------------------------------

def request(parent_dir, iterations):
    """Ask the parent run to save (and keep) checkpoints at these iterations."""
    rd = RunDir(parent_dir)
    rd.path.mkdir(parents=True, exist_ok=True)
    wanted = sorted(set(requested(parent_dir)) | set(int(i) for i in iterations))
    atomic_write_text(rd.path / FORKS_FILE, json.dumps(wanted) + "\n")


def requested(run_dir) -> List[int]:
    """The fork points a run must save and keep ([] when it is nobody's parent)."""
    try:
        return [int(i) for i in json.loads((Path(run_dir) / FORKS_FILE).read_text())]
    except (OSError, ValueError, TypeError):
        return []


# -- the child's side -------------------------------------------------------------------------

class ForkUnavailable(RuntimeError):
    """The parent's checkpoint at the fork point cannot be used; train from the start."""


def has_started(child_dir) -> bool:
    rd = RunDir(child_dir)
    return rd.checkpoints.is_dir() and any(rd.checkpoints.glob("model_*.pth"))


def ready(parent_spec, parent_dir, f) -> bool:
    """Has the parent saved its checkpoint at the fork point, with its rows up to f? Train
    rows are written before a checkpoint; an eval iteration's checkpoint comes before its
    evaluation (so a failed one loses no training), so there the eval row must be in too."""
    from bench import schedule
    from bench.checkpoint import checkpoint_path
    rd = RunDir(parent_dir)
    if not checkpoint_path(rd.checkpoints, f).is_file():
        return False
    return not schedule.is_eval_iteration(parent_spec, f) or any(
        r.get("type") == "eval" and r["iteration"] == f for r in rd.read_metrics())


def fork(parent_spec, parent_dir, child_spec, child_dir, f):
    """Make the child's run dir start at the parent's iteration f. Raises ForkUnavailable
    (one line) when the parent's run dir or checkpoint cannot be used."""
    import torch

    from bench.checkpoint import checkpoint_path
    prd, crd = RunDir(parent_dir), RunDir(child_dir)
    if not can_start_from(parent_spec, child_spec, f):
        raise ForkUnavailable(f"{child_spec.run_id} does not train as {parent_spec.run_id} up "
                              f"to iteration {f}")
    try:
        on_disk = prd.read_spec()
    except Exception as e:  # noqa: BLE001 - missing, unreadable or another spec version
        raise ForkUnavailable(f"parent spec {prd.spec_file} unreadable ({e})") from None
    if on_disk.identity() != parent_spec.identity() or not can_start_from(on_disk, child_spec, f):
        raise ForkUnavailable(f"{prd.spec_file} holds another run than the child's parent")
    source = checkpoint_path(prd.checkpoints, f)
    if not source.is_file():
        raise ForkUnavailable(f"parent checkpoint {source} is missing")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
        if state.get("iteration") != f:
            raise ValueError(f"it holds iteration {state.get('iteration')}")
    except Exception as e:  # noqa: BLE001 - a torn or corrupt file
        from bench.checkpoint import unreadable_reason
        raise ForkUnavailable(f"parent checkpoint {source} is unreadable "
                              f"({unreadable_reason(e)})") from None
    rows = [r for r in prd.read_metrics() if r["iteration"] <= f]
    if not rows or max(r["iteration"] for r in rows) < f - LOG_PERIOD:
        raise ForkUnavailable(f"parent metrics {prd.metrics_file} lack the rows up to {f}")

    crd.write_spec(child_spec)
    # The child's rows and status first, its checkpoint last: a fork cut short leaves no
    # checkpoint, so the child is not "started" and the next call forks it again (a
    # checkpoint without the rows before it would resume with the start of its curve lost).
    with crd.lock():  # nobody trains the child while its run dir is being written
        try:
            _write_child(crd, parent_spec, child_spec, rows, source, f, prd)
        except BaseException:
            # what a child that has not started holds is ours to undo: it trains from 0
            crd.metrics_file.unlink(missing_ok=True)
            crd.status_file.unlink(missing_ok=True)
            raise


def _place(source, target):
    """`source` at `target`, atomically: a hard link where the file system allows (no copy
    of a large file), else a copy."""
    tmp = target.with_name(f".{target.name}.fork-{os.getpid()}")
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_child(crd, parent_spec, child_spec, rows, source, f, prd):
    from bench.checkpoint import checkpoint_path
    # the per-image results of the inherited evaluations, before the rows that announce them
    for row in rows:
        kept = prd.per_image_file(row["iteration"])
        if row.get("type") == "eval" and kept.is_file():
            crd.per_image.mkdir(parents=True, exist_ok=True)
            _place(kept, crd.per_image_file(row["iteration"]))
    marked = [{**r, "forked_from": parent_spec.run_id} for r in rows]
    atomic_write_text(crd.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                for r in marked))
    crd.write_status("queued", iteration=f, max_iter=child_spec.solver.max_iter,
                     forked_from=parent_spec.run_id, fork_iteration=f, train_seconds=0.0)
    crd.checkpoints.mkdir(parents=True, exist_ok=True)
    _place(source, checkpoint_path(crd.checkpoints, f))


def head_start(spec, runs_root, skip=()) -> Optional[Tuple[object, int]]:
    """(finished run, iteration): the latest checkpoint kept by a finished member of `spec`'s
    family in `runs_root` (this study's recipe or an earlier design of it) from which `spec`
    trains on exactly as from 0, or None. Run dirs named in `skip` (still to train: their
    checkpoints may go) and unreadable ones are passed over."""
    from bench.checkpoint import list_checkpoints
    from bench.rundir import is_done
    study = Path(runs_root) / spec.study
    best = None
    for d in sorted(study.iterdir()) if study.is_dir() else []:
        if d.name == spec.run_id or d.name in skip or not d.is_dir() or not is_done(d):
            continue
        try:
            donor = RunDir(d).read_spec()
        except Exception:  # noqa: BLE001 - another spec version or a damaged record: not ours
            continue
        if donor.run_id != d.name:
            continue
        for it, _ in list_checkpoints(RunDir(d).checkpoints):
            if (best is None or it > best[1]) and can_start_from(donor, spec, it) \
                    and ready(donor, d, it):
                best = (donor, it)
    return best


def plan_forks(queue, specs, runs_root, log) -> list:
    """The runner's queued jobs (spec, run_dir, parent, fork_iteration): mark the children
    that will start from their parent's checkpoint, and the longest runs that get a head start
    from a finished member of their family; returns those that must wait for it (the parent
    saves it on its way: fork.request)."""
    from bench.checkpoint import list_checkpoints
    parents = parent_of(specs)  # a finished parent still forks from its kept checkpoints
    allowed = {s.run_id for s in specs}
    queued = {j.spec.run_id for j in queue}
    waiting, starts = [], {}
    for job in queue:  # nobody's child: a head start from a finished member, where one has it
        if job.spec.run_id in allowed and job.spec.run_id not in parents \
                and not has_started(job.run_dir):
            link = head_start(job.spec, runs_root, skip=queued)
            if link is not None:  # a finished run: its checkpoint is there, nothing to wait for
                job.parent, job.fork_iteration = link
                starts[job.spec.run_id] = link[1]
                waiting.append(job)
    for job in queue:
        link = parents.get(job.spec.run_id)
        if link is None or has_started(job.run_dir) or job.spec.run_id not in allowed:
            continue
        parent, f = link
        parent_dir = run_dir_for(parent, runs_root)
        job.parent, job.fork_iteration = parent, f
        if ready(parent, parent_dir, f):
            waiting.append(job)  # forks on the first pass of the loop
            continue
        done = [it for it, _ in list_checkpoints(RunDir(parent_dir).checkpoints)]
        # (a parent with a head start past f never trains through f)
        if parent.run_id in queued and not (done and max(done) > f) \
                and starts.get(parent.run_id, 0) <= f:
            request(parent_dir, [f])
            waiting.append(job)
        elif (other := head_start(job.spec, runs_root, skip=queued)) is not None:
            job.parent, job.fork_iteration = other
            waiting.append(job)
        else:
            job.parent, job.fork_iteration = None, 0
            why = ("it starts past that point" if starts.get(parent.run_id, 0) > f else
                   "trained without forking")
            log(f"{job.spec.run_id}: no checkpoint of {parent.run_id} at its fork point {f} "
                f"({why}); training from the start")
    return waiting


def fork_or_start(job, parent_dir, log):
    """Start queued `job` from its parent's checkpoint, or from 0 when that fails."""
    try:
        fork(job.parent, parent_dir, job.spec, job.run_dir, job.fork_iteration)
        log(f"{job.spec.run_id}: forked from {job.parent.run_id} at iteration "
            f"{job.fork_iteration}")
    except (ForkUnavailable, OSError, RunBusy) as e:  # OSError: a full disk, say
        log(f"{job.spec.run_id}: cannot fork from {job.parent.run_id} ({e}); training from the "
            f"start")
        job.fork_iteration = 0
