"""Per-token estimators of KL(pi_theta || pi_ref) from sampled tokens, and what their gradients follow."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """With d_t = l_ref_t - l_t (tokens y_t sampled from pi_theta):

        k1 = -d_t                      (unbiased, can be negative)
        k2 = d_t^2 / 2                 (biased, >= 0)
        k3 = exp(d_t) - d_t - 1        (unbiased, always >= 0; GRPO's choice)

    As values, k1 and k3 average to KL(pi || ref). As a loss term, differentiated through l_t with
    the sampled tokens held fixed (how GRPO's loss uses them), the expected gradients are

        E_pi[grad k1] = -E_pi[grad l]                  = 0                   (E_pi[grad log pi] = 0)
        E_pi[grad k2] =  E_pi[(l - l_ref) grad l]      = grad KL(pi || ref)
        E_pi[grad k3] =  E_pi[(1 - pi_ref/pi) grad l]  = -E_ref[grad l] = grad KL(ref || pi)

    so k1 penalises nothing in a loss (it is the right estimator in a reward, where the score
    function carries it: PPO, REINFORCE) and :func:`check_loss_estimator` refuses it there.
    """
    delta = ref_logprobs - logprobs
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta**2
    if estimator == "k3":
        return torch.expm1(delta) - delta
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def check_loss_estimator(estimator: str) -> None:
    """Refuse an estimator whose term in a loss has no expected gradient (k1, see :func:`kl_penalty`)."""
    if estimator == "k1":
        raise ValueError(
            "kl_estimator 'k1' cannot be a loss term: its expected gradient is -E_pi[grad log pi] = 0, so "
            "the KL penalty would be logged but would not pull the policy towards the reference. Use 'k3' "
            "(its gradient is that of KL(ref || pi); GRPO's choice) or 'k2' (that of KL(pi || ref)); k1 "
            "belongs in a reward (PPO, REINFORCE)"
        )
    if estimator not in ("k2", "k3"):
        raise ValueError(f"kl_estimator must be 'k2' or 'k3' in a loss, got {estimator!r}")
