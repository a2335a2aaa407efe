"""Atomic checkpoint writes."""

import pytest
import torch

from grape_lightning.checkpointing import AtomicCheckpointIO


def test_save_then_load_round_trips(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3, "weight": torch.arange(4)}, tmp_path / "a" / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a" / "last.ckpt")
    assert loaded["step"] == 3 and torch.equal(loaded["weight"], torch.arange(4))
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["last.ckpt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
