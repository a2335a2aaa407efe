"""Export the trained policy in Hugging Face format."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import lightning as L

from grape_lightning.models.full_parameters import full_parameters


def export_atomically(pl_module: L.LightningModule, directory: str | Path) -> Path:
    """Write ``pl_module.export_hf`` output into ``directory`` so a crash never leaves it half-written.

    The export goes to a temporary sibling first and replaces ``directory`` by renames.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    pl_module.export_hf(staging)  # type: ignore[operator]
    _readable_as_umask_allows(staging)
    retired = None
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(directory, retired)
    os.replace(staging, directory)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return directory


def _readable_as_umask_allows(directory: Path) -> None:
    """``mkdtemp`` makes the staging directory private (0700) and some writers make private files:
    give the export the permissions of any file the user creates (0777 / 0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


class HFExport(L.Callback):
    """At the end of ``fit`` (and optionally after every validation), save the policy and tokenizer
    with ``save_pretrained`` to ``dirpath`` (default: ``<log dir>/hf``).

    Args:
        dirpath: output directory (default: ``<log dir>/hf``).
        every_validation: also export after every validation, not only at the end.
    """

    def __init__(self, dirpath: str | None = None, every_validation: bool = False) -> None:
        self.dirpath = dirpath
        self.every_validation = every_validation

    def _target(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = self._target(trainer)  # on every rank: ``trainer.log_dir`` is a collective under DDP
        trainer.strategy.barrier()
        with full_parameters(pl_module, pl_module, forward=False):  # every rank gathers (FSDP, ZeRO-3); rank 0 writes
            if trainer.is_global_zero:
                export_atomically(pl_module, target)
        trainer.strategy.barrier()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation and not trainer.sanity_checking:
            self._export(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)
