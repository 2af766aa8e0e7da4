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
    assert len(said) == 1 and "\n" not in said[0]


def test_an_unreadable_checkpoint_no_longer_counts_toward_keep(tmp_path):
    # keep 2: 60 good, 63 (saved on a stop) corrupt. The run resumes from 60; its next save
    # must not delete 60 and keep the corrupt 63.
    checkpoint.save(tmp_path, 60, _state(60), keep=2)
    checkpoint.checkpoint_path(tmp_path, 63).write_bytes(b"torn")
    with pytest.warns(UserWarning):
        assert checkpoint.load_latest(tmp_path, log=lambda m: None)[0] == 60
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
