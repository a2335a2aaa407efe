"""Reward scaling: sequence rewards divided by their spread, so that a reward keeps the same
meaning whatever its units (PPO's ``reward_scaling``).

    r <- r / s,   s = 1                                         (``none``)
                  s = std of the batch's valid rewards          (``batch``)
                  s = std of every valid reward seen so far     (``running``: this batch's included)

The std is the unbiased one over every process (:func:`~grape_lightning.advantages.moments_std`:
1 while it is undefined or 0). Rewards are divided, not shifted: their offset is the value
model's to learn. The running statistics (count, mean, M2) are a buffer, saved in checkpoints.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from grape_lightning.advantages import SumAcross, masked_moments, merge_moments, moments_std

RewardScaling = Literal["none", "batch", "running"]


class RewardScale(nn.Module):
    """s of one rollout batch; ``running`` first adds the batch's rewards to its statistics."""

    def __init__(self, mode: RewardScaling = "none") -> None:
        super().__init__()
        if mode not in ("none", "batch", "running"):
            raise ValueError(f"reward_scaling must be 'none', 'batch' or 'running', got {mode!r}")
        self.mode = mode
        self.register_buffer("moments", torch.zeros(3, dtype=torch.float64))  # count, mean, M2 of the rewards seen

    def forward(self, rewards: Tensor, valid: Tensor, sum_across: SumAcross) -> float:
        if self.mode == "none":
            return 1.0
        batch = masked_moments(rewards, valid, sum_across)
        if self.mode == "batch":
            return moments_std(batch)
        self.moments.copy_(merge_moments(self.moments, batch))
        return moments_std(self.moments)
