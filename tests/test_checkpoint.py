"""Checkpoint files: atomic, pruned, safe to load, clear when damaged or mismatched."""

import pytest
import torch

from workbench.checkpoint import (
    CheckpointError,
    check_compatible,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)


def _state(x=1.0):
    return {"weights": torch.full((3,), x), "meta": {"config_hash": "abc", "n": 3}}


def test_save_load_and_prune(tmp_path):
    for step in (100, 200, 300, 400):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    files = list_checkpoints(tmp_path)
    assert [p.name for p in files] == ["step-000000000300.pt", "step-000000000400.pt"]
    state = load_latest(tmp_path)
    assert state["step"] == 400
    assert torch.equal(state["weights"], torch.full((3,), 400.0))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_truncated_latest_falls_back_to_the_previous(tmp_path):
    save_checkpoint(_state(1), tmp_path, 100)
    newest = save_checkpoint(_state(2), tmp_path, 200)
    newest.write_bytes(newest.read_bytes()[:50])  # a write cut short (not possible via save)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(newest)
    assert load_latest(tmp_path)["step"] == 100


def test_a_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "step-000000000001.pt"
    torch.save({"format_version": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_checkpoint(path)


def test_interrupted_write_leaves_latest_intact(tmp_path, monkeypatch):
    save_checkpoint(_state(1), tmp_path, 100)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2), tmp_path, 200)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000000100.pt"]
    assert load_latest(tmp_path)["step"] == 100


def test_missing_and_mismatched(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="has format"):
        torch.save({"format_version": 99}, tmp_path / "step-000000000005.pt")
        load_checkpoint(tmp_path / "step-000000000005.pt")
    with pytest.raises(
        CheckpointError, match="config_hash: checkpoint has 'abc', this run has 'xyz'"
    ):
        check_compatible({"config_hash": "abc", "obs_dim": 3}, {"config_hash": "xyz", "obs_dim": 3})
