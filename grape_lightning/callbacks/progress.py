"""A progress bar of optimizer steps against ``max_steps``, with the numbers a run is watched by."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

# (label, metrics tried in order): the first one the module logged is shown
SHOWN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("train/reward",)),
    ("loss", ("train/loss",)),
    ("kl", ("train/kl", "train/approx_kl", "train/kl_after_step")),
    ("val_acc", ("val/accuracy",)),
)


class StepProgressBar(TQDMProgressBar):
    """One training bar for the whole run, counting optimizer steps (``trainer.global_step``, what
    ``max_steps`` counts) rather than batches of an epoch: on-policy algorithms take several
    optimizer steps per rollout batch and the run is bounded by steps, not epochs. A resumed run
    starts the bar at its step. Beside it: the training reward (or the loss where there is no
    reward), the KL where the algorithm computes one, and the latest validation accuracy.

    Args:
        refresh_rate: optimizer steps between two redraws.
        process_position: line offset of the bars (several trainers in one terminal).
        leave: keep the finished bar on screen.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)

    def total_steps(self, trainer: L.Trainer) -> int | None:
        """``max_steps``, else Lightning's estimate from the epochs (None when unbounded)."""
        if trainer.max_steps > 0:
            return trainer.max_steps
        estimate = trainer.estimated_stepping_batches
        return None if estimate is None or math.isinf(estimate) else int(estimate)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.total = self.total_steps(trainer)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("step")
        bar.refresh()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run: epochs are the data's boundaries, not the run's

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar.disable or step == bar.n:
            return
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        bar.close()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = trainer.callback_metrics
        shown: dict[str, Any] = {}
        for label, names in SHOWN:
            name = next((name for name in names if name in metrics), None)
            if name is not None and not (label == "loss" and "reward" in shown):
                shown[label] = f"{float(metrics[name]):.3g}"
        return shown
