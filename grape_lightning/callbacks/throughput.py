"""Training throughput in tokens per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s``: real tokens of the batch over the wall time of its training step.

    Counts ``batch["num_tokens"]`` when the collator provides it (padding excluded), else the
    size of ``input_ids``. The clock stops after the optimizer step, with the device synchronised.
    """

    def __init__(self) -> None:
        self._start = 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return
        self._sync(pl_module)
        elapsed = time.perf_counter() - self._start
        tokens = float(batch["num_tokens"]) if "num_tokens" in batch else float(batch["input_ids"].numel())
        pl_module.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), on_step=True, on_epoch=False)
