"""Processes of a run, for the runner, Slurm jobs and `bench status`: the one command line
that starts a run's worker(s), and Linux process queries (alive, children, stop, kill)."""

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

# bench.worker's exit code for "another process holds this run's lock" (here so that the
# runner needs no torch to read it; a test checks that the two agree)
BUSY = 3


def worker_command(run_dir, device: str, threads: int, workers: int, nproc: int = 1,
                   nnodes: int = 1, node_rank: int = 0, master_addr: Optional[str] = None,
                   master_port: Optional[int] = None) -> List[str]:
    """`python -m bench.worker RUN_DIR ...`, under torchrun when the run has several
    processes: over nodes, a static rendezvous at node 0's address (every node starts its
    share); on one node, torchrun picks a free port (--standalone), sets RANK / WORLD_SIZE /
    LOCAL_RANK, and stops the other processes when one fails."""
    worker = ["-m", "bench.worker", str(run_dir), "--device", device, "--threads", str(threads),
              "--workers", str(workers)]
    if nnodes > 1:
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
                f"--node-rank={node_rank}", f"--master-addr={master_addr}",
                f"--master-port={master_port}", f"--nproc-per-node={nproc}"] + worker
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                f"--nproc-per-node={nproc}"] + worker
    return [sys.executable] + worker


def is_torchrun(cmd: List[str]) -> bool:
    return cmd[2] == "torch.distributed.run"


def children(pid) -> list:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # not Linux, or gone already
        return []


def running(pid) -> bool:
    """Alive and not a zombie (an exited child nobody has reaped yet), any user's process."""
    try:
        state = Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError, ValueError, TypeError):
        return False
    return state not in ("Z", "X")


def stop_workers(pid, torchrun):
    """Ask a run's worker processes to stop after a checkpoint (SIGTERM, bench.interrupt).

    Under torchrun the workers themselves: torchrun passes SIGTERM on but SIGKILLs them 30 s
    later, and an evaluation in progress may need longer to end."""
    for target in (children(pid) if torchrun else [pid]):
        try:
            os.kill(target, signal.SIGTERM)
        except ProcessLookupError:
            pass


def kill_tree(pid):
    """SIGKILL a process and its descendants (torchrun's workers)."""
    for child in children(pid):
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
