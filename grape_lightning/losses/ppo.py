"""PPO loss: clipped surrogate, clipped value loss and an optional entropy bonus, per token."""

from __future__ import annotations

import torch
from torch import Tensor

from grape_lightning.losses.aggregation import Aggregation, aggregate
from grape_lightning.losses.clipped_surrogate import clipped_surrogate
from grape_lightning.losses.kl import kl_penalty


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float | None) -> tuple[Tensor, Tensor]:
    """Per-token value loss (to be aggregated):

        V_clip_t = V_old_t + clip(V_t - V_old_t, -c, c)
        L_t      = 1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2)        (1/2 (V_t - R_t)^2 for c = None)

    Returns the [batch, time] loss (zero where ``mask`` is off) and a [batch, time] bool tensor
    marking the tokens where the clipped term is the larger one (its gradient is then zero).
    """
    mask = mask.bool()
    returns = returns.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip is None:
        return torch.where(mask, 0.5 * unclipped, 0.0), torch.zeros_like(mask)
    clipped_values = old_values.to(values.dtype) + torch.clamp(values - old_values, -clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = torch.where(mask, 0.5 * torch.maximum(unclipped, clipped), 0.0)
    return loss, (clipped > unclipped) & mask


def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    entropy: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.5,
    entropy_coef: float = 0.0,
    aggregation: Aggregation = "token",
    constant_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = agg_{i,t}[ -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) ]
         + vf_coef * agg_{i,t}[ 1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2) ]
         - entropy_coef * agg_{i,t}[ H_t ]

    with per-token advantages A_t and value targets R_t (from GAE), V_clip as in
    :func:`clipped_value_loss`, H_t the entropy of pi_theta( . | x, y_<t) (needed only when
    ``entropy_coef`` != 0) and ``agg`` one of :func:`~grape_lightning.losses.aggregation.aggregate`'s
    modes (``num_sequences`` / ``num_tokens`` are the mini-batch's when it is split into micro-batches).

    Metrics: ``policy_loss``, ``value_loss``, ``entropy`` (when given), the clip fractions and
    ``ratio_mean`` of the surrogate, ``value_clip_fraction`` and ``approx_kl``, the mean over tokens
    of (rho_t - 1) - log rho_t, an unbiased, non-negative estimate of KL(pi_old || pi_theta).
    """
    mask = mask.bool()
    reduce = dict(constant_length=constant_length, num_sequences=num_sequences, num_tokens=num_tokens)
    token_policy_loss, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
    policy_loss = aggregate(token_policy_loss, mask, aggregation, **reduce)
    token_value_loss, value_clipped = clipped_value_loss(values, old_values, returns, mask, value_clip)
    value_loss = aggregate(token_value_loss, mask, aggregation, **reduce)
    loss = policy_loss + vf_coef * value_loss
    count = mask.sum().clamp(min=1)
    with torch.no_grad():
        metrics["policy_loss"] = policy_loss.detach()
        metrics["value_loss"] = value_loss.detach()
        metrics["value_clip_fraction"] = value_clipped.sum() / count
        # KL(pi_old || pi_theta) on tokens sampled from pi_old: k3 with the roles of the two policies swapped
        metrics["approx_kl"] = torch.where(mask, kl_penalty(old_logprobs, logprobs.detach(), "k3"), 0.0).sum() / count
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs entropy")
        loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, **reduce)
    if entropy is not None:
        metrics["entropy"] = torch.where(mask, entropy.detach(), 0.0).sum() / count
    return loss, metrics


def adaptive_kl_coef(kl_coef: float, kl: float, kl_target: float, num_sequences: float, horizon: float) -> float:
    """The adaptive KL controller of Ziegler et al. (2019), after a batch of ``num_sequences``
    sequences whose mean KL to the reference was ``kl``:

        e    = clip(kl / kl_target - 1, -0.2, 0.2)
        beta <- beta (1 + e * num_sequences / horizon)
    """
    error = min(max(kl / kl_target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * num_sequences / horizon)
