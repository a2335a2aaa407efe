"""A table of sampled prompts, responses and rewards, written to every logger of the run."""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


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
    rows: prompt, response, reward, ...) to each logger: a text table under ``samples`` in
    TensorBoard, rows of ``samples.csv`` (with a ``step`` column) in a CSVLogger's directory, and
    ``log_text`` for loggers that have it (Weights & Biases).

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
        rows = rows[: self.max_rows]
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("samples", markdown_table(rows), global_step=step)
            elif isinstance(logger, CSVLogger):
                append_csv(os.path.join(logger.log_dir, "samples.csv"), step, rows)
            elif callable(getattr(logger, "log_text", None)):
                columns = list(rows[0])
                logger.log_text(key="samples", columns=columns, data=[[row.get(c) for c in columns] for row in rows], step=step)


def append_csv(path: str, step: int, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` with their ``step`` to the CSV file ``path``; its header comes from the first
    table written (a later column that it lacks is dropped, a missing one left empty)."""
    exists = os.path.isfile(path) and os.path.getsize(path) > 0
    if exists:
        with open(path, newline="") as handle:
            columns = next(csv.reader(handle))
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        columns = ["step", *rows[0]]
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if not exists:
            writer.writeheader()
        writer.writerows({"step": step, **row} for row in rows)
