"""Atomic checkpoint writes."""

import pytest
import torch

from grape_lightning.checkpointing import AtomicCheckpointIO, UnreadableCheckpointError


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


def _torn_last_beside_an_intact_checkpoint(directory):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 2}, directory / "epoch=0-step=2.ckpt")
    io.save_checkpoint({"step": 4}, directory / "last.ckpt")
    last = directory / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])  # a copy cut short
    return io, last


def test_an_unreadable_checkpoint_is_named_with_the_intact_one_beside_it(tmp_path):
    io, last = _torn_last_beside_an_intact_checkpoint(tmp_path)
    with pytest.raises(UnreadableCheckpointError) as error:
        io.load_checkpoint(last)
    message = str(error.value)
    assert message.startswith(f"checkpoint {last} cannot be read: it is truncated or corrupt")
    assert f"The newest intact checkpoint beside it is {tmp_path / 'epoch=0-step=2.ckpt'}" in message
    (tmp_path / "epoch=0-step=2.ckpt").unlink()
    with pytest.raises(UnreadableCheckpointError, match="no intact checkpoint is beside it"):
        io.load_checkpoint(last)


def test_with_fall_back_the_intact_checkpoint_is_loaded_and_the_torn_one_moved_aside(tmp_path):
    io, last = _torn_last_beside_an_intact_checkpoint(tmp_path)
    io.fall_back_to_intact = True
    with pytest.warns(UserWarning, match="moved it to last.ckpt.unreadable and resuming from"):
        assert io.load_checkpoint(last)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt.unreadable"]
