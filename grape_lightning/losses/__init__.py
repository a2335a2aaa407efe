"""Pure loss functions: tensors in, (loss, metrics) out. No Lightning here."""

from grape_lightning.losses.sft import sft_loss

__all__ = ["sft_loss"]
