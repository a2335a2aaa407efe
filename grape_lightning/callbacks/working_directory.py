"""Checkpoints remember the directory training ran in, so relative paths in the run's config (a
GRAPE rubric, an off-policy responses file) mean the same files when the checkpoint is loaded from
elsewhere (``grape export`` run from another directory), and the directories ``grape fit`` put on
``sys.path`` (those of its ``--config`` files), so a user's class beside the config (a reward, a
critic) imports when the checkpoint's hyper-parameters rebuild the module."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

_KEY = "grape_working_directory"
_IMPORT_KEY = "grape_import_directories"


class RecordWorkingDirectory(L.Callback):
    """Stores ``os.getcwd()`` of the training process and the import directories in every
    checkpoint (the ``grape`` command adds it).

    Args:
        import_directories: the directories the ``grape`` command put on ``sys.path`` (those of
            its ``--config`` files), put back there when ``grape export`` rebuilds the module.
    """

    def __init__(self, import_directories: list[str] | None = None) -> None:
        self.import_directories = list(import_directories or [])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[_KEY] = os.getcwd()
        checkpoint[_IMPORT_KEY] = self.import_directories


@contextlib.contextmanager
def training_working_directory(checkpoint_path: str | Path) -> Iterator[None]:
    """Run the block in the directory the checkpoint was trained in, when it records one that
    still exists (otherwise in the current directory), with that directory and the recorded import
    directories that still exist first on ``sys.path`` (as ``grape fit`` had them)."""
    try:
        saved = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=True)
        recorded, imports = saved.get(_KEY), list(saved.get(_IMPORT_KEY) or [])
    except Exception:  # unreadable here: loading the module will say why
        recorded, imports = None, []
    added = [d for d in [recorded, *imports] if d and Path(d).is_dir() and d not in sys.path]
    sys.path[:0] = added
    previous = os.getcwd()
    if recorded and Path(recorded).is_dir():
        os.chdir(recorded)
    try:
        yield
    finally:
        os.chdir(previous)
        for directory in added:
            if directory in sys.path:
                sys.path.remove(directory)
