"""Logs that hold what the run did: the last step's metrics, and no placeholder ``hp_metric``."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


class CompleteLogs(L.Callback):
    """Lightning writes step metrics every ``log_every_n_steps`` batches, so a run shorter than that
    logs none and a longer one loses its final values; at the end of training this writes the last
    step's ``train/`` metrics wherever the loggers did not get them. It also turns off
    TensorBoard's ``hp_metric`` placeholder (a constant -1 at step 0 that is no metric of the run).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # read by log_hyperparams, which runs after this hook; the hyper-parameters are still written
                logger._default_hp_metric = False

    def on_train_batch_end(self, trainer: L.Trainer, *_: object) -> None:
        # Lightning's own decision for this batch, taken right after this hook with the same state
        self._last_batch_logged = trainer._logger_connector.should_update_logs

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_last_batch_logged", True) or not trainer.loggers:
            return
        last = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/")}
        if not last:
            return
        # the step Lightning gives the batch it logs: batches that stepped, before the last one's increment
        step = max(trainer.fit_loop.epoch_loop._batches_that_stepped - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(last, step=step)
            logger.save()
