"""The run-dir side of training, one for every engine (bench.rundir's format).

An engine's trainer keeps its model, data and SGD step; after each step it hands this session
what the step measured (time, data time, loss terms, LR, whether a stop was asked) and the
session does the rest, the same way for every engine: train rows every LOG_PERIOD iterations
(the loss terms averaged since the previous row; the open window travels in the checkpoint,
so a resumed run logs exactly the rows an uninterrupted one does), status writes, the
checkpoint / evaluate / stop decision, the checkpoints shorter schedules fork from
(bench.fork), eval rows with the per-image results before them, and the end of the run.
Only rank 0 writes; every process calls the same methods in the same order, so collective
steps (evaluation, barriers) line up.
"""

import math
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from bench import checkpoint, distributed, fork, interrupt, per_image, schedule
from bench.rundir import LOG_PERIOD, WARNING


class MetricsLog:
    """Call with a row dict: appended to metrics.jsonl, its numbers to TensorBoard."""

    def __init__(self, rd, start: int, main: bool = True):
        self.rd, self.board = rd, None
        if main:
            # purge_step drops events a killed run logged after the checkpoint it resumes
            # from, as RunDir.truncate_metrics does for metrics.jsonl.
            self.board = SummaryWriter(str(rd.path / "tensorboard"), purge_step=start + 1)

    def __call__(self, row: dict):
        if self.board is None:
            return
        self.rd.append_metrics(row)
        for key, value in row.items():
            if key not in ("type", "iteration", "wall") and isinstance(value, (int, float)) \
                    and math.isfinite(value):
                self.board.add_scalar(f"{row['type']}/{key}", value, row["iteration"])
        self.board.flush()

    def close(self):
        if self.board is not None:
            self.board.close()


def evaluated(rd, iteration: int, world, device, kind: str = "eval") -> bool:
    """Whether metrics.jsonl holds the `kind` row ("eval", or "eval_tta": the test-time
    augmented evaluation) of `iteration` (rank 0 reads; all agree). An eval iteration's
    checkpoint is saved before the evaluation, so a resume from it evaluates first when the
    row is missing."""
    found = world.main and any(r.get("type") == kind and r.get("iteration") == iteration
                               for r in rd.read_metrics())
    return distributed.mean(torch.tensor([float(found)], device=device), world).item() > 0


def _clean(value):
    # NaN (a COCO size range without ground truth) is written as null: strict JSON readers
    # choke on NaN
    return None if isinstance(value, float) and math.isnan(value) else value


class RunSession:
    """One training session of run dir `rd`, from iteration `start` (0, or the checkpoint
    `state` resumed from).

    The engine passes `engine_state()` (what its checkpoints hold besides the iteration, the
    open log window and the run id) and `evaluate()` ((stats, per-image results) on rank 0,
    anything elsewhere; every process calls it) to `open`, then calls `step` after each SGD
    step and `finish` at the end. `reached` is how far the run got, for a failure's status.
    """

    def __init__(self, spec, rd, world, device, start: int, state, log=print):
        self.spec, self.rd, self.world, self.device, self.log = spec, rd, world, device, log
        self.start = self.reached = start
        logged = (state or {}).get("log_window", {"n": 0, "losses": {}})
        self.n, self.losses = logged["n"], dict(logged["losses"])
        self.time = self.data_time = 0.0
        self.timed = 0  # steps timed in this session's window (time is not carried over)
        # the evaluations of the resumed iteration its checkpoint was saved before
        self.pending_eval = [kind for kind in self.evaluations(start)
                             if state is not None and not evaluated(rd, start, world, device,
                                                                    kind)]
        # shorter schedules of this run's family start from its checkpoints at their first
        # LR drop: save those too, and keep them
        self.fork_points = set(fork.requested(rd.path))
        self.log_row = None

    def evaluations(self, done: int):
        """The rows iteration `done` evaluates: "eval" at each eval iteration, and at the
        last one "eval_tta" too when the spec asks for test-time augmentation (detectron2
        also tests with augmentation once, after training)."""
        if not schedule.is_eval_iteration(self.spec, done):
            return []
        return ["eval"] + (["eval_tta"] if self.spec.eval.tta
                           and done == self.spec.solver.max_iter else [])

    def nothing_left(self) -> bool:
        """True (status done) when the checkpoint resumed from is the last and evaluated."""
        max_iter = self.spec.solver.max_iter
        if self.start < max_iter or self.pending_eval:
            return False
        if self.world.main:
            self.rd.truncate_metrics(self.start)
            self.rd.write_status("done", iteration=self.start, max_iter=max_iter)
        return True

    def open(self, train_images: int, engine_state, evaluate):
        """Rows past the checkpoint dropped, status "running", the pending evaluation of the
        resumed iteration done."""
        self.engine_state, self.evaluate = engine_state, evaluate
        self.log_row, self.spent = open_session(self.rd, self.start, self.spec.solver.max_iter,
                                                train_images, self.world.main, self.log)
        if self.pending_eval:
            self.log(f"evaluating iteration {self.start}: its checkpoint was saved, its "
                     f"evaluation ({', '.join(self.pending_eval)}) was not")
            self.evaluate_at(self.start, self.pending_eval)

    def save(self, iteration: int):
        if not self.world.main:
            return
        checkpoint.save(self.rd.checkpoints, iteration, {
            **self.engine_state(), "iteration": iteration,
            "log_window": {"n": self.n, "losses": dict(self.losses)},
            "run_id": self.spec.run_id}, keep=self.spec.checkpoint.keep,
            protect=self.fork_points)

    def evaluate_at(self, done: int, kinds=None):
        for kind in self.evaluations(done) if kinds is None else kinds:
            augmented = kind == "eval_tta"
            out = self.evaluate(tta=True) if augmented else self.evaluate()
            if not self.world.main:
                continue
            stats, kept = out
            extra = {}
            if augmented:  # what the numbers were made with (a row of its own kind)
                e = self.spec.eval
                extra = {"tta": {"min_sizes": list(e.tta_min_sizes),
                                 "max_size": e.tta_max_size, "flip": e.tta_flip}}
            else:  # the bootstrap's per-image results: plain evaluations only
                per_image.save(self.rd.per_image_file(done), kept)  # before the row
            self.log_row({"type": kind, "iteration": done,
                          "images_seen": done * self.spec.solver.batch, "wall": time.time(),
                          **{k: _clean(v) for k, v in stats.items()}, **extra})

    def step(self, done: int, seconds: float, data_seconds, losses, lr, stop: bool):
        """After the SGD step that completed iteration `done`: `seconds` it took with its data, `data_seconds` of them waiting
        for data, its loss terms (None where this process does not read them), the LR it
        trained with (a number, or a function asked only when a row is written), and whether
        a stop was asked (the same on every process). Writes what is due; raises
        interrupt.Stopped after saving when asked to stop."""
        solver, world = self.spec.solver, self.world
        self.reached = done
        self.time += seconds
        self.data_time += data_seconds or 0.0
        self.timed += 1
        self.n += 1
        for k, v in (losses or {}).items():
            self.losses[k] = self.losses.get(k, 0.0) + v

        if done % LOG_PERIOD == 0 or done == solver.max_iter:
            if world.main:
                row = {"type": "train", "iteration": done, "images_seen": done * solver.batch,
                       "lr": lr() if callable(lr) else lr, "time": self.time / self.timed,
                       "data_time": self.data_time / self.timed, "wall": time.time(),
                       **{k: v / self.n for k, v in self.losses.items()}}
                if self.device.type == "cuda":
                    row["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
                self.log_row(row)
                self.rd.write_status("running", iteration=done, max_iter=solver.max_iter,
                                     sec_per_iter=row["time"], train_seconds=self.spent())
            self.n, self.losses = 0, {}
            self.time = self.data_time = 0.0
            self.timed = 0

        # an eval iteration's checkpoint first: a failed evaluation loses no training
        evaluates = bool(self.evaluations(done))
        if (done % self.spec.checkpoint.period == 0 or done == solver.max_iter
                or done in self.fork_points or stop or evaluates):
            self.save(done)
        if evaluates:
            self.evaluate_at(done)
        if stop and done < solver.max_iter:
            self.log(f"stopped at iteration {done} on request, checkpoint saved; rerun to resume")
            if world.main:
                self.rd.write_status("queued", iteration=done, max_iter=solver.max_iter,
                                     train_seconds=self.spent())
            distributed.barrier(world)  # the others wait for rank 0's checkpoint
            raise interrupt.Stopped(f"stopped at iteration {done}")

    def close(self):
        if self.log_row is not None:
            self.log_row.close()

    def finish(self):
        """Status done; every process leaves together."""
        self.close()
        max_iter = self.spec.solver.max_iter
        if self.world.main:
            self.rd.write_status("done", iteration=max_iter, max_iter=max_iter,
                                 finished=time.time(), train_seconds=self.spent())
        distributed.barrier(self.world)

    def failed(self, e: BaseException):
        """Mark how far the run got on an exception leaving training (recording_failure
        writes it to the failed status), unless the engine already said."""
        if getattr(e, "iteration_done", None) is None:
            e.iteration_done = self.reached


def open_session(rd, start: int, max_iter: int, train_images: int, main: bool = True,
                 log=print):
    """Start a training session of run dir `rd` at iteration `start`: metrics rows past the
    checkpoint dropped, status "running". Returns (MetricsLog, spent): spent() is the
    wall-clock seconds of every session of the run so far, work a crash threw away included
    (what `bench status` counts as GPU-hours)."""
    spent_before, session_start = rd.read_status().get("train_seconds", 0.0), time.time()

    def spent():
        return spent_before + time.time() - session_start

    if main:
        rd.remove_stale_temp_files()
        reached = max([rd.read_status().get("iteration") or 0]
                      + [r.get("iteration", 0) for r in rd.read_metrics()])
        if start == 0 and reached > 0:
            log(f"{WARNING}{rd.path.name} had reached iteration {reached} but has no "
                f"checkpoint to resume from in {rd.checkpoints}: training it again from "
                f"iteration 0 (its metrics rows are replaced)")
        rd.truncate_metrics(start)
        rd.write_status("running", iteration=start, max_iter=max_iter, started=time.time(),
                        train_images_used=train_images, train_seconds=spent())
    return MetricsLog(rd, start, main), spent
