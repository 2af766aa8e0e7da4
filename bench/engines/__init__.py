"""Engines turn a RunSpec into a trained, evaluated run dir. They share only that format.

An engine module provides `run(spec, run_dir, device, workers, log)`, usually its
`train` wrapped by `recording_failure`.
"""

import functools
import importlib

ENGINES = {"torchvision": "bench.engines.torchvision.train",
           "detectron2": "bench.engines.detectron2.train"}


class EngineUnavailable(RuntimeError):
    pass


def get(name: str):
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; allowed: {', '.join(ENGINES)}")
    try:
        return importlib.import_module(ENGINES[name])
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if name == "detectron2" and missing == "detectron2":
            raise EngineUnavailable(
                "engine detectron2 needs detectron2, which has no PyPI package: build it from "
                "source as its INSTALL.md says (pip install --no-build-isolation "
                "'git+https://github.com/facebookresearch/detectron2.git'), or use "
                "engine: torchvision, which needs nothing more") from e
        if name == "detectron2" and missing:
            raise EngineUnavailable(
                f"engine detectron2: detectron2 is installed but {missing!r} (which it or the "
                f"engine imports) is not; pip install {missing} into this environment") from e
        raise


class DiskFull(OSError):
    pass


def _chain(e):
    """An exception and those it was raised from or while handling (a failure while
    closing files after another)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _disk_full(e) -> bool:
    import errno
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)
               for x in _chain(e))


def _iteration_reached(e):
    """The iteration the engine had reached (it attaches it to the error), or None."""
    return next((x.iteration_done for x in _chain(e)
                 if getattr(x, "iteration_done", None) is not None), None)


def _disk_full_error(e, rd, iteration) -> DiskFull:
    """One line for a disk that filled mid-run: where, how far, what is kept, the fix."""
    from bench import checkpoint
    try:
        kept = checkpoint.list_checkpoints(rd.checkpoints)
    except OSError:
        kept = []
    last = f"{kept[-1][1].name} (iteration {kept[-1][0]})" if kept else "none"
    return DiskFull(f"no space left on the runs root ({rd.path.parent.parent}) at iteration "
                    f"{iteration}; last good checkpoint: {last}; free some space (or move the "
                    f"runs root) and rerun bench run to resume from it")


def recording_failure(train):
    """An engine's run(): its train() that records a failure in status.json before re-raising."""
    @functools.wraps(train)
    def run(spec, run_dir, device="cpu", workers=0, log=print):
        from bench import distributed
        from bench.rundir import RunDir
        rd = RunDir(run_dir)
        world = distributed.from_env()
        try:
            return train(spec, run_dir, device=device, workers=workers, log=log)
        except BaseException as e:
            # Rank 0 holds the run dir's lock; another rank may write only once it has joined
            # rank 0's process group (a second launch of a live run must not touch its status).
            import torch.distributed as dist
            if not (world.main or (dist.is_available() and dist.is_initialized())):
                raise
            status = rd.read_status()
            # The first failure is the reason; the others' errors (a peer that closed its
            # connection, torchrun's SIGTERM) follow from it and must not overwrite it.
            if status.get("state") == "failed":
                raise
            iteration = _iteration_reached(e)
            if iteration is None:
                iteration = status.get("iteration", 0)
            full = not isinstance(e, KeyboardInterrupt) and _disk_full(e)
            if full:
                e = _disk_full_error(e, rd, iteration)
            try:
                if isinstance(e, KeyboardInterrupt):
                    if world.main:
                        rd.write_status("queued", error=None)
                else:
                    rd.write_status("failed", error=f"{type(e).__name__}: {e}",
                                    iteration=iteration, max_iter=spec.solver.max_iter)
            except OSError:
                pass  # the disk is still full: the runner records it when the worker ends
            if full:
                raise e from None
            raise
    return run
