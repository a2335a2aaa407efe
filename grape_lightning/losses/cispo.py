"""CISPO loss: REINFORCE on every token, weighted by a clipped, stop-gradient importance ratio."""

from __future__ import annotations

import torch
from torch import Tensor


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 1.0,
    eps_high: float = 0.28,
    num_tokens: int | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped IS-weight Policy Optimization (MiniMax-M1, 2025):

        r_it = exp(l_it - l_old_it)
        L    = -sum_{i,t} sg[clip(r_it, 1 - eps_low, 1 + eps_high)] A_i l_it / sum_i |y_i|

    over the response tokens of ``mask``; sum_i |y_i| is ``num_tokens`` (default: this batch's), so
    micro-batch losses add up to the mini-batch's. Unlike the clipped surrogate, a token whose ratio
    leaves the range keeps its gradient: only its weight is bounded. ``advantages`` is [batch] (one
    per sequence) or [batch, time].

    Defaults: MiniMax-M1 puts no lower bound on the weight (eps_low "large": 1.0 here, a floor of 0,
    which a ratio never goes below) and tunes only eps_high, whose value it does not publish; 0.28
    is DAPO's clip-higher bound, the usual choice. Metrics: ``policy_loss``, ``clip_fraction_low`` /
    ``clip_fraction_high`` (response tokens whose weight is clipped, whatever the advantage's sign)
    and ``ratio_mean``.

    ``token_weights`` w_it (no gradient; 1 when None) multiply each token's weight,
    sg[w_it clip(r_it, ...)]: the sampler/trainer mismatch correction of
    :func:`~grape_lightning.losses.mismatch.correction_weights`.
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    advantages = advantages.to(logprobs.dtype)
    with torch.no_grad():
        ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
        weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        if token_weights is not None:
            weight = weight * token_weights.to(weight.dtype)
    # select, not multiply: padding log-probs (possibly -inf) must not leak into the sum
    total = torch.where(mask, weight * advantages * logprobs, 0.0).sum()
    count = mask.sum() if num_tokens is None else num_tokens
    loss = -total / max(float(count), 1.0)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1).to(logprobs.dtype)
        metrics = {
            "policy_loss": loss.detach(),
            "clip_fraction_low": ((ratio < 1.0 - eps_low) & mask).sum() / tokens,
            "clip_fraction_high": ((ratio > 1.0 + eps_high) & mask).sum() / tokens,
            "ratio_mean": (ratio * mask).sum() / tokens,
        }
    return loss, metrics
