"""How per-token losses become one number: per sequence, per token, or a constant normaliser."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Aggregation = Literal["sequence", "token", "constant"]


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: Aggregation,
    *,
    constant_length: int | None = None,
    num_sequences: int | None = None,
    num_tokens: int | float | None = None,
) -> Tensor:
    """Reduce [batch, time] per-token values with a [batch, time] mask.

        sequence (GRPO):    (1/B) sum_i (1/|y_i|) sum_t v_it
        token (DAPO):       sum_{i,t} v_it / sum_i |y_i|
        constant (Dr GRPO): sum_{i,t} v_it / (B * L), L = ``constant_length`` (the generation budget)

    ``num_sequences`` (B) and ``num_tokens`` (sum |y_i|) default to this batch's; a caller that
    splits a mini-batch into micro-batches passes the mini-batch's, so the micro-batch losses add
    up to the mini-batch loss.
    """
    # select, not multiply: a non-finite value under padding (an inf KL term) must not make 0 * inf = NaN
    masked = torch.where(mask.bool(), values, 0.0)
    mask = mask.to(values.dtype)
    num_sequences = values.shape[0] if num_sequences is None else num_sequences
    if mode == "sequence":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / max(num_sequences, 1)
    if mode == "token":
        num_tokens = mask.sum() if num_tokens is None else num_tokens
        return masked.sum() / max(float(num_tokens), 1.0)
    if mode == "constant":
        if constant_length is None:
            raise ValueError("aggregation 'constant' needs constant_length (for example max_new_tokens)")
        return masked.sum() / (max(num_sequences, 1) * constant_length)
    raise ValueError(f"aggregation must be 'sequence', 'token' or 'constant', got {mode!r}")
