"""Per-token estimators of KL(pi_theta || pi_ref) from sampled tokens."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """With d_t = l_ref_t - l_t (tokens sampled from pi_theta):

        k1 = -d_t                      (unbiased, can be negative)
        k2 = d_t^2 / 2
        k3 = exp(d_t) - d_t - 1        (unbiased, always >= 0; GRPO's choice)
    """
    delta = ref_logprobs - logprobs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")
