"""Pure loss functions: tensors in, (loss, metrics) out. No Lightning here."""

from grape_lightning.losses.aggregation import aggregate
from grape_lightning.losses.bradley_terry import bradley_terry_loss
from grape_lightning.losses.cispo import cispo_loss
from grape_lightning.losses.clipped_surrogate import clipped_surrogate
from grape_lightning.losses.distillation import distillation_loss
from grape_lightning.losses.dpo import dpo_loss
from grape_lightning.losses.gspo import gspo_loss
from grape_lightning.losses.grpo import grpo_loss
from grape_lightning.losses.kl import kl_penalty
from grape_lightning.losses.mismatch import MismatchCorrection, correction_weights, mismatch_statistics
from grape_lightning.losses.reinforce import reinforce_loss
from grape_lightning.losses.sft import sft_loss, sft_token_weights

__all__ = [
    "aggregate", "bradley_terry_loss", "cispo_loss", "clipped_surrogate", "distillation_loss", "dpo_loss", "grpo_loss",
    "gspo_loss", "kl_penalty", "MismatchCorrection", "correction_weights", "mismatch_statistics", "reinforce_loss", "sft_loss",
    "sft_token_weights",
]
