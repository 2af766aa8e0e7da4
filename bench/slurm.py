"""Slurm: every run of a study is one Slurm job, submitted through submitit.

The job starts the same worker as a local run: `python -m bench.worker RUN_DIR` for a
one-process run, torchrun for several (one submitit task per node; torchrun's static
rendezvous at the job's first node, port from the job id). A preemption or the time limit
reaches the job as SIGUSR2 (submitit asks Slurm for it `signal_delay_s` before the end);
submitit then calls `RunJob.checkpoint`, which asks the workers to stop (SIGTERM: they save a
checkpoint at the iteration they are on, bench.interrupt) and hands submitit the same job
back, which it requeues. The requeued job (same id) resumes from that checkpoint, as any
rerun does. A job that ends any other way (scancel, node failure) leaves the run queued or
failed; the next `bench run --slurm` submits it again. Job ids live in the run's status.
"""

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench import interrupt
from bench.rundir import RunBusy, RunDir
from bench.procs import (children, is_torchrun, kill_tree, running, stop_workers,
                         worker_command)

# How long a job gets between the warning signal and Slurm's SIGKILL at its time limit:
# time for the iteration in progress (or an evaluation) to end and its checkpoint to be saved.
SIGNAL_DELAY_S = 240


def add_arguments(g):
    """`bench run`'s Slurm options (argparse group `g`); options_from reads them back."""
    g.add_argument("--slurm", action="store_true",
                   help="submit each unfinished run as a Slurm job (submitit) instead")
    g.add_argument("--partition", dest="slurm_partition", metavar="NAME")
    g.add_argument("--account", dest="slurm_account", metavar="NAME")
    g.add_argument("--qos", dest="slurm_qos", metavar="NAME")
    g.add_argument("--constraint", dest="slurm_constraint", metavar="FEATURES")
    g.add_argument("--time", dest="slurm_time", type=int, metavar="MINUTES",
                   help="per job (default 4320); a run that needs longer requeues itself")
    g.add_argument("--gpus-per-node", dest="slurm_gpus_per_node", type=int, metavar="N",
                   help="default 8; 0 for CPU nodes")
    g.add_argument("--cpus-per-gpu", dest="slurm_cpus_per_gpu", type=int, metavar="N",
                   help="default 8")
    g.add_argument("--mem-gb", dest="slurm_mem_gb", type=int, metavar="GB", help="per node")
    g.add_argument("--no-wait", action="store_true",
                   help="return once submitted (`bench status` follows the runs)")


def options_from(args) -> dict:
    """The SlurmOptions values given on the command line (the rest: recipe or default)."""
    return {k: getattr(args, f"slurm_{k}") for k in SlurmOptions.fields()
            if getattr(args, f"slurm_{k}", None) is not None}


@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the jobs run; never part of a run's identity (set from CLI or a recipe)."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time: int = 72 * 60            # minutes per job; a longer run requeues itself at the limit
    gpus_per_node: int = 8         # 0: CPU-only nodes, each of a run's `gpus` is a CPU process
    cpus_per_gpu: int = 8          # CPU cores per process (data loading; CPU threads without GPUs)
    mem_gb: Optional[int] = None   # per node; None: the partition's default
    max_timeouts: int = 100        # requeues at the time limit before giving up (preemption: any)
    signal_delay_s: int = SIGNAL_DELAY_S

    @classmethod
    def fields(cls):
        return [f.name for f in dataclasses.fields(cls)]

    def updated(self, values: dict, where: str) -> "SlurmOptions":
        """These options with `values` (a recipe's `slurm:` or the CLI's) applied, checked."""
        out = {}
        for key, value in values.items():
            if key not in self.fields():
                raise ValueError(f"{where}: unknown key slurm.{key}; allowed: "
                                 f"{', '.join(self.fields())}")
            if value is None:
                continue
            default = getattr(SlurmOptions, key)
            if isinstance(default, int) or key == "mem_gb":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{where}: slurm.{key}: {value!r} is not a whole number >= 0")
            elif not isinstance(value, str) or not value:
                raise ValueError(f"{where}: slurm.{key}: {value!r} is not a name")
            out[key] = value
        if out.get("time", self.time) < 1:
            raise ValueError(f"{where}: slurm.time: must be at least 1 minute")
        return dataclasses.replace(self, **out)

    def layout(self, spec):
        """(nodes, processes per node) for a run of `spec.gpus` processes."""
        if self.gpus_per_node == 0 or spec.gpus <= self.gpus_per_node:
            return 1, spec.gpus
        if spec.gpus % self.gpus_per_node:
            raise ValueError(f"{spec.name} asks for gpus={spec.gpus}, which does not fill whole "
                             f"nodes of slurm.gpus_per_node={self.gpus_per_node}; use a multiple")
        return spec.gpus // self.gpus_per_node, self.gpus_per_node


class SubmitError(RuntimeError):
    pass


def missing() -> Optional[str]:
    """None if jobs can be submitted from here, else why not (one line)."""
    if shutil.which("sbatch") is None:
        return "sbatch not found: run `bench run --slurm` on a machine of the Slurm cluster"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed; `pip install submitit` (a dependency of bench)"
    return None


class RunJob:
    """The callable a Slurm job runs: one run's worker(s) on this node; requeued on preemption."""

    def __init__(self, run_dir, device, threads, nnodes, nproc_per_node, stop_wait_s):
        self.run_dir = str(run_dir)
        self.device = device
        self.threads = threads
        self.nnodes = nnodes
        self.nproc_per_node = nproc_per_node
        self.stop_wait_s = stop_wait_s
        self._proc = None

    def __getstate__(self):  # a running process is not part of what submitit pickles
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def _command(self, env) -> list:
        # the port: the same on every node of the job
        return worker_command(self.run_dir, self.device, self.threads,
                              0 if self.device == "cpu" else 4, nproc=self.nproc_per_node,
                              nnodes=self.nnodes, node_rank=env.node,
                              master_addr=env.hostnames[0] if self.nnodes > 1 else None,
                              master_port=20000 + int(env.job_id) % 20000
                              if self.nnodes > 1 else None)

    def __call__(self):
        import submitit
        env = submitit.JobEnvironment()
        rd = RunDir(self.run_dir)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        lock = None
        if env.global_rank == 0:
            # The job's first task holds the run (its worker is told so): a duplicate job of
            # a run that is already training ends here, before it touches the run's status.
            try:
                lock = rd.lock()
            except RunBusy as e:
                raise RuntimeError(str(e)) from None
            rd.update_status(slurm_job=env.job_id, slurm_restarts=restarts,
                             where=f"slurm job {env.job_id} on {','.join(env.hostnames)}")
        try:
            rc = self._train(env, rd, restarts)
        finally:
            if lock is not None:
                lock.close()
        status = rd.read_status()
        if rc == 0 and status.get("state") == "done":
            return {"state": "done", "iteration": status.get("iteration")}
        if status.get("state") == "failed":
            raise RuntimeError(f"{rd.path.name} failed: {status.get('error')}")
        if env.global_rank != 0:
            return None  # the job's first task reports and requeues
        if status.get("state") == "queued":
            # Stopped on a signal (torchrun reports it as a failure of its workers): Slurm's
            # SIGTERM of a preemption or time limit comes with our USR2, which requeues this
            # job from checkpoint() while we wait here.
            time.sleep(self.stop_wait_s)
            raise RuntimeError(f"{rd.path.name} stopped at iteration {status.get('iteration')} "
                               f"without a requeue (scancel?); `bench run --slurm` resubmits it")
        raise RuntimeError(f"{rd.path.name}: worker exit code {rc}, see {rd.path / 'log.txt'}")

    def _train(self, env, rd, restarts) -> int:
        cmd = self._command(env)
        if env.global_rank == 0:
            cmd.append("--lock-held")
        with open(rd.path / "log.txt", "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} slurm job {env.job_id} "
                      f"(restart {restarts}) node {env.node}: {' '.join(cmd)}\n")
            log.flush()
            env_vars = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
            # Slurm's USR2 and SIGTERM reach every process of the job: torchrun would die of
            # USR2 and SIGKILL its workers 30 s after a SIGTERM, so it ignores them (its
            # workers install their own handlers). A lone worker keeps the defaults: a signal
            # before its handlers are in place ends it with nothing yet to save.
            torchrun = is_torchrun(cmd)
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env_vars,
                                          preexec_fn=interrupt.quiet_launcher if torchrun else None)
            # poll, not wait(): submitit's USR2 handler (checkpoint) runs in this thread
            while self._proc.poll() is None:
                time.sleep(1)
            return self._proc.returncode

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on preemption or at the time limit, then requeues what it returns."""
        import submitit
        proc = self._proc
        # This runs in a signal handler that may have interrupted Popen.poll() holding its
        # lock: wait on the process id, never through Popen.
        if proc is not None and running(proc.pid):
            torchrun = self.nnodes > 1 or self.nproc_per_node > 1
            if torchrun and not children(proc.pid):
                torchrun = False  # its workers are not started yet: torchrun itself ends
                os.kill(proc.pid, signal.SIGKILL)
            stop_workers(proc.pid, torchrun=torchrun)
            if not _exited(proc.pid, self.stop_wait_s):
                kill_tree(proc.pid)  # the requeued job resumes from the previous checkpoint
                _exited(proc.pid, 30)
        fresh = type(self).__new__(type(self))
        fresh.__setstate__(self.__getstate__())
        return submitit.helpers.DelayedSubmission(fresh)


def _exited(pid, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# -- submitting and following, on the login node ------------------------------------------

ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
          "SUSPENDED", "CONFIGURING", "COMPLETING", "STOPPED", "SIGNALING", "STAGE_OUT")


UNKNOWN = "UNKNOWN"  # Slurm did not answer: ask again later, never act on it


def job_state(job_id) -> str:
    """The job's Slurm state (squeue while it is known there, else sacct); '' once the job is
    out of sight (ended, accounting off); UNKNOWN when Slurm did not answer."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"],
                             capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
        if out.returncode != 0 and "invalid job id" not in out.stderr.lower():
            return UNKNOWN
        out = subprocess.run(["sacct", "-j", str(job_id), "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    states = out.stdout.split() if out.returncode == 0 else []
    return states[-1].split()[0] if states else ""


@contextlib.contextmanager
def _stderr_captured():
    """sbatch writes its refusal to our stderr (submitit does not capture it): keep it for the
    one-line error instead."""
    holder = types.SimpleNamespace(text="")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield holder
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            holder.text = tmp.read().decode(errors="replace")


def submit(spec, run_dir, options: SlurmOptions) -> str:
    """Submit one run as a Slurm job (unless its last job is still active); its job id."""
    import submitit
    rd = RunDir(run_dir)
    last = rd.read_status().get("slurm_job")
    if last and job_state(last) in ACTIVE + (UNKNOWN,):
        return str(last)  # still queued or running (or Slurm did not say: never a duplicate)
    nnodes, nproc = options.layout(spec)
    device = "cuda" if options.gpus_per_node else "cpu"
    executor = submitit.SlurmExecutor(folder=rd.path / "slurm", max_num_timeout=options.max_timeouts)
    params = dict(job_name=spec.name, time=options.time, nodes=nnodes, ntasks_per_node=1,
                  cpus_per_task=options.cpus_per_gpu * nproc,
                  signal_delay_s=options.signal_delay_s, partition=options.partition,
                  account=options.account, qos=options.qos, constraint=options.constraint,
                  mem=f"{options.mem_gb}GB" if options.mem_gb else None,
                  gpus_per_node=nproc if options.gpus_per_node else None)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    try:
        with _stderr_captured() as said:
            job = executor.submit(RunJob(rd.path, device,
                                         options.cpus_per_gpu if device == "cpu" else 4, nnodes,
                                         nproc, stop_wait_s=max(options.signal_delay_s - 30, 10)))
    except Exception as e:  # noqa: BLE001 - sbatch's refusal, whatever submitit wraps it in
        lines = [ln.strip() for ln in (said.text + "\n" + str(e)).splitlines() if ln.strip()]
        said = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines
                    else type(e).__name__)
        raise SubmitError(f"sbatch refused {spec.name}: {said}; check the slurm options "
                          f"(--partition, --time, --account...)") from None
    history = list(rd.read_status().get("slurm_jobs", [])) + [str(job.job_id)]
    rd.update_status(slurm_job=str(job.job_id), slurm_jobs=history,
                     where=f"slurm job {job.job_id} (submitted)")
    return str(job.job_id)


def follow(jobs, log=print, progress=True, poll_s=10.0):
    """Wait for submitted runs ({run_dir: (spec, job id)}) to end; (done, failed) run ids.

    Interrupting this (Ctrl-C) only stops following: the jobs go on."""
    from tqdm import tqdm
    total = sum(spec.solver.max_iter for spec, _ in jobs.values())
    bar = tqdm(total=total, unit="it", desc="study (slurm)", disable=not progress,
               dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
    done, failed, pending = [], [], dict(jobs)
    try:
        while pending:
            for run_dir, (spec, job_id) in list(pending.items()):
                status = RunDir(run_dir).read_status()
                state = job_state(job_id)
                if state == UNKNOWN:
                    continue  # ask again next round
                if status.get("state") == "done" and state not in ACTIVE:
                    done.append(spec.run_id)
                elif state not in ACTIVE:
                    reason = status.get("error") or (
                        f"slurm job {job_id} ended {state or 'out of sight'} at iteration "
                        f"{status.get('iteration', 0)}; see {Path(run_dir) / 'slurm'}; "
                        f"`bench run --slurm` resubmits it")
                    failed.append((spec.run_id, reason))
                    tqdm.write(f"FAILED {spec.run_id}: {reason}")
                else:
                    continue
                del pending[run_dir]
            now = sum(min(RunDir(d).read_status().get("iteration", 0), s.solver.max_iter)
                      for d, (s, _) in jobs.items())
            if now > bar.n:
                bar.update(now - bar.n)
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log(f"stopped following; {len(pending)} job(s) go on in Slurm (`bench status` shows them, "
            f"`scancel` stops them)")
        raise
    finally:
        bar.close()
    return done, failed


def run_study(studies, specs, root, cli_options: dict, wait: bool = True) -> int:
    """`bench run --slurm`: one job per unfinished run of `specs`, then follow them unless
    not `wait`; `cli_options` are the --slurm-* values, over each recipe's slurm: section.
    Returns bench run's exit code."""
    from bench import preflight
    from bench.preflight import PreflightError
    from bench.rundir import is_done, run_dir_for
    why = missing()
    if why:
        raise PreflightError(f"--slurm: {why}")
    options_of = {}
    for study in studies:  # defaults < the recipe's slurm: < the command line
        try:
            opts = SlurmOptions().updated(study.slurm, str(study.path)).updated(cli_options,
                                                                              "--slurm")
            for s in study.runs:
                opts.layout(s)
        except ValueError as e:
            raise PreflightError(str(e)) from None
        options_of.update({s.run_id: opts for s in study.runs})
    preflight.check(studies, specs, root)
    jobs, skipped = {}, 0
    for spec in specs:
        rd = RunDir(run_dir_for(spec, root))
        rd.write_spec(spec)
        if is_done(rd.path):
            skipped += 1
            continue
        try:
            job_id = submit(spec, rd.path, options_of[spec.run_id])
        except SubmitError as e:
            raise PreflightError(f"--slurm: {e}") from None
        jobs[rd.path] = (spec, job_id)
        print(f"{spec.run_id}: slurm job {job_id}", flush=True)
    print(f"{len(jobs)} run(s) in Slurm, {skipped} already done, runs in {root}/", flush=True)
    if not wait or not jobs:
        return 0
    done, failed = follow(jobs)
    print(f"done {len(done)}, skipped (already done) {skipped}, failed {len(failed)}")
    for run_id, reason in failed:
        print(f"  failed {run_id}: {reason}")
    return 1 if failed else 0
