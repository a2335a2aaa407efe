"""Bradley-Terry reward model: a scalar head on the last real token, trained on preference pairs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from grape_lightning.algorithms.base import as_dataclass, log_stage, save_plain_hyperparameters
from grape_lightning.algorithms.optim import OptimizerConfig, build_optimizer, fused_optimizer_allowed
from grape_lightning.losses.bradley_terry import bradley_terry_loss
from grape_lightning.models.loading import load_sequence_scorer, load_tokenizer
from grape_lightning.models.sharding import shard_sequence_scorer
from grape_lightning.models.scores import last_token_scores
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.tokenizer_check import save_tokenizer


class RewardModelModule(L.LightningModule):
    """Trains r(x, y) with L = -mean log sigmoid(r(x, y_w) - r(x, y_l) - m) on batches of
    :class:`~grape_lightning.data.preference.PreferenceDataModule`.

    ``model`` may point at a causal LM (an SFT checkpoint: its trunk is kept, the scalar head
    starts fresh), at a saved reward model, or be built from a config. The margin m is
    ``margin`` plus each pair's own ``margin`` from the data (0 when absent). The trained model is
    a Hugging Face sequence-classification model (``export_hf`` / the ``HFExport`` callback), usable
    as a reward function through :class:`~grape_lightning.rewards.RewardModelScore`.

    Args:
        model: the reward model: a causal LM trunk (new scalar head), a saved reward model, or a config.
        optimizer: AdamW and learning-rate schedule (defaults when None).
        margin: m added to every pair's own margin in -log sigmoid(r_w - r_l - m).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
    """

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerConfig | None = None,
        margin: float = 0.0,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        model = as_dataclass(model, ModelSpec)
        self.optimizer_config: OptimizerConfig = as_dataclass(optimizer, OptimizerConfig) or OptimizerConfig()
        save_plain_hyperparameters(self, model=model, optimizer=self.optimizer_config)
        self.tokenizer = load_tokenizer(model)
        self.reward_model = load_sequence_scorer(model, self.tokenizer)
        if gradient_checkpointing:
            self.reward_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reward_model.train()
        self.margin = margin

    def scores(self, batch: dict[str, Tensor]) -> Tensor:
        return last_token_scores(self.reward_model, batch["input_ids"], batch["attention_mask"])

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        scores = self.scores(batch)
        pairs = len(batch["pair_ids"])
        loss, metrics = bradley_terry_loss(scores[:pairs], scores[pairs:], self.margin + batch["margins"].to(scores.dtype))
        log_stage(self, stage, metrics, pairs, prog_bar=("loss", "accuracy"))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 units (:func:`~grape_lightning.models.sharding.shard_sequence_scorer`)."""
        if self._device_mesh is None or getattr(self, "_sharded", False):
            return
        mesh = self._device_mesh
        shard_sequence_scorer(self.reward_model, mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh)
        self._sharded = True

    def configure_optimizers(self) -> dict:
        return build_optimizer(
            [self.reward_model], self.optimizer_config, int(self.trainer.estimated_stepping_batches),
            fused=fused_optimizer_allowed(self._trainer),
        )

    def export_hf(self, directory: str | Path) -> Path:
        """Save the reward model and tokenizer with ``save_pretrained``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.reward_model.save_pretrained(directory, safe_serialization=True)
        save_tokenizer(self.tokenizer, directory)
        return directory
