"""Checkpoints of a training run: atomic writes, last K kept, fall back when corrupt.

A checkpoint holds everything needed to continue exactly: model, optimizer, LR scheduler,
iteration and RNG states (the data order is a pure function of the iteration, see
bench.data.sampler).
"""

import os
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"^model_(\d{7})\.pth$")


def checkpoint_path(directory, iteration) -> Path:
    return Path(directory) / f"model_{iteration:07d}.pth"


def list_checkpoints(directory):
    """[(iteration, path)] sorted by iteration."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save(directory, iteration, state: dict, keep: int, protect=()):
    """Write atomically, then delete all but the newest `keep` (never those in `protect`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, iteration)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    older = [p for it, p in list_checkpoints(directory) if it not in protect]
    for p in older[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
    return path


def load_latest(directory, log=print):
    """(iteration, state) of the newest readable checkpoint, or (0, None).

    A corrupt newest checkpoint (killed disk, truncated copy) is skipped with a warning and
    the previous one used: losing a period of training beats losing the run.
    """
    for iteration, path in reversed(list_checkpoints(directory)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if state.get("iteration") != iteration:
                raise ValueError(f"holds iteration {state.get('iteration')}")
            return iteration, state
        except Exception as e:  # noqa: BLE001 - any unreadable file means "try the previous"
            msg = f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); using the previous one"
            warnings.warn(msg)
            log(msg)
    return 0, None
