"""GRPO loss: clipped surrogate with group-relative advantages plus a k3 KL term to the reference."""

from __future__ import annotations

from torch import Tensor

from grape_lightning.losses.aggregation import Aggregation, aggregate
from grape_lightning.losses.clipped_surrogate import clipped_surrogate
from grape_lightning.losses.kl import KLEstimator, check_loss_estimator, kl_penalty


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "sequence",
    kl_estimator: KLEstimator = "k3",
    constant_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = agg_{i,t} [ -w_it min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta * KL_it ]

    with KL_it = exp(l_ref - l) - (l_ref - l) - 1 (k3; or k2, never k1, whose expected gradient is 0:
    see :func:`~grape_lightning.losses.kl.kl_penalty`) and ``agg`` one of
    :func:`~grape_lightning.losses.aggregation.aggregate`'s modes. ``beta = 0`` needs no reference
    (with one, ``kl`` is still reported, by any estimator). Metrics: ``policy_loss``, ``kl`` (the
    aggregated KL), clip fractions and ``ratio_mean``.

    ``token_weights`` w [batch, time] (no gradient; 1 when None) weighs each token's policy term,
    not its KL term: the sampler/trainer mismatch correction of
    :func:`~grape_lightning.losses.mismatch.correction_weights`.
    """
    if beta != 0.0:
        check_loss_estimator(kl_estimator)
    token_loss, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, eps_low, eps_high)
    if token_weights is not None:
        token_loss = token_loss * token_weights.detach().to(token_loss.dtype)
    reduce = dict(constant_length=constant_length, num_sequences=num_sequences, num_tokens=num_tokens)
    policy_loss = aggregate(token_loss, mask, aggregation, **reduce)
    loss = policy_loss
    if ref_logprobs is not None:
        kl = aggregate(kl_penalty(logprobs, ref_logprobs, kl_estimator), mask, aggregation, **reduce)
        metrics["kl"] = kl.detach()
        if beta != 0.0:
            loss = loss + beta * kl
    elif beta != 0.0:
        raise ValueError("beta != 0 needs ref_logprobs")
    metrics["policy_loss"] = policy_loss.detach()
    return loss, metrics
