"""TRPO's objective and constraint: the importance-sampled surrogate and the exact mean token KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grape_lightning.losses.aggregation import aggregate


def trpo_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    num_tokens: int | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The surrogate TRPO maximises (not a loss: larger is better):

        S(theta) = (1/N) sum_{i,t} rho_it A_it,   rho_it = exp(l_it - l_it_old),   N = sum_i |y_i|

    ``advantages`` has the shape of ``logprobs`` or one dimension less (one value per sequence,
    broadcast over its tokens). ``num_tokens`` (N) defaults to ``mask.sum()``; pass the whole
    batch's when summing micro-batches. Metrics: ``ratio_mean`` over masked tokens.
    """
    if advantages.dim() < logprobs.dim():
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    mask = mask.bool()
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
    surrogate = aggregate(ratio * advantages.to(logprobs.dtype), mask, "token", num_tokens=num_tokens)
    with torch.no_grad():
        metrics = {"ratio_mean": (ratio * mask).sum() / mask.sum().clamp(min=1)}
    return surrogate, metrics


def categorical_kl(old_log_distribution: Tensor, log_distribution: Tensor) -> Tensor:
    """Exact KL(p_old || p) = sum_v p_old(v) (log p_old(v) - log p(v)) over the last dimension.

    Both arguments are log-probabilities over the whole vocabulary ([..., V]); returns [...].
    """
    return F.kl_div(log_distribution, old_log_distribution, reduction="none", log_target=True).sum(-1)


def mean_token_kl(
    old_log_distribution: Tensor, log_distribution: Tensor, mask: Tensor, *, num_tokens: int | float | None = None
) -> Tensor:
    """The TRPO constraint: KL-bar = (1/N) sum_{i,t} KL(pi_old(. | x_i, y_i<t) || pi_theta(. | x_i, y_i<t)),
    the exact per-token KL over the vocabulary averaged over the N response tokens (``mask``).

    Distributions are [..., V] log-probabilities, ``mask`` is [...]; ``num_tokens`` as in
    :func:`trpo_surrogate`.
    """
    return aggregate(categorical_kl(old_log_distribution, log_distribution), mask, "token", num_tokens=num_tokens)
