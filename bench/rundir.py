"""The run dir: the only contract between engines, the runner and analysis.

    spec.yaml       the resolved RunSpec (plus code and package versions)
    metrics.jsonl   append-only rows keyed by iteration: {"type": "train"|"eval", ...}
    status.json     {"state": queued|running|done|failed, "iteration", "max_iter", ...}
    checkpoints/    engine-specific, ignored by git

Writes of status and checkpoints are atomic (temp file + rename), so a killed process
leaves either the old or the new file, never half of one. Analysis reads these files
only; it never imports an engine.
"""

import errno
import fcntl
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

import yaml

from bench.procs import running

STATES = ("queued", "running", "done", "failed")


# metrics.jsonl has a train row every LOG_PERIOD iterations (and at the last), whatever the engine
LOG_PERIOD = 20

# A worker's log line with this prefix is also shown on the runner's console (bench.runner)
WARNING = "warning: "


def atomic_write_text(path: Path, text: str):
    path = Path(path)
    # host and pid: the nodes of a multi-node launch may write the same spec on shared storage
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave an empty temp file behind
        raise


def code_version() -> str:
    """git commit of the suite (with -dirty), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(engine: str = "torchvision") -> dict:
    import importlib.metadata

    import numpy
    import torch
    import torchvision
    from bench import __version__
    out = {"bench": __version__, "python": platform.python_version(),
           "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
           "numpy": str(numpy.__version__)}
    if engine != "torchvision":  # the optional engine's own version (its metadata only)
        try:
            out[engine] = importlib.metadata.version(engine)
        except importlib.metadata.PackageNotFoundError:
            out[engine] = "not installed"
    return out


class RunBusy(RuntimeError):
    """Another process holds the run dir's lock."""



def run_dir_for(spec, runs_root) -> Path:
    """Where a run lives: <runs root>/<study>/<run id>."""
    return Path(runs_root) / spec.study / spec.run_id


def is_done(run_dir: Path) -> bool:
    return RunDir(run_dir).read_status().get("state") == "done"

class RunDir:
    def __init__(self, path):
        self.path = Path(path)
        self.spec_file = self.path / "spec.yaml"
        self.metrics_file = self.path / "metrics.jsonl"
        self.status_file = self.path / "status.json"
        self.checkpoints = self.path / "checkpoints"
        # per-image COCOeval results of each evaluation (bench.per_image), for intervals
        # over val images
        self.per_image = self.path / "per_image"

    def per_image_file(self, iteration: int) -> Path:
        return self.per_image / f"{iteration:07d}.npz"

    # -- spec -------------------------------------------------------------------------
    def write_spec(self, spec):
        """Record the resolved spec; a run dir never changes what it trains."""
        from bench.spec import RunSpec
        self.path.mkdir(parents=True, exist_ok=True)
        assert isinstance(spec, RunSpec)
        doc = {"run_id": spec.run_id, "identity": spec.identity(), "spec": spec.to_dict(),
               "code_version": code_version(), "packages": package_versions(spec.engine)}
        if self.spec_file.exists():
            old = self.read_spec()
            if old.identity() != spec.identity():
                raise RuntimeError(f"{self.spec_file} holds another run (identity {old.identity()}, "
                                   f"not {spec.identity()}); use a fresh run dir")
            if old == spec:
                return
            # Same run, new labels (e.g. a plugin's path after the checkout moved): keep the
            # record of the code that started the run, update where its plugins are now.
            first = self.read_spec_doc()
            doc.update(code_version=first.get("code_version"), packages=first.get("packages"))
        atomic_write_text(self.spec_file, yaml.safe_dump(_plain(doc), sort_keys=False))

    def read_spec_doc(self) -> dict:
        try:
            doc = yaml.safe_load(self.spec_file.read_text())
        except yaml.YAMLError as e:
            doc = e
        if not (isinstance(doc, dict) and isinstance(doc.get("spec"), dict)):
            from bench.spec import SpecError
            why = f"not YAML: {str(doc).splitlines()[0]}" if isinstance(doc, Exception) else \
                "no `spec:` mapping"
            raise SpecError(f"{self.spec_file}: the run's record is damaged ({why}); restore it, "
                            f"or delete {self.path} to train the run again")
        return doc

    def read_spec(self):
        from bench.spec import RunSpec
        return RunSpec.from_dict(self.read_spec_doc()["spec"], where=str(self.spec_file))

    # -- lock -------------------------------------------------------------------------
    def lock(self):
        """Hold the run's lock (until the returned file is closed or the process dies, however
        it dies): a second runner, or an orphan of a killed one, must not interleave appends
        and truncations of the same metrics file. RunBusy names the holder."""
        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()
                raise OSError(e.errno, f"cannot lock {self.path / '.lock'} ({e.strerror}): the "
                                       f"runs root's file system must support flock (Lustre: "
                                       f"mount with -o flock); choose another runs root") from None
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise RunBusy(f"{self.path}: another process ({holder}) is training this run; not "
                          f"starting a second one") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        return f

    # -- status -----------------------------------------------------------------------
    def read_status(self) -> dict:
        """The run's status; an unreadable or damaged file reads as queued (a rerun finds
        its checkpoints and metrics, which are the record, and rewrites it)."""
        try:
            doc = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {"state": "queued"}
        if not isinstance(doc, dict) or doc.get("state") not in STATES:
            return {"state": "queued"}
        return doc

    def remove_stale_temp_files(self):
        """Status temp files of this host's writers that died mid-write (atomic_write_text
        removes its own on any error it sees; a SIGKILL leaves one behind)."""
        prefix = f".status.json.tmp-{socket.gethostname()}-"
        for tmp in self.path.glob(prefix + "*"):
            pid = tmp.name[len(prefix):]
            if pid.isdigit() and not running(pid):
                tmp.unlink(missing_ok=True)

    def write_status(self, state, **fields):
        assert state in STATES, state
        doc = {**self.read_status(), **fields, "state": state, "updated": time.time(),
               "host": socket.gethostname(), "pid": os.getpid()}
        if state != "failed":
            doc.pop("error", None)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.status_file, json.dumps(doc, sort_keys=True, indent=1))

    def update_status(self, **fields):
        """Add fields (where the run is, its Slurm jobs) without changing its state."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.status_file, json.dumps({**self.read_status(), **fields},
                                                       sort_keys=True, indent=1))

    # -- metrics ----------------------------------------------------------------------
    def read_metrics(self) -> list:
        """All complete rows; a torn last line (killed mid-write) is ignored."""
        rows = []
        if not self.metrics_file.exists():
            return rows
        for line in self.metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("iteration"), int):
                rows.append(row)
        return rows

    def append_metrics(self, row: dict):
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_metrics(self, iteration: int):
        """Keep rows up to `iteration` (the checkpoint resumed from): resumed runs then
        append the rest once, with no duplicated or missing iterations."""
        rows = [r for r in self.read_metrics() if r["iteration"] <= iteration]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                     for r in rows))


def _plain(obj):
    """Tuples to lists so the YAML is plain and readable by any tool."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
