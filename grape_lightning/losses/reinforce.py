"""REINFORCE (the score-function policy gradient) with a baseline."""

from __future__ import annotations

import torch
from torch import Tensor


def reinforce_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, num_sequences: int | None = None, token_weights: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = -(1/B) sum_i A_i * l(y_i),   l(y_i) = sum_t l_it over response tokens,  A_i = r_i - b_i.

    Its gradient is the REINFORCE estimator -(1/B) sum_i (r_i - b_i) grad log pi(y_i | x_i).
    ``num_sequences`` (B) defaults to this batch's; pass the whole batch's when accumulating.

    Per-token advantages A_it ([batch, time]: a reward-to-go, as REINFORCE++'s per-token KL reward
    gives) and per-token weights w_it (no gradient; 1 when None: the sampler/trainer mismatch
    correction of :func:`~grape_lightning.losses.mismatch.correction_weights`) generalise it to

        L = -(1/B) sum_i sum_t w_it A_it l_it
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logprobs)
    coefficients = advantages.to(logprobs.dtype)
    if token_weights is not None:
        coefficients = coefficients * token_weights.detach().to(logprobs.dtype)
    # select, not multiply: padding log-probs (possibly -inf) never leak in
    sequence_logprobs = torch.where(mask, logprobs, 0.0).sum(-1)
    count = logprobs.shape[0] if num_sequences is None else num_sequences
    loss = -torch.where(mask, coefficients * logprobs, 0.0).sum() / max(count, 1)
    return loss, {"policy_loss": loss.detach(), "sequence_logprob_mean": sequence_logprobs.detach().mean()}
