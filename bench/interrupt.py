"""Stopping a run without losing its work: SIGTERM, SIGUSR2 or Ctrl-C asks the training loop
to finish the iteration it is on, save a checkpoint there and exit as `queued`.

A cluster's preemption or time limit (Slurm sends USR2 and SIGTERM to every process of the
job, and submitit's handler forwards a SIGTERM), the runner stopping, or a user's Ctrl-C
all take this path; the next
`bench run` resumes exactly where it stopped. Under DDP the request travels with the loss
values every process already exchanges each iteration (train.Stepper), so every process
stops after the same iteration without an extra collective. A second Ctrl-C stops at once
(the run then resumes from its previous checkpoint); SIGKILL is the machine's way to force.
"""

import os
import signal

_requested = False
_fork_hook = False


class Stopped(KeyboardInterrupt):
    """Raised by the training loop once the checkpoint of the stop is saved."""


_interrupts = 0


def requested() -> bool:
    return _requested


def request(signum=None, frame=None):
    global _requested, _interrupts
    _requested = True
    if signum == signal.SIGINT:
        # Only a second Ctrl-C is impatience: the runner's SIGTERM that follows the first one
        # (a worker gets both, in either order) must not turn the stop into a kill.
        _interrupts += 1
        if _interrupts > 1:
            raise KeyboardInterrupt


def clear():
    global _requested, _interrupts
    _requested, _interrupts = False, 0


def quiet_launcher():
    """preexec_fn of a torchrun that launches workers: it ignores the stop signals, which
    reach the workers themselves (the same process group, or bench's SIGTERM to each), so
    that torchrun never SIGKILLs them 30 s into a checkpoint or an evaluation. Its workers
    install their own handlers (install())."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def default_signals_in_child():
    # A forked helper (the dataset generator's pool, a data loader worker) inherits the
    # handlers. It must die on SIGTERM as usual, or Pool.terminate() waits forever for a
    # worker that only set a flag; Slurm's USR2 (which reaches every process of a job) and a
    # terminal's Ctrl-C are its parent's business.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def loader_worker_init(_worker_id):
    """A data loader worker outlives a stop request: Slurm's SIGTERM reaches every process of
    a job, and a worker that died of it would fail the batch its parent is still fetching.
    The loader ends its workers itself (and they exit when their parent dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def install():
    """Route SIGTERM, SIGINT and SIGUSR2 (Slurm's warning before a preemption or the time
    limit) to `request` (the process's main thread only)."""
    global _fork_hook
    clear()
    for sig in SIGNALS:
        signal.signal(sig, request)
    if not _fork_hook:
        os.register_at_fork(after_in_child=default_signals_in_child)
        _fork_hook = True
