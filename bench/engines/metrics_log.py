"""metrics.jsonl and TensorBoard, written alike by every engine (rank 0 only)."""

import math

from torch.utils.tensorboard import SummaryWriter


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
