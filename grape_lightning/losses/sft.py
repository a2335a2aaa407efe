"""Supervised fine-tuning loss."""

from __future__ import annotations

import torch
from torch import Tensor


def sft_loss(
    logprobs: Tensor, response_mask: Tensor, num_tokens: int | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Negative log-likelihood of the response tokens, averaged over response tokens.

        L = - sum_{b,t} m_bt * l_bt / sum_{b,t} m_bt

    where l_bt = log pi_theta(y_t | x, y_<t) and m_bt is 1 on response tokens (prompt and padding
    masked out). An empty mask gives a zero loss that still carries the graph.

    Args:
        logprobs: [batch, time] per-token log-probs of the target tokens.
        response_mask: [batch, time] bool or 0/1.
        num_tokens: the denominator; defaults to this batch's response tokens (pass a whole
            mini-batch's count when accumulating over micro-batches).
    """
    mask = response_mask.to(logprobs.dtype)
    count = mask.sum().detach()
    denominator = count.clamp(min=1) if num_tokens is None else max(float(num_tokens), 1.0)
    loss = -(logprobs * mask).sum() / denominator
    return loss, {"loss": loss.detach(), "num_response_tokens": count}


def sft_token_weights(response_mask: Tensor, num_tokens: int | float | Tensor, dtype=None) -> Tensor:
    """The same loss written as L = sum_{b,t} w_bt l_bt, linear in the log-probs:

        w_bt = -m_bt / max(num_tokens, 1)

    so the LM head can compute its gradient in the forward
    (:func:`~grape_lightning.models.logprobs.response_logprobs` with ``linear_loss_weights``).
    """
    weights = -response_mask.to(dtype or torch.float64)
    if isinstance(num_tokens, Tensor):  # a count still on the device: no synchronisation
        return weights / num_tokens.to(weights.dtype).clamp(min=1.0)
    return weights / max(float(num_tokens), 1.0)
