"""Checkpoints of a training run, for every engine: atomic writes, last K kept, fall back
when corrupt.

A torchvision-engine checkpoint holds everything needed to continue exactly: model,
optimizer, LR scheduler, gradient scaler and iteration. No RNG state is needed: the data
order is a pure function of the iteration (bench.data.sampler), and every forward pass
reseeds torch's RNG from the iteration (bench.engines.torchvision.train.pass_seed).

Checkpoints hold tensors and plain containers only, so they are read with
`weights_only=True`: a file that names code to run is unreadable, never run.
"""

import errno
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from bench.rundir import WARNING

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
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _nearly_full(directory)
        tmp.unlink(missing_ok=True)  # a full disk must not leave half a checkpoint behind
        if full and not isinstance(e, KeyboardInterrupt):
            # torch.save reports a full disk as a RuntimeError of its C++ writer
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}") from e
        raise
    older = [p for it, p in list_checkpoints(directory) if it not in protect]
    for p in older[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
    return path


def _nearly_full(directory) -> bool:
    """Measured right after a write failed, before its partial file is removed. (A quota
    that runs out on a roomy file system is not seen here: torch.save's own error then
    stands.)"""
    try:
        return shutil.disk_usage(directory).free < 16 * 2 ** 20
    except OSError:
        return False


class NoReadableCheckpoint(RuntimeError):
    pass


def unreadable_reason(e) -> str:
    """One line for why torch.load refused a file. weights_only's error begins with advice to
    load the file unsafely (with terminal colour codes); its cause is the line naming the
    global the file would call."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    named = next((line for line in lines if "Unsupported global" in line), None)
    if named:  # "... Unsupported global: GLOBAL io.open was not an allowed global ..."
        words = named.split("Unsupported global:", 1)[1].split()
        what = words[1] if len(words) > 1 and words[0] == "GLOBAL" else " ".join(words[:1])
        return f"it names code to run ({what}), which a checkpoint never does"
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_latest(directory, log=print, set_aside=False):
    """(iteration, state) of the newest readable checkpoint, or (0, None) when there is none.

    A corrupt newest checkpoint (killed disk, truncated copy) is skipped with a warning and
    the previous one used: losing a period of training beats losing the run; with
    `set_aside` (the training process, rank 0 only: every rank reads) the unreadable newer
    ones are renamed out of the way. If checkpoints
    exist but none can be read (a storage outage, say), this raises rather than restarting
    the run from iteration 0 and discarding its metrics.
    """
    for stale in Path(directory).glob(".model_*.pth.tmp-*") if Path(directory).is_dir() else []:
        stale.unlink(missing_ok=True)  # left by a process killed while saving
    found, unreadable = list_checkpoints(directory), []
    for iteration, path in reversed(found):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("iteration") != iteration:
                raise ValueError(f"holds iteration {state.get('iteration')}")
        except Exception as e:  # noqa: BLE001 - any unreadable file means "try the previous"
            msg = (f"checkpoint {path} is unreadable ({unreadable_reason(e)}); using the "
                   f"previous one")
            warnings.warn(msg)
            log(f"{WARNING}{msg}")
            unreadable.append(path)
            continue
        # Set the unreadable newer ones aside (kept for a look, no longer model_*.pth): left
        # in place they would count toward checkpoint.keep, and the next save would delete
        # this good one before them.
        for bad in unreadable if set_aside else []:
            try:
                bad.replace(bad.with_name(bad.name + ".unreadable"))
            except FileNotFoundError:
                pass  # already moved
        return iteration, state
    if found:
        raise NoReadableCheckpoint(
            f"none of the {len(found)} checkpoints in {directory} can be read; fix the storage "
            f"and rerun, or delete {directory} to train this run from the start")
    return 0, None
