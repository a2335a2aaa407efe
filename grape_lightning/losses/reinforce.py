"""REINFORCE (the score-function policy gradient) with a baseline."""

from __future__ import annotations

import torch
from torch import Tensor


def reinforce_loss(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, num_sequences: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = -(1/B) sum_i A_i * l(y_i),   l(y_i) = sum_t l_it over response tokens,  A_i = r_i - b_i.

    Its gradient is the REINFORCE estimator -(1/B) sum_i (r_i - b_i) grad log pi(y_i | x_i).
    ``num_sequences`` (B) defaults to this batch's; pass the whole batch's when accumulating.
    """
    sequence_logprobs = torch.where(mask.bool(), logprobs, 0.0).sum(-1)  # select: padding never leaks in
    count = logprobs.shape[0] if num_sequences is None else num_sequences
    loss = -(advantages.to(logprobs.dtype) * sequence_logprobs).sum() / max(count, 1)
    return loss, {"policy_loss": loss.detach(), "sequence_logprob_mean": sequence_logprobs.detach().mean()}
