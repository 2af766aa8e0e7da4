"""`torchrun ... -m bench.cli run RECIPE`: every run of a study trained by the one group of
processes torchrun started (its nodes, its GPUs), one run after another, instead of the
runner's one worker process group per run. The multi-node path for clusters where the
scheduler, not bench, starts the processes."""

import os
import socket

from bench.rundir import RunDir, is_done, run_dir_for
from bench.runner import NoSlots, Outcome


def under_torchrun() -> bool:
    """`torchrun … -m bench.cli run RECIPE`: this process is one of a group torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def run_in_group(specs, runs_root, device="cpu", workers=0, log=print) -> Outcome:
    """Train every spec with all the processes torchrun started (its nodes, its GPUs), one
    run after another in the same order in every process, in one process group.

    Each run must ask for exactly that many processes (`gpus`). A run that fails the same way
    everywhere (a non-finite loss) is reported and the study goes on; any other failure ends
    this process, and torchrun then stops the others; the next launch resumes."""
    import torch
    from bench import distributed, interrupt, worker
    world = distributed.from_env()
    for spec in specs:
        if spec.gpus != world.size:
            raise NoSlots(f"{spec.name} asks for gpus={spec.gpus} but torchrun started "
                          f"{world.size} processes; launch --nproc-per-node x --nnodes = "
                          f"{spec.gpus}, or --set gpus={world.size} (a new run id)")
    interrupt.install()
    distributed.init(device)
    outcome = Outcome()
    try:
        for spec in sorted(specs, key=lambda s: (-s.solver.max_iter, s.run_id)):
            rd = RunDir(run_dir_for(spec, runs_root))
            if world.main:
                rd.write_spec(spec)
            distributed.barrier(world)
            if is_done(rd.path):
                outcome.skipped.append(spec.run_id)
                continue
            lock = None
            if world.main:
                try:
                    lock = rd.lock()
                except Exception as e:  # noqa: BLE001 - RunBusy, or the lock file unwritable
                    log(str(e))
            # every process learns whether rank 0 holds the run before any trains it
            on = torch.device("cuda", world.local_rank) if device == "cuda" else None
            held = distributed.mean(torch.tensor([float(lock is not None or not world.main)],
                                                 device=on), world)
            if held.item() < 1:
                outcome.elsewhere.append(spec.run_id)
                continue
            try:
                if world.main:
                    rd.update_status(where=f"torchrun: {world.size} processes, rank 0 on "
                                           f"{socket.gethostname()}")
                code = worker.train_run(rd, device, workers, take_lock=False)
            finally:
                if lock is not None:
                    lock.close()
            if code == worker.DONE:
                outcome.done.append(spec.run_id)
            elif code == worker.STOPPED:
                raise KeyboardInterrupt
            else:
                outcome.failed.append((spec.run_id, rd.read_status().get("error") or
                                       f"exit code {code}"))
                if code != worker.FAILED_EVERYWHERE:
                    break  # the group may be out of step: end here, torchrun ends the rest
    finally:
        distributed.shutdown()
    return outcome
