"""Validation accuracy of greedy decoding on the DataModule's built-in task."""

from __future__ import annotations

import lightning as L

from grape_lightning.evaluation import greedy_task_score


class GreedyTaskAccuracy(L.Callback):
    """After each validation, decode ``num_examples`` validation prompts greedily and log
    ``val/accuracy`` and ``val/reward``. Needs a DataModule with a ``task``; does nothing otherwise.

    Args:
        num_examples: validation prompts decoded.
        max_new_tokens: most tokens per greedy response.
        batch_size: prompts decoded at a time.
    """

    def __init__(self, num_examples: int = 128, max_new_tokens: int = 16, batch_size: int = 64) -> None:
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        task = getattr(datamodule, "task", None)
        if task is None or trainer.sanity_checking:
            return
        score = greedy_task_score(
            pl_module.policy,  # type: ignore[arg-type]
            pl_module.tokenizer,  # type: ignore[arg-type]
            task,
            num_examples=self.num_examples,
            chat_template=datamodule.chat_template,  # type: ignore[union-attr]
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        pl_module.log("val/accuracy", score.accuracy, prog_bar=True)
        pl_module.log("val/reward", score.mean_reward)
