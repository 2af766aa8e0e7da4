"""The paper's schedule rule: iterations, LR drops, LR and warm-up for a named schedule.

* `Nx` is N times the 1x length (90k iterations at batch 16, about 12.17 COCO epochs).
* For 2x and longer the LR drops 10x at the last 60k and at the last 20k iterations,
  whatever the total length (He et al. 2019, Sec. 4): the reduced-LR phases always get the
  same number of iterations, so schedules differ only in how long they stay at the high LR.
* Shorter than 2x (1x, 0.5x...) keeps Detectron's standard 1x shape: drops at 2/3 and 8/9 of
  the run (60k and 80k of 90k), because "last 60k" would not fit in them.
* A batch other than `ref_batch` scales LR linearly and iterations and drops inversely
  (Goyal et al. 2017), exactly as detectron2's 9x config at batch 64: 202.5k iterations,
  drops at 187.5k and 197.5k, LR 0.08.
* The mini study keeps the same rule with a smaller `unit_iters` (and drops scaled with it).
"""

import re
from dataclasses import replace

from bench.spec import SolverSpec, SpecError

_NAMED = re.compile(r"^(\d+(?:\.\d+)?)x$")
_EXPLICIT = re.compile(r"^(\d+)iter$")


def _exact(value: float, what: str, fix: str) -> int:
    if abs(value - round(value)) > 1e-6:
        raise SpecError(f"{what} comes to {value:g} iterations, not a whole number; {fix}")
    return int(round(value))


def resolve(solver: SolverSpec) -> SolverSpec:
    """Fill max_iter, steps and lr from the schedule inputs."""
    scale = solver.ref_batch / solver.batch
    m_named, m_explicit = _NAMED.match(solver.schedule), _EXPLICIT.match(solver.schedule)
    if m_named:
        ref_total = float(m_named.group(1)) * solver.unit_iters
        if float(m_named.group(1)) >= 2:
            ref_steps = [ref_total - d for d in solver.drops_from_end]
        else:
            ref_steps = [ref_total * 2 / 3, ref_total * 8 / 9]
        max_iter = _exact(ref_total * scale, f"schedule {solver.schedule} at batch {solver.batch}",
                          "choose a batch that divides the reference schedule"
                          if scale != 1 else "choose solver.unit_iters it multiplies to a whole "
                          "number")
    elif m_explicit:
        # An explicit length is at the run's own batch; drops follow the rule, scaled.
        max_iter = int(m_explicit.group(1))
        ref_total = max_iter / scale
        ref_steps = [ref_total - d for d in solver.drops_from_end]
    else:
        raise SpecError(f"solver.schedule: {solver.schedule!r} is not a schedule; allowed: "
                        f"'<N>x' (e.g. 1x, 3x, 6x, 0.5x) or '<N>iter' (e.g. 5000iter)")
    steps = tuple(_exact(s * scale, f"an LR drop of {solver.schedule} at batch {solver.batch}",
                         "a 1x drops the LR at 2/3 and 8/9 of solver.unit_iters (choose one "
                         "divisible by 9) and longer schedules at solver.drops_from_end; the "
                         "batch must divide them too") for s in ref_steps)
    if any(s <= 0 for s in steps):
        raise SpecError(f"solver.schedule: {solver.schedule} is shorter than its LR drops "
                        f"{tuple(solver.drops_from_end)} from the end; use a longer schedule")
    return replace(solver, max_iter=max_iter, steps=tuple(sorted(steps)),
                   lr=solver.base_lr * solver.batch / solver.ref_batch)


def is_eval_iteration(spec, done: int) -> bool:
    """Whether a run evaluates after iteration `done`: every eval.period, and at the end."""
    return bool(spec.eval.period and done % spec.eval.period == 0) or \
        done == spec.solver.max_iter


def lr_factor(solver: SolverSpec, iteration: int) -> float:
    """Multiplier of solver.lr at `iteration` (0-based): linear warm-up, then steps."""
    factor = solver.gamma ** sum(1 for s in solver.steps if iteration >= s)
    if iteration < solver.warmup_iters:
        alpha = iteration / solver.warmup_iters
        factor *= solver.warmup_factor * (1 - alpha) + alpha
    return factor
