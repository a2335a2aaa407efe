"""Stop an on-policy run that cannot learn instead of letting it cycle through the data forever."""

from __future__ import annotations

from typing import Any

import lightning as L


class NoLearningSignalError(RuntimeError):
    """Raised when consecutive rollout batches lead to no optimizer step; the message says why."""


class StopWhenNotLearning(L.Callback):
    """Ends ``fit`` with :class:`NoLearningSignalError` after ``max_batches_without_update``
    consecutive rollout batches that took no optimizer step.

    An on-policy module takes no step on a batch whose rewards are all invalid (None, NaN or inf
    everywhere, typically a reward function that cannot read the field it needs) or that gives
    it nothing to train on (every group tied under ``filter_tied_groups``). ``max_steps`` counts
    optimizer steps, so such a run would never end. The error names the reward functions with
    missing values, their counts and the first invalid row of the last batch.

    The ``grape`` command adds one with the default limit to every run that configures none; put
    one in ``trainer.callbacks`` to change the limit (``None`` turns the check off).

    Args:
        max_batches_without_update: consecutive rollout batches without an optimizer step before
            the run stops with an error (None: never).
    """

    def __init__(self, max_batches_without_update: int | None = 20) -> None:
        if max_batches_without_update is not None and max_batches_without_update < 1:
            raise ValueError(f"max_batches_without_update must be >= 1 or None, got {max_batches_without_update}")
        self.max_batches_without_update = max_batches_without_update
        self._step_at_batch_start = 0
        self._batches_without_update = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        from grape_lightning.algorithms.on_policy import OnPolicyModule

        if self.max_batches_without_update is None or not isinstance(pl_module, OnPolicyModule):
            return
        if trainer.global_step != self._step_at_batch_start:
            self._batches_without_update = 0
            return
        self._batches_without_update += 1
        if self._batches_without_update < self.max_batches_without_update:
            return
        invalid = pl_module.last_invalid_rewards
        cause = invalid.describe() if invalid is not None else "no rollout was recorded"
        if invalid is not None and not invalid.invalid:
            cause += ", but the algorithm found nothing to train on (for GRPO and GRAPE: every group's rewards tied)"
        raise NoLearningSignalError(
            f"{type(pl_module).__name__}: {self._batches_without_update} consecutive rollout batches without an optimizer "
            f"step (at step {trainer.global_step}); in the last one {cause}. Check that the reward functions can score "
            "these rows (the data has the fields they read), or give StopWhenNotLearning a larger max_batches_without_update"
        )
