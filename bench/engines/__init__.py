"""Engines turn a RunSpec into a trained, evaluated run dir. They share only that format.

`get(name)` returns the engine: everything the rest of the suite may ask of one (train a
run, check that it can train a spec, build its model to count parameters and size
checkpoints, load an ImageNet backbone into it, time its train step). Nothing outside
bench/engines/ imports an engine's own modules; an engine imports its heavy dependencies
only when a method needs them, so a recipe for an engine that is not installed is still
checked, planned and refused in one line.
"""

import functools
import importlib

ENGINES = {"torchvision": "bench.engines.torchvision",
           "detectron2": "bench.engines.detectron2"}


class EngineUnavailable(RuntimeError):
    pass


class Engine:
    """The interface; each engine's package defines `Engine(bench.engines.Engine)`."""
    name = ""
    trainer = ""  # the module whose run() trains a run dir (imports the engine's dependencies)

    def require(self):
        """The trainer module, or EngineUnavailable saying how to install what is missing."""
        return _import(self.trainer, self.name)

    def run(self, spec, run_dir, device="cpu", workers=0, log=print):
        """Train and evaluate `spec` into `run_dir` (resuming what is there)."""
        return self.require().run(spec, run_dir, device=device, workers=workers, log=log)

    def validate(self, spec):
        """Raise ValueError (one line) when this engine cannot train `spec`."""
        raise NotImplementedError

    def build_model(self, spec, num_classes: int):
        """The detector this engine trains for `spec` (on the CPU, weights random)."""
        raise NotImplementedError

    def parameters(self, spec, num_classes: int) -> int:
        return sum(p.numel() for p in self.build_model(spec, num_classes).parameters())

    def checkpoint_bytes(self, spec) -> int:
        """About the size of one of this engine's checkpoints of `spec`: fp32 weights and SGD
        momentum, plus a little for the rest."""
        return 2 * 4 * self.parameters(spec, 80) + 2 ** 20

    def check_pretrained(self, spec, state: dict):
        """Load ImageNet backbone `state` (bench.imagenet's layout) into this engine's model
        of `spec`; ValueError when it does not fit."""
        raise NotImplementedError

    def train_step(self, spec, device, per_gpu: int, batches):
        """(step(i), images per pass) for timing: one of this engine's own train steps on
        `batches` (our (images, targets) lists), as bench speed measures it."""
        raise NotImplementedError


_ENGINES = {}


def get(name: str) -> Engine:
    if name not in ENGINES:
        raise EngineUnavailable(f"unknown engine {name!r}; allowed: {', '.join(ENGINES)}")
    if name not in _ENGINES:
        _ENGINES[name] = importlib.import_module(ENGINES[name]).Engine()
    return _ENGINES[name]


def _import(module: str, name: str):
    try:
        return importlib.import_module(module)
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
