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
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from bench import fork, interrupt
from bench.procs import BUSY, is_torchrun, kill_tree, stop_workers, worker_command
from bench.rundir import WARNING, RunBusy, RunDir, is_done, run_dir_for


# How long a stopping runner waits for its runs to checkpoint the iteration they are on
# (an evaluation in progress finishes first); Slurm's own grace period bounds it there.
STOP_GRACE = 300.0


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
    torchrun: bool = False
    parent: Optional[object] = None     # the run it forks from (bench.fork)
    fork_iteration: int = 0
    log_seen: int = 0                   # bytes of log.txt already looked at (_echo_warnings)


@dataclass
class Outcome:
    done: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[tuple] = field(default_factory=list)   # (run id, reason)
    # held by another process (a second `bench run` of the study): not this call's failure
    elsewhere: List[str] = field(default_factory=list)

    def print_summary(self):
        print(f"done {len(self.done)}, skipped (already done) {len(self.skipped)}, "
              f"failed {len(self.failed)}" + (f", trained by another process "
                                              f"{len(self.elsewhere)}" if self.elsewhere else ""))
        for run_id, reason in self.failed:
            print(f"  failed {run_id}: {reason}")
        for run_id in self.elsewhere:
            print(f"  trained by another process: {run_id} (bench status shows how far it is)")


def _cuda_count():
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def default_slots(device: str, threads: int, per_gpu: int = 1, count: int = 0) -> List[str]:
    """One slot per GPU (or `per_gpu` small runs sharing each GPU), or cores/threads CPU slots;
    `count` (--slots) of them when given.

    Slot names are `cuda:<id>#<k>`: the id goes to CUDA_VISIBLE_DEVICES of the run.
    """
    if count:
        slots = default_slots(device, threads, per_gpu)
        if device != "cuda":
            return [f"cpu{k}" for k in range(count)]
        if count > len(slots):
            raise SystemExit(f"bench run: --slots {count} but {len(slots)} GPU slot(s) are "
                             f"visible; share GPUs between small runs with --per-gpu N")
        return slots[:count]
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
        if distinct == 0:
            raise NoSlots(f"no {'GPU' if device == 'cuda' else 'CPU slot'} to run on; "
                          + ("this machine has no CUDA GPU: use --device cpu" if device == "cuda"
                             else "--slots must be at least 1"))
        if spec.gpus > distinct:
            raise NoSlots(f"{spec.name} asks for gpus={spec.gpus} but this machine has {distinct} "
                          f"{'GPU' if device == 'cuda' else 'CPU slot'}(s); --set gpus={distinct} "
                          f"runs its batch in more passes per GPU (same losses with GN; SyncBN's "
                          f"statistics then span fewer images; a new run id)")


def run(specs, runs_root, device="cpu", slots=None, threads=1, workers=0, log=print,
        progress=True, nodes=Nodes(), forking=True) -> Outcome:
    """Train every spec, `len(slots)` at a time (one at a time over `nodes`); returns what
    was done, skipped, failed.

    With `forking` (one node; a bool, or a test of a spec), a shorter schedule of a family
    waits for the longest run's checkpoint at its first LR drop and starts from there
    (bench.fork)."""
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
    allowed = forking if callable(forking) else (lambda spec: bool(forking))
    waiting = fork.plan_forks(queue, [s for s in specs if allowed(s)], runs_root, log) \
        if nodes.nnodes == 1 else []
    queue = [j for j in queue if j not in waiting]
    jobs = queue + waiting
    # progress counts the iterations still to train: a child's start at its fork point is free
    total = sum(j.spec.solver.max_iter - j.fork_iteration for j in jobs)

    def trained():
        return sum(max(min(RunDir(j.run_dir).read_status().get("iteration", 0),
                           j.spec.solver.max_iter) - j.fork_iteration, 0) for j in jobs)
    already = trained()
    # Off a terminal (CI, nohup, Slurm logs) redraw rarely instead of flooding the log.
    bar = tqdm(total=total, initial=already, unit="it", desc="study", disable=not progress,
               dynamic_ncols=True, smoothing=0.05, mininterval=0.5 if sys.stderr.isatty() else 30)
    if outcome.skipped:
        log(f"{len(outcome.skipped)} run(s) already done, skipped")
    free, running = list(slots), []
    try:
        while queue or running or waiting:
            for job in list(waiting):  # a child starts once its parent saved the fork point
                parent_dir = run_dir_for(job.parent, runs_root)
                # (a parent with a head start of its own waits here too, for one pass)
                parent_busy = any(j.spec.run_id == job.parent.run_id
                                  for j in queue + running + waiting)
                if fork.ready(job.parent, parent_dir, job.fork_iteration) or not parent_busy:
                    waiting.remove(job)
                    fork.fork_or_start(job, parent_dir, log)
                    queue.append(job)
                    queue.sort(key=lambda j: (-j.spec.solver.max_iter, j.spec.run_id))
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
                _echo_warnings(job)
                if rc is None:
                    still.append(job)
                    continue
                job.log_file.close()
                free += job.slots
                status = RunDir(job.run_dir).read_status()
                if rc == 0 and status.get("state") == "done":
                    outcome.done.append(job.spec.run_id)
                elif rc == BUSY or (rc != 0 and _held_elsewhere(job.run_dir)):
                    # (under torchrun a busy rank 0's code 3 arrives as torchrun's 1)
                    outcome.elsewhere.append(job.spec.run_id)
                    tqdm.write(f"{job.spec.run_id}: trained by another process, left to it")
                else:
                    reason = status.get("error") or _exit_reason(rc, job.run_dir)
                    outcome.failed.append((job.spec.run_id, reason))
                    if rc > 0 and status.get("state") == "running":
                        _record_failure(job.run_dir, reason)
                    tqdm.write(f"FAILED {job.spec.run_id}: {reason}")
            running = still
            progress_now = trained()
            if progress_now > bar.n:
                bar.set_postfix_str(", ".join(j.spec.name for j in running)[:80], refresh=False)
                bar.update(progress_now - bar.n)
    finally:
        # Whatever ends the loop (Ctrl-C, SIGTERM, an error here), no worker is orphaned: each
        # gets SIGTERM, saves a checkpoint at the iteration it is on, marks its run queued
        # and exits; the next call resumes it there. Ctrl-C again stops them at once.
        bar.close()
        _stop(running, log)
    return outcome


def _stop(running, log, grace=STOP_GRACE):
    if not running:
        return
    log(f"stopping {len(running)} run(s) after their current iteration's checkpoint "
        f"(up to {grace:.0f} s; Ctrl-C again to stop at once)")
    for job in running:
        stop_workers(job.proc.pid, torchrun=job.torchrun)
    deadline = time.time() + grace
    try:
        for job in running:
            try:
                job.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for job in running:
            if job.proc.poll() is None:  # resumes from its previous checkpoint instead
                kill_tree(job.proc.pid)
                job.proc.wait()
            job.log_file.close()


def _held_elsewhere(run_dir) -> bool:
    """Whether another process holds the run's lock now (its workers have all ended)."""
    try:
        RunDir(run_dir).lock().close()
    except RunBusy:
        return True
    except OSError:
        pass
    return False


def _record_failure(run_dir, reason):
    """A worker that failed but could not say so (its disk was full) leaves its status at
    running: record the failure now, if there is room by now, and only while no other
    process holds the run (a status at done, queued or failed is left as it is)."""
    rd = RunDir(run_dir)
    try:
        lock = rd.lock()
    except (RunBusy, OSError):
        return
    try:
        if rd.read_status().get("state") == "running":
            rd.write_status("failed", error=reason)
    except OSError:
        pass  # still full: bench status shows the run as interrupted
    finally:
        lock.close()


def _echo_warnings(job):
    """Show on the console the warnings a worker logged since the last look (a corrupt
    checkpoint skipped, a run trained again from 0): log.txt alone is read too late."""
    try:
        with open(job.run_dir / "log.txt", "rb") as f:
            f.seek(job.log_seen)
            new = f.read()
    except OSError:
        return
    whole = new[:new.rfind(b"\n") + 1]  # a line still being written waits for the next look
    job.log_seen += len(whole)
    for line in whole.decode(errors="replace").splitlines():
        if line.startswith(WARNING):
            tqdm.write(f"{job.spec.run_id}: {line}")


def _exit_reason(rc: int, run_dir: Path) -> str:
    """Why a worker ended without recording a failure, in one line: its signal, or the
    last line it logged (e.g. another process holds the run)."""
    log = Path(run_dir) / "log.txt"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}; rerun to resume it from its last checkpoint (log: {log})"
    try:
        last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        last = []
    tail = f": {last[-1].strip()[:300]}" if last else ""
    return f"exit code {rc}{tail} (log: {log})"


def _launch(job, device, threads, workers, nodes=Nodes()):
    env = dict(os.environ)
    dev = device
    if job.slots[0].startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(_gpu_of(s).split(":", 1)[1] for s in job.slots)
        dev = "cuda"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = worker_command(job.run_dir, dev, threads, workers, nproc=len(job.slots),
                         nnodes=nodes.nnodes, node_rank=nodes.node_rank,
                         master_addr=nodes.master_addr, master_port=nodes.port_for(job.spec)
                         if nodes.nnodes > 1 else None)
    job.torchrun = is_torchrun(cmd)
    if nodes.node_rank == 0:  # for `bench status`
        RunDir(job.run_dir).update_status(where=f"{socket.gethostname()} {','.join(job.slots)}"
                                          + (f" (+{nodes.nnodes - 1} nodes)" if nodes.nnodes > 1
                                             else ""))
    job.log_file = open(job.run_dir / "log.txt", "a")
    job.log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} slots {','.join(job.slots)}: "
                       f"{' '.join(cmd)}\n")
    job.log_file.flush()
    job.log_seen = job.log_file.tell()
    job.proc = subprocess.Popen(cmd, stdout=job.log_file, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=interrupt.quiet_launcher if job.torchrun else None)
