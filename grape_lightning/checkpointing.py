"""Checkpoints written atomically (a crash mid-write never leaves a corrupt checkpoint behind), and a
checkpoint that still cannot be read (a damaged disk, a copy cut short) reported by name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target directory, flushes it to disk, then renames it over
    the target. A rename inside one directory is atomic, so a reader (or a resumed run) sees either
    the previous checkpoint or the complete new one, never a partial file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    #: Set by ``grape fit --ckpt_path last``: an unreadable last checkpoint is moved aside to
    #: ``<name>.unreadable`` and replaced by the newest intact one beside it (logged), so an
    #: unattended restart goes on from there.
    fall_back_to_intact: bool = False

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Loads ``path``; a truncated or corrupt file raises :class:`UnreadableCheckpointError`
        naming it and the newest intact checkpoint beside it (or, with ``fall_back_to_intact``,
        loads that one instead, with a warning)."""
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as error:  # torch reports a torn file as RuntimeError, EOFError or an unpickling error
            intact = newest_intact_sibling(Path(path), lambda p: super(AtomicCheckpointIO, self).load_checkpoint(
                p, map_location=map_location, weights_only=weights_only))
            if intact is not None and self.fall_back_to_intact:
                candidate, checkpoint = intact
                # Moved aside, so the next "last" checkpoint takes its name again and it is never picked twice.
                aside = Path(path).with_name(Path(path).name + ".unreadable")
                os.replace(path, aside)
                rank_zero_warn(
                    f"{_unreadable(path, error)}; moved it to {aside.name} and resuming from the newest intact checkpoint "
                    f"beside it, {candidate}"
                )
                return checkpoint
            raise unreadable_checkpoint_error(path, error, None if intact is None else intact[0]) from error


def _unreadable(path: str | Path, error: BaseException) -> str:
    return f"checkpoint {path} cannot be read: it is truncated or corrupt ({type(error).__name__}: {error})"


def unreadable_checkpoint_error(path: str | Path, error: BaseException, intact: Path | None) -> UnreadableCheckpointError:
    """The error for a checkpoint that failed to load with ``error``, naming ``intact`` (see
    :func:`newest_intact_sibling`) as the one to resume from instead."""
    if intact is None:
        return UnreadableCheckpointError(f"{_unreadable(path, error)}, and no intact checkpoint is beside it")
    return UnreadableCheckpointError(
        f"{_unreadable(path, error)}. The newest intact checkpoint beside it is {intact}: pass --ckpt_path {intact}"
    )


def newest_intact_sibling(path: Path, load: Callable[[Path], dict[str, Any]] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest other checkpoint in ``path``'s directory that ``load`` (default: ``torch.load``)
    reads without error, with its contents; None if there is none."""
    load = load or (lambda p: torch.load(p, map_location="cpu", weights_only=True))
    for candidate in _siblings_newest_first(path):
        try:
            return candidate, load(candidate)
        except Exception:
            continue
    return None


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be loaded; the message names it and any intact alternative."""


def _siblings_newest_first(path: Path) -> list[Path]:
    """The other checkpoints in ``path``'s directory, newest first (hidden partial writes excluded)."""
    siblings = [p for p in path.parent.glob("*.ckpt") if p.name != path.name and not p.name.startswith(".") and p.is_file()]
    return sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
