"""One run in its own process: `python -m bench.worker RUN_DIR`.

The runner writes the resolved spec into the run dir and starts this; the worker reads it,
picks the engine and trains. Exit code 0 means the run is done; anything else, status.json
says why. A multi-GPU run is this module under torchrun (or Slurm), one process per GPU;
rank 0 holds the run dir's lock (bench.distributed).
"""

import argparse
import fcntl
import os
import signal
import socket
import sys

import torch

from bench import distributed, engines, plugins
from bench.rundir import RunDir


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.worker")
    ap.add_argument("run_dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # SIGTERM (runner stopping, Slurm preemption) becomes KeyboardInterrupt: the run is marked
    # queued again and resumes from its last checkpoint next time.
    signal.signal(signal.SIGTERM, _interrupt)
    rd = RunDir(args.run_dir)
    spec = rd.read_spec()
    # One process per run dir: a second runner (or an orphan of a killed one) must not
    # interleave appends and truncations of the same metrics file. The OS drops the lock
    # when this process dies, however it dies.
    # Under DDP rank 0 takes it for the run's processes.
    if distributed.from_env().main:
        lock = open(rd.path / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            print(f"{rd.path}: another process ({lock.read().strip() or 'unknown'}) is training "
                  f"this run; not starting a second one", file=sys.stderr, flush=True)
            return 3
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
    try:
        plugins.load(spec.plugins)  # e.g. the backbone a recipe registered
        engine = engines.get(spec.engine)
        engine.run(spec, rd.path, device=args.device, workers=args.workers,
                   log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print(f"{rd.path.name}: interrupted; rerun to resume from its last checkpoint", flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the runner reads the reason from status.json
        print(f"{rd.path.name}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        in_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if (distributed.from_env().main or in_group) and rd.read_status().get("state") != "failed":
            rd.write_status("failed", error=f"{type(e).__name__}: {e}")
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
