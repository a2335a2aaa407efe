"""Print where a run started and ended, and where its logs are."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor


class RunSummary(L.Callback):
    """At the end of ``fit``: validation ``metric`` of the initial policy (logged at step 0 by the
    on-policy modules, and for SFT and DPO by :class:`GreedyTaskAccuracy`) and of the final one,
    the wall time, the TensorBoard log directory, and the failure signatures that the run's
    ``train/`` metrics show (:mod:`grape_lightning.diagnostics`), each also logged as
    ``diagnostics/<signature>``, 1 where it fired and 0 where not.

    Args:
        metric: validation metric reported before and after training.
    """

    def __init__(self, metric: str = "val/accuracy") -> None:
        self.metric = metric
        self._start_time = 0.0
        self.history: dict[str, list[tuple[int, Tensor]]] = {}  # per train/ metric: (step, its 0-d value)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        self._start_time = time.perf_counter()
        self.history = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        # the step's values, as the module logged them (on_step): the signatures need their history.
        # Kept as tensors where they are, so a GPU run does not wait for the device every step;
        # they are read once, at the end.
        for name, value in trainer.callback_metrics.items():
            if name.startswith("train/") and value.numel() == 1:
                self.history.setdefault(name, []).append((trainer.global_step, value.detach().reshape(()).clone()))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import time

        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        before = getattr(pl_module, "initial_metrics", {}).get(self.metric)
        after = trainer.callback_metrics.get(self.metric)
        minutes = (time.perf_counter() - self._start_time) / 60
        parts = [f"{self.metric}: before {before:.3f}" if before is not None else f"{self.metric}: before n/a"]
        parts.append(f"after {float(after):.3f}" if after is not None else "after n/a")
        from grape_lightning.diagnostics import failure_flags

        history = {
            name: list(zip((step for step, _ in values), torch.stack([value for _, value in values]).double().tolist()))
            for name, values in self.history.items()
        }
        flags = failure_flags(history)
        if history and trainer.logger is not None:
            trainer.logger.log_metrics({f"diagnostics/{k}": float(v is not None) for k, v in flags.items()}, step=trainer.global_step)
        warnings = "".join(f"\nWARNING {name}: {flag}" for name, flag in flags.items() if flag is not None)
        rank_zero_info(
            f"\n{' -> '.join(parts)} ({trainer.global_step} steps, {minutes:.1f} min)\n"
            f"TensorBoard logs: {log_dir}  (tensorboard --logdir {trainer.default_root_dir if log_dir is None else log_dir})"
            f"{warnings}"
        )
