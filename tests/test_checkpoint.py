"""A run's checkpoints (bench.checkpoint): atomic, last K kept, a corrupt one skipped, and
nothing in a checkpoint file ever run. Pure file-level units; what resume does with them is
in test_resume.py."""

import pytest
import torch

from bench import checkpoint


def _state(iteration):
    return {"iteration": iteration, "model": {"w": torch.full((2,), float(iteration))}}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_checkpoint_that_would_run_code_is_unreadable_and_nothing_runs(tmp_path):
    checkpoint.save(tmp_path, 9, _state(9), keep=3)
    marker = tmp_path / "pwned"
    evil = {**_state(18), "payload": _RunsCode(marker)}
    torch.save(evil, checkpoint.checkpoint_path(tmp_path, 18))
    said = []
    with pytest.warns(UserWarning, match="model_0000018.pth is unreadable"):
        iteration, state = checkpoint.load_latest(tmp_path, log=said.append)
    assert not marker.exists()
    assert iteration == 9 and torch.equal(state["model"]["w"], torch.full((2,), 9.0))
    # the reason, not weights_only's advice to load it anyway (with terminal colour codes)
    assert len(said) == 1 and "\n" not in said[0] and "\x1b" not in said[0]
    assert "names code to run" in said[0] and "open" in said[0] and "trust" not in said[0]


def test_an_unreadable_checkpoint_no_longer_counts_toward_keep(tmp_path):
    # keep 2: 60 good, 63 (saved on a stop) corrupt. The run resumes from 60; its next save
    # must not delete 60 and keep the corrupt 63.
    checkpoint.save(tmp_path, 60, _state(60), keep=2)
    checkpoint.checkpoint_path(tmp_path, 63).write_bytes(b"torn")
    with pytest.warns(UserWarning):  # another rank reading: it leaves the file alone
        assert checkpoint.load_latest(tmp_path, log=lambda m: None)[0] == 60
    assert checkpoint.checkpoint_path(tmp_path, 63).exists()
    with pytest.warns(UserWarning):  # the training process (rank 0) sets it aside
        assert checkpoint.load_latest(tmp_path, log=lambda m: None, set_aside=True)[0] == 60
    with pytest.warns(UserWarning):  # and a rank that lost the race to move it goes on
        checkpoint.checkpoint_path(tmp_path, 63).write_bytes(b"torn")
        real = type(tmp_path).replace
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(type(tmp_path), "replace", lambda self, target: (
                self.unlink(), real(tmp_path / "missing", target)))
            assert checkpoint.load_latest(tmp_path, log=lambda m: None, set_aside=True)[0] == 60
    checkpoint.save(tmp_path, 90, _state(90), keep=2)
    assert [it for it, _ in checkpoint.list_checkpoints(tmp_path)] == [60, 90]
    assert (tmp_path / "model_0000063.pth.unreadable").read_bytes() == b"torn"  # kept aside


def test_when_no_checkpoint_reads_none_is_set_aside_and_the_run_stops(tmp_path):
    for it in (9, 18):  # a storage outage: they may read again later
        checkpoint.checkpoint_path(tmp_path, it).write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(checkpoint.NoReadableCheckpoint):
        checkpoint.load_latest(tmp_path, log=lambda m: None)
    assert [it for it, _ in checkpoint.list_checkpoints(tmp_path)] == [9, 18]


def test_save_keeps_the_newest_k_and_those_protected(tmp_path):
    for it in (10, 20, 30, 40):
        checkpoint.save(tmp_path, it, _state(it), keep=2, protect={10})
    assert [it for it, _ in checkpoint.list_checkpoints(tmp_path)] == [10, 30, 40]


def test_a_checkpoint_that_does_not_fit_is_a_disk_full_error_leaving_no_partial_file(
        tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    def torn_write(state, path):  # what torch.save raises when the disk fills under it
        open(path, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", torn_write)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(2 ** 30, 2 ** 30, 4096))
    with pytest.raises(OSError) as e:
        checkpoint.save(tmp_path, 190, _state(190), keep=2)
    assert e.value.errno == errno.ENOSPC and "model_0000190.pth" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_ends_a_run_as_one_line_naming_the_iteration_and_the_checkpoint_kept(
        tmp_path, monkeypatch):
    # Seen with a runs root on a 80 MB tmpfs filled mid-run: status.json stayed "running",
    # a 0-byte .status.json.tmp-* stayed behind, ~8 chained tracebacks in log.txt, and the
    # runner's line named neither the iteration nor the checkpoint.
    import errno

    from bench import engines
    from bench.rundir import RunDir
    rd = RunDir(tmp_path / "runs" / "study" / "run")
    checkpoint.save(rd.checkpoints, 180, _state(180), keep=2)
    rd.write_status("running", iteration=180, max_iter=630)

    def train(spec, run_dir, **kw):
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            e = OSError(errno.ENOSPC, "No space left on device")
            e.iteration_done = 190
            raise e

    def no_room(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunDir, "write_status", no_room)
    spec = type("Spec", (), {"solver": type("S", (), {"max_iter": 630})()})()
    with pytest.raises(engines.DiskFull) as e:
        engines.recording_failure(train)(spec, rd.path, log=lambda m: None)
    message = str(e.value)
    assert "at iteration 190" in message and "model_0000180.pth (iteration 180)" in message
    assert "free some space" in message and "\n" not in message
    assert e.value.__suppress_context__ and e.value.__cause__ is None  # no chain printed


def test_a_status_that_could_not_be_written_is_recorded_when_there_is_room(tmp_path):
    from bench.engines.session import open_session
    from bench.rundir import RunDir, atomic_write_text
    from bench.runner import _record_failure
    rd = RunDir(tmp_path / "run")
    rd.write_status("running", iteration=180, max_iter=630)
    lock = rd.lock()  # while another process holds the run, its status is left alone
    _record_failure(rd.path, "exit code 1: ...")
    lock.close()
    assert rd.read_status()["state"] == "running"
    _record_failure(rd.path, "exit code 1: DiskFull: no space left ...")  # the runner, later
    assert rd.read_status()["state"] == "failed" and rd.read_status()["iteration"] == 180
    for state in ("done", "queued"):  # a clean end, or a stop, is never turned into failed
        rd.write_status(state)
        _record_failure(rd.path, "exit code 1: a peer's torchrun ended")
        assert rd.read_status()["state"] == state
    import os
    import socket
    host = socket.gethostname()
    dead = rd.path / f".status.json.tmp-{host}-999999999"  # a writer killed mid-write
    live = rd.path / f".status.json.tmp-{host}-{os.getppid()}"  # one writing right now
    elsewhere = rd.path / ".status.json.tmp-othernode-17"
    for tmp in (dead, live, elsewhere):
        tmp.write_text("")
    open_session(rd, 180, 630, 64, log=lambda m: None)[0].close()
    assert not dead.exists() and live.exists() and elsewhere.exists()
    live.unlink()
    elsewhere.unlink()
    with pytest.raises(TypeError):  # and a failed write removes its own temp file
        atomic_write_text(rd.path / "status.json", object())
    assert not list(rd.path.glob(".status.json.tmp-*"))
