"""One LightningModule per algorithm."""

from grape_lightning.algorithms.base import PolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.sft import SFTModule

__all__ = ["OptimizerConfig", "PolicyModule", "SFTModule"]
