"""A TensorBoard text table of sampled prompts, responses and rewards."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def _cell(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", "⏎")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


class SampleTable(L.Callback):
    """Every ``every_n_steps`` optimizer steps, write the module's ``last_samples`` (a list of dict
    rows: prompt, response, reward, ...) as a text table under ``samples`` in TensorBoard.

    Args:
        every_n_steps: optimizer steps between two tables.
        max_rows: most rows per table.
    """

    def __init__(self, every_n_steps: int = 50, max_rows: int = 16) -> None:
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self._last_written = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = step // self.every_n_steps != self._last_written // self.every_n_steps or self._last_written < 0
        rows = getattr(pl_module, "last_samples", None)
        if not due or not rows or not trainer.is_global_zero:
            return
        self._last_written = step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", markdown_table(rows[: self.max_rows]), global_step=step)
