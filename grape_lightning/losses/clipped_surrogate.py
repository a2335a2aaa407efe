"""The clipped importance-sampling surrogate shared by PPO, GRPO and GRAPE."""

from __future__ import annotations

import torch
from torch import Tensor


def clipped_surrogate(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped surrogate loss (to be aggregated):

        rho_t = exp(l_t - l_t_old)
        L_t   = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    ``advantages`` is [batch] (one per sequence, broadcast over tokens) or [batch, time].
    Returns the [batch, time] loss (zero where ``mask`` is off) and metrics over masked tokens:
    ``clip_fraction_low`` (rho below 1 - eps_low with A < 0: the clip is active),
    ``clip_fraction_high`` (rho above 1 + eps_high with A > 0), and ``ratio_mean``.
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    advantages = advantages.to(logprobs.dtype)
    mask = mask.bool()
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = torch.where(mask, -torch.minimum(unclipped, clipped), 0.0)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        metrics = {
            "clip_fraction_low": ((ratio < 1.0 - eps_low) & (advantages < 0) & mask).sum() / count,
            "clip_fraction_high": ((ratio > 1.0 + eps_high) & (advantages > 0) & mask).sum() / count,
            "ratio_mean": (ratio * mask).sum() / count,
        }
    return loss, metrics
