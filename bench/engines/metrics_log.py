"""What a training session writes besides checkpoints, alike in every engine (rank 0 only):
metrics.jsonl, TensorBoard, and the running status with the time spent."""

import math
import time

from torch.utils.tensorboard import SummaryWriter

from bench.rundir import WARNING


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


def evaluated(rd, iteration: int, world, device) -> bool:
    """Whether metrics.jsonl holds the eval row of `iteration` (rank 0 reads; all agree).
    Engines save an eval iteration's checkpoint before evaluating, so a resume from it
    evaluates first when the row is missing."""
    import torch

    from bench import distributed
    found = world.main and any(r.get("type") == "eval" and r.get("iteration") == iteration
                               for r in rd.read_metrics())
    return distributed.mean(torch.tensor([float(found)], device=device), world).item() > 0


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
