"""A resumable checkpoint when a run stops early: on SIGTERM, SIGINT, or an exception in training.

The ``grape`` command adds :class:`CheckpointOnInterrupt` to every ``fit``. The checkpoint is
written as ``last.ckpt`` into the first ``ModelCheckpoint``'s directory (atomically, through the
trainer's checkpoint IO), which is what ``--ckpt_path last`` resumes from.

- SIGTERM (SLURM, Kubernetes, ``kill``) and SIGINT (Ctrl-C) stop the run at the end of the
  current training batch (Lightning broadcasts the stop to every process and raises
  ``SIGTERMException`` there); a second Ctrl-C interrupts at once. The process then exits with
  128 + the signal number (143, 130), never 0.
- An exception raised inside training (a reward function that raises, say) leaves the state of
  the last completed step: the batch being trained when it was raised had not changed the
  weights yet (rewards are computed before any update), and it is trained again on resume. An
  exception after the batch's first optimizer step writes nothing (the weights are then between
  two steps); nor does one in a multi-process run, where the other processes may be waiting in a
  collective: the last periodic checkpoint is the one to resume from.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from grape_lightning.data.resumable_loader import ResumableDataLoader

#: The signal that stopped the last ``fit`` of this process (None: none did).
received_signal: int | None = None


def interrupt_exit_status() -> int:
    """The conventional exit status of a process stopped by ``received_signal`` (SIGTERM when unknown)."""
    return 128 + int(received_signal or signal.SIGTERM)


class CheckpointOnInterrupt(L.Callback):
    """Writes ``last.ckpt`` when ``fit`` stops on a signal or an exception (see the module docstring)."""

    def __init__(self) -> None:
        self._batch_start_step: int | None = None  # set while a training batch runs
        self._previous_sigint: Any = None

    # -- signals ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        global received_signal
        received_signal = None
        if stage == "fit" and hasattr(signal, "SIGINT"):
            try:
                self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
            except ValueError:  # not the main thread: leave Ctrl-C as it is
                self._previous_sigint = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def _on_sigint(self, signum: int, frame: Any) -> None:
        global received_signal
        if received_signal == signal.SIGINT:  # pressed again: stop now, without a checkpoint
            raise KeyboardInterrupt
        received_signal = signal.SIGINT
        rank_zero_info("Ctrl-C: stopping after the current training batch with a checkpoint (press again to stop at once)")
        # Lightning's SIGTERM handling stops every process at the same batch boundary.
        os.kill(os.getpid(), signal.SIGTERM)

    # -- where in a batch the run is --------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch_start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._batch_start_step = None

    # -- the checkpoint --------------------------------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        global received_signal
        interrupted = isinstance(exception, SIGTERMException)
        if interrupted and received_signal is None:
            received_signal = signal.SIGTERM
        cause = signal.Signals(received_signal).name if interrupted else type(exception).__name__
        path = self._target(trainer)
        if path is None:
            rank_zero_warn(f"{cause}: no ModelCheckpoint in this run, so no checkpoint was written")
            return
        mid_batch = self._batch_start_step is not None
        if trainer.global_step == 0:
            rank_zero_info(f"{cause} before the first training step: nothing to checkpoint")
            return
        if not interrupted and trainer.world_size > 1:
            rank_zero_warn(f"{cause} in a multi-process run: resume from the last periodic checkpoint (--ckpt_path last)")
            return
        if mid_batch and trainer.global_step != self._batch_start_step:
            rank_zero_warn(
                f"{cause} after the batch's first optimizer step, with the weights between two steps: no checkpoint "
                "written; resume from the last periodic checkpoint (--ckpt_path last)"
            )
            return
        loaders = _resumable_loaders(trainer) if mid_batch else []
        for loader in loaders:  # the interrupted batch was taken from the loader but not trained on
            loader.rewind(1)
        try:
            trainer.save_checkpoint(path)
        finally:
            for loader in loaders:
                loader.rewind(-1)
        rank_zero_info(
            f"{cause} at step {trainer.global_step}: checkpoint written to {path}; "
            "resume with the same command plus --ckpt_path last"
        )

    @staticmethod
    def _target(trainer: L.Trainer) -> Path | None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                if callback.last_model_path:  # last-v1.ckpt when an older run's last.ckpt was in the way
                    return Path(callback.last_model_path)
                return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        return None


def _resumable_loaders(trainer: L.Trainer) -> list[ResumableDataLoader]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flat = loaders.flattened if hasattr(loaders, "flattened") else (loaders if isinstance(loaders, (list, tuple)) else [loaders])
    return [loader for loader in flat if isinstance(loader, ResumableDataLoader)]
