"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch
from torch import Tensor


def sft_loss(logprobs: Tensor, response_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the response tokens, averaged over response tokens.

        L = - sum_{b,t} m_bt * l_bt / sum_{b,t} m_bt

    where l_bt = log pi_theta(y_t | x, y_<t) and m_bt is 1 on response tokens (prompt and padding
    masked out). An empty mask gives a zero loss that still carries the graph.

    Args:
        logprobs: [batch, time] per-token log-probs of the target tokens.
        response_mask: [batch, time] bool or 0/1.
    """
    mask = response_mask.to(logprobs.dtype)
    num_tokens = mask.sum()
    loss = -(logprobs * mask).sum() / num_tokens.clamp(min=1)
    return loss, {"loss": loss.detach(), "num_response_tokens": num_tokens.detach()}
