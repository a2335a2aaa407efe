"""Validation accuracy of greedy decoding: on the built-in task, or on the user's own data."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from grape_lightning.evaluation import TaskScore, greedy_reward_score, greedy_task_score
from grape_lightning.rewards.base import RewardFunction


class GreedyTaskAccuracy(L.Callback):
    """Decode ``num_examples`` validation prompts greedily and log ``val/accuracy`` (share of
    responses scored exactly 1) and ``val/reward`` (their mean score): once before training (step
    0, kept as the module's ``initial_metrics`` for :class:`RunSummary`) and after each validation.

    The prompts and the scoring:

    - a built-in ``task`` supplying the validation data: its prompts and its verifier;
    - JSONL files: their validation rows scored by ``reward`` (a :class:`RewardFunction` such as
      ``ExactMatch`` or ``NumericMatch``), which reads the reference from ``metadata["answer"]``:
      a row's own ``answer`` field, else its SFT ``completion`` or preferred ``chosen`` reply
      (``DataModule.reference_rows``). Without a ``reward`` nothing is logged, with a warning.

    Args:
        num_examples: validation prompts decoded.
        max_new_tokens: most tokens per greedy response.
        batch_size: prompts decoded at a time.
        reward: scores each greedy response against the row's reference (JSONL data); the built-in
            task's verifier is used when the task supplies the validation data.
    """

    def __init__(
        self, num_examples: int = 128, max_new_tokens: int = 16, batch_size: int = 64, reward: RewardFunction | None = None
    ) -> None:
        self.num_examples = num_examples
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.reward = reward
        self._warned = False

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> TaskScore | None:
        """The greedy score of the current policy, or None when the data gives nothing to score."""
        datamodule = trainer.datamodule
        if datamodule is None:
            return None
        options = {
            "chat_template": datamodule.chat_template,  # type: ignore[union-attr]
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
        }
        if getattr(datamodule, "task", None) is not None and datamodule.from_task("val"):  # type: ignore[union-attr]
            return greedy_task_score(
                pl_module.policy, pl_module.tokenizer, datamodule.task, num_examples=self.num_examples, **options  # type: ignore[arg-type]
            )
        rows = datamodule.reference_rows("val")[: self.num_examples] if hasattr(datamodule, "reference_rows") else []
        if self.reward is None or not rows:
            if not self._warned:
                reason = "no validation rows" if not rows else "no 'reward' to score them with (ExactMatch, NumericMatch, ...)"
                rank_zero_warn(f"GreedyTaskAccuracy logs nothing: the data has no built-in task and {reason}")
                self._warned = True
            return None
        return greedy_reward_score(pl_module.policy, pl_module.tokenizer, rows, self.reward, **options)  # type: ignore[arg-type]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The initial policy's score, logged at step 0 (not when resuming)."""
        if trainer.global_step > 0 or getattr(pl_module, "initial_metrics", None):
            return
        score = self.score(trainer, pl_module)
        if score is None:
            return
        metrics = {"val/accuracy": score.accuracy, "val/reward": score.mean_reward}
        pl_module.initial_metrics = metrics  # type: ignore[assignment]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        rank_zero_info(f"initial policy: val/accuracy {score.accuracy:.3f}, val/reward {score.mean_reward:.3f} (greedy)")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = self.score(trainer, pl_module)
        if score is None:
            return
        pl_module.log("val/accuracy", score.accuracy, prog_bar=True)
        pl_module.log("val/reward", score.mean_reward)
