"""Checkpoints remember the directory training ran in, so relative paths in the run's config (a
GRAPE rubric, an off-policy responses file) mean the same files when the checkpoint is loaded from
elsewhere (``grape export`` run from another directory)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

_KEY = "grape_working_directory"


class RecordWorkingDirectory(L.Callback):
    """Stores ``os.getcwd()`` of the training process in every checkpoint (the ``grape`` command adds it)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[_KEY] = os.getcwd()


@contextlib.contextmanager
def training_working_directory(checkpoint_path: str | Path) -> Iterator[None]:
    """Run the block in the directory the checkpoint was trained in, when it records one that
    still exists (otherwise in the current directory)."""
    try:
        recorded = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True).get(_KEY)
    except Exception:  # unreadable here: loading the module will say why
        recorded = None
    if not recorded or not Path(recorded).is_dir():
        yield
        return
    previous = os.getcwd()
    os.chdir(recorded)
    try:
        yield
    finally:
        os.chdir(previous)
