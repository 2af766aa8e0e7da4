"""The runner only schedules: which run goes on which slot, when, and what after a crash.

Each run is its own process (`python -m bench.worker RUN_DIR`) in its own slot: a GPU, or
on a machine without one a CPU slot of `threads` threads (how the mini study runs). A run
of `gpus` > 1 takes that many slots (distinct GPUs) and is started by torchrun, one worker
process per slot in one process group (bench.distributed). Runs
already done are skipped; interrupted ones resume from their checkpoint; a failed run is
reported and the rest of the study goes on. Progress (iterations of all runs together)
and the ETA come from each run dir's status.json.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from bench.rundir import RunDir


class NoSlots(RuntimeError):
    pass


@dataclass(frozen=True)
class Nodes:
    """A multi-node launch: the same `bench run` command on every node, each with its rank.

    Runs then go one at a time, each spanning every node (gpus / nnodes processes per
    node), in the same order on every node; run dirs must be on storage every node sees.
    """
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def port_for(self, spec) -> int:
        # a port per run (from its id, the same on every node), so that a run never
        # rendezvouses on the socket its predecessor is still closing
        return self.master_port + int(spec.identity(), 16) % 1000


@dataclass
class Job:
    spec: object
    run_dir: Path
    proc: Optional[subprocess.Popen] = None
    slots: List[str] = field(default_factory=list)
    log_file: Optional[object] = None


@dataclass
class Outcome:
    done: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[tuple] = field(default_factory=list)   # (run id, reason)


def run_dir_for(spec, runs_root) -> Path:
    return Path(runs_root) / spec.study / spec.run_id


def is_done(run_dir: Path) -> bool:
    return RunDir(run_dir).read_status().get("state") == "done"


def _cuda_count():
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def default_slots(device: str, threads: int, per_gpu: int = 1) -> List[str]:
    """One slot per GPU (or `per_gpu` small runs sharing each GPU), or cores/threads CPU slots.

    Slot names are `cuda:<id>#<k>`: the id goes to CUDA_VISIBLE_DEVICES of the run.
    """
    if device == "cuda":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(_cuda_count())]
        return [f"cuda:{i}#{k}" for k in range(per_gpu) for i in ids if i != ""]
    cores = os.cpu_count() or 1
    return [f"cpu{k}" for k in range(max(1, cores // max(threads, 1)))]


def _gpu_of(slot: str) -> str:
    return slot.split("#")[0]


def take_slots(free: List[str], n: int) -> Optional[List[str]]:
    """n free slots on distinct GPUs (two processes of one run never share a GPU), or None."""
    taken = []
    for slot in free:
        if _gpu_of(slot) not in {_gpu_of(t) for t in taken}:
            taken.append(slot)
            if len(taken) == n:
                return taken
    return None


def check_fits(specs, slots, device, nodes=Nodes()):
    """Every run must fit: gpus <= the distinct GPUs (or CPU slots) of this machine, or of
    all the nodes of a multi-node launch together (spread evenly over them)."""
    distinct = len({_gpu_of(s) for s in slots})
    for spec in specs:
        if nodes.nnodes > 1:
            if spec.gpus % nodes.nnodes or spec.gpus // nodes.nnodes > distinct:
                raise NoSlots(f"{spec.name} asks for gpus={spec.gpus}, which does not spread "
                              f"over {nodes.nnodes} nodes of {distinct} "
                              f"{'GPU' if device == 'cuda' else 'CPU slot'}(s) each; use a "
                              f"node count that divides it (--nnodes)")
            continue
        if spec.gpus > distinct:
            raise NoSlots(f"{spec.name} asks for gpus={spec.gpus} but this machine has {distinct} "
                          f"{'GPU' if device == 'cuda' else 'CPU slot'}(s); --set gpus={distinct} "
                          f"runs its batch in more passes per GPU (same losses with GN; SyncBN's "
                          f"statistics then span fewer images; a new run id)")


def run(specs, runs_root, device="cpu", slots=None, threads=1, workers=0, log=print,
        progress=True, nodes=Nodes()) -> Outcome:
    """Train every spec, `len(slots)` at a time (one at a time over `nodes`); returns what
    was done, skipped, failed."""
    slots = list(slots or default_slots(device, threads))
    if not slots:
        raise NoSlots(f"no slot to run on: device={device} shows no GPU; use --device cpu, "
                           f"or check CUDA_VISIBLE_DEVICES")
    check_fits(specs, slots, device, nodes)
    outcome = Outcome()
    queue = []
    for spec in specs:
        rd = RunDir(run_dir_for(spec, runs_root))
        rd.write_spec(spec)  # refuses a run dir that holds another spec
        if is_done(rd.path):
            outcome.skipped.append(spec.run_id)
        else:
            queue.append(Job(spec, rd.path))
    # Longest first: the slots finish together instead of one long run trailing alone.
    # (The order is the same on every node of a multi-node launch.)
    queue.sort(key=lambda j: (-j.spec.solver.max_iter, j.spec.run_id))
    jobs = list(queue)
    total = sum(j.spec.solver.max_iter for j in queue)
    already = sum(RunDir(j.run_dir).read_status().get("iteration", 0) for j in queue)
    # Off a terminal (CI, nohup, Slurm logs) redraw rarely instead of flooding the log.
    bar = tqdm(total=total, initial=already, unit="it", desc="study", disable=not progress,
               dynamic_ncols=True, smoothing=0.05, mininterval=0.5 if sys.stderr.isatty() else 30)
    if outcome.skipped:
        log(f"{len(outcome.skipped)} run(s) already done, skipped")
    free, running = list(slots), []
    try:
        while queue or running:
            for job in list(queue):  # the longest run that fits in the free slots
                if nodes.nnodes > 1 and running:
                    break  # across nodes, one run at a time, in the same order everywhere
                job.slots = take_slots(free, job.spec.gpus // nodes.nnodes) or []
                if job.slots:
                    queue.remove(job)
                    free = [f for f in free if f not in job.slots]
                    _launch(job, device, threads, workers, nodes)
                    running.append(job)
            time.sleep(0.5)
            still = []
            for job in running:
                rc = job.proc.poll()
                if rc is None:
                    still.append(job)
                    continue
                job.log_file.close()
                free += job.slots
                status = RunDir(job.run_dir).read_status()
                if rc == 0 and status.get("state") == "done":
                    outcome.done.append(job.spec.run_id)
                else:
                    reason = status.get("error") or f"exit code {rc}, see {job.run_dir / 'log.txt'}"
                    outcome.failed.append((job.spec.run_id, reason))
                    tqdm.write(f"FAILED {job.spec.run_id}: {reason}")
            running = still
            progress_now = sum(min(RunDir(j.run_dir).read_status().get("iteration", 0),
                                   j.spec.solver.max_iter) for j in jobs)
            if progress_now > bar.n:
                bar.set_postfix_str(", ".join(j.spec.name for j in running)[:80], refresh=False)
                bar.update(progress_now - bar.n)
    finally:
        # Whatever ends the loop (Ctrl-C, SIGTERM, an error here), no worker is orphaned: each
        # gets SIGTERM, marks its run queued and exits; the next call resumes it.
        for job in running:
            job.proc.terminate()
        for job in running:
            try:
                job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()
            job.log_file.close()
        bar.close()
    return outcome


def _launch(job, device, threads, workers, nodes=Nodes()):
    env = dict(os.environ)
    dev = device
    if job.slots[0].startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(_gpu_of(s).split(":", 1)[1] for s in job.slots)
        dev = "cuda"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "bench.worker", str(job.run_dir), "--device", dev,
           "--threads", str(threads), "--workers", str(workers)]
    if nodes.nnodes > 1:
        # every node starts its share; torchrun's static rendezvous at node 0's address
        cmd[1:3] = ["-m", "torch.distributed.run", f"--nnodes={nodes.nnodes}",
                    f"--node-rank={nodes.node_rank}", f"--master-addr={nodes.master_addr}",
                    f"--master-port={nodes.port_for(job.spec)}",
                    f"--nproc-per-node={len(job.slots)}", "-m", "bench.worker"]
    elif len(job.slots) > 1:
        # torchrun picks a free port (--standalone), sets RANK/WORLD_SIZE/LOCAL_RANK, and
        # stops the other processes when one fails
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    f"--nproc-per-node={len(job.slots)}", "-m", "bench.worker"]
    job.log_file = open(job.run_dir / "log.txt", "a")
    job.log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} slots {','.join(job.slots)}: "
                       f"{' '.join(cmd)}\n")
    job.log_file.flush()
    job.proc = subprocess.Popen(cmd, stdout=job.log_file, stderr=subprocess.STDOUT, env=env)
