"""GSPO loss: a length-normalised sequence importance ratio, clipped per sequence."""

from __future__ import annotations

import torch
from torch import Tensor


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    token_level: bool = False,
    num_sequences: int | float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Group Sequence Policy Optimization (Zheng et al., 2025):

        s_i = exp( (1/|y_i|) sum_t (l_it - l_old_it) )          (geometric mean of the token ratios)
        L   = -(1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    over the response tokens of ``mask``; B is ``num_sequences`` (default: the rows with a response
    token), so micro-batch losses add up to the mini-batch's. The clip range is GSPO's: a sequence
    ratio moves far less than a token ratio (3e-4 below 1, 4e-4 above).

    ``token_level`` is GSPO-token, for per-token advantages A_it ([batch, time]):

        s_it = sg[s_i] * pi(y_it) / sg[pi(y_it)]
        L    = -(1/B) sum_i (1/|y_i|) sum_t min(s_it A_it, clip(s_it, 1 - eps_low, 1 + eps_high) A_it)

    s_it equals s_i in value, so with A_it = A_i the loss and its gradient are GSPO's.

    ``token_weights`` w_it (no gradient; 1 when None) weigh the per-token terms, which needs the
    per-token form whatever ``token_level`` says (GSPO's loss and gradient at w = 1):

        L = -(1/B) sum_i (1/|y_i|) sum_t w_it min(s_it A_i, clip(s_it, 1 - eps_low, 1 + eps_high) A_i)

    (the sampler/trainer mismatch correction of :func:`~grape_lightning.losses.mismatch.correction_weights`).
    Metrics: ``policy_loss``, ``clip_fraction_low`` / ``clip_fraction_high`` (response tokens whose
    clip is active: s below 1 - eps_low with A < 0, above 1 + eps_high with A > 0) and
    ``ratio_mean`` (s_i averaged over the response tokens: each sequence weighs its length).
    """
    mask = mask.bool()
    if advantages.dim() == 2 and not token_level:
        raise ValueError("gspo_loss: per-token advantages [batch, time] need token_level=True (GSPO-token)")
    lengths = mask.sum(-1).clamp(min=1).to(logprobs.dtype)
    # select, not multiply: padding log-probs (possibly -inf) must not leak into the sum
    sequence_ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0).sum(-1) / lengths)  # s_i, [batch]
    if token_level or token_weights is not None:
        ratio = sequence_ratio.detach()[:, None] * torch.exp(torch.where(mask, logprobs - logprobs.detach(), 0.0))
        token_advantages = (advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)).to(logprobs.dtype)
        surrogate = torch.minimum(ratio * token_advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * token_advantages)
        if token_weights is not None:
            surrogate = surrogate * token_weights.detach().to(surrogate.dtype)
        per_sequence = torch.where(mask, surrogate, 0.0).sum(-1) / lengths
    else:
        token_advantages = advantages[:, None].expand_as(logprobs).to(logprobs.dtype)
        ratio = sequence_ratio[:, None].expand_as(logprobs)
        advantages = advantages.to(logprobs.dtype)
        per_sequence = torch.minimum(sequence_ratio * advantages, sequence_ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)
    present = mask.any(-1)
    count = int(present.sum()) if num_sequences is None else num_sequences
    loss = -torch.where(present, per_sequence, 0.0).sum() / max(float(count), 1.0)
    with torch.no_grad():
        # token means (the update weighs micro-batches by their tokens), in the log-probs' precision
        tokens = mask.sum().clamp(min=1).to(logprobs.dtype)
        metrics = {
            "policy_loss": loss.detach(),
            "clip_fraction_low": ((ratio < 1.0 - eps_low) & (token_advantages < 0) & mask).sum() / tokens,
            "clip_fraction_high": ((ratio > 1.0 + eps_high) & (token_advantages > 0) & mask).sum() / tokens,
            "ratio_mean": (sequence_ratio * mask.sum(-1)).sum() / tokens,
        }
    return loss, metrics
