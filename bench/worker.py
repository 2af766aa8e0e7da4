"""One run in its own process: `python -m bench.worker RUN_DIR`.

The runner writes the resolved spec into the run dir and starts this; the worker reads it,
picks the engine and trains. Exit code 0 means the run is done; anything else, status.json
says why. A multi-GPU run is this module under torchrun (or Slurm), one process per GPU;
rank 0 holds the run dir's lock (bench.distributed).
"""

import argparse
import os
import sys

import torch

from bench import distributed, engines, interrupt, plugins
from bench.rundir import RunBusy, RunDir


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.worker")
    ap.add_argument("run_dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    ap.add_argument("--lock-held", action="store_true",
                    help="the process that started this one holds the run's lock (a Slurm task)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # SIGTERM (runner stopping, preemption) or Ctrl-C: checkpoint the current iteration, exit
    # as queued; the next call resumes there.
    interrupt.install()
    try:
        return train_run(RunDir(args.run_dir), args.device, args.workers,
                         take_lock=not args.lock_held)
    finally:
        distributed.shutdown()


# train_run's results: the runner (or the group loop of bench.group) acts on them
DONE, FAILED, BUSY, FAILED_EVERYWHERE, STOPPED = 0, 1, 3, 4, 130


def train_run(rd: RunDir, device: str, workers: int, take_lock: bool = True) -> int:
    """Train one run dir in this process (one of its processes under DDP); one of the codes
    above. FAILED_EVERYWHERE is a failure every process of the run met at the same point (a
    non-finite mean loss), after which their process group is still in step."""
    spec = rd.read_spec()
    lock = None
    if take_lock and distributed.from_env().main:  # under DDP rank 0 holds it for them all
        try:
            lock = rd.lock()
        except RunBusy as e:
            print(e, file=sys.stderr, flush=True)
            return BUSY
    try:
        plugins.load(spec.plugins)  # e.g. the backbone a recipe registered
        engine = engines.get(spec.engine)
        engine.run(spec, rd.path, device=device, workers=workers,
                   log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt as e:
        where = "there" if isinstance(e, interrupt.Stopped) else "its last checkpoint"
        print(f"{rd.path.name}: interrupted; rerun to resume from {where}", flush=True)
        return STOPPED
    except Exception as e:  # noqa: BLE001 - the runner reads the reason from status.json
        print(f"{rd.path.name}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        in_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if (distributed.from_env().main or in_group) and rd.read_status().get("state") != "failed":
            try:
                rd.write_status("failed", error=f"{type(e).__name__}: {e}")
            except OSError:
                pass  # no space for it: the runner records it once the worker has ended
        return FAILED_EVERYWHERE if getattr(e, "every_process", False) else FAILED
    finally:
        if lock is not None:
            lock.close()
    return DONE


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
