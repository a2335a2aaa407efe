"""On-policy distillation: the reverse KL to a teacher on the student's own samples, as a policy gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from grape_lightning.advantages import gae


def distillation_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    discount: float = 0.0,
    task_advantages: Tensor | None = None,
    reward_coef: float = 0.0,
    num_tokens: int | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """With y sampled from the student pi, l_t = log pi(y_t | x, y_<t) (the student, with gradients)
    and l^T_t = log pi_T(y_t | x, y_<t) (the teacher, fixed):

        k_t  = l_t - l^T_t                                      (sampled-token estimate of the
                                                                  reverse KL(pi || pi_T) at position t)
        A_t  = -sum_{t' >= t} gamma^(t' - t) sg[k_t']  +  alpha A_i
        L    = -sum_{i,t} A_it l_it / sum_i |y_i|

    over the response tokens of ``mask``; t' runs over the masked tokens of the row, so a hole in
    the mask is skipped, not discounted. gamma is ``discount``, alpha ``reward_coef`` and A_i the
    task-reward advantage of sequence i (``task_advantages``, [batch]; None: no task term);
    sum_i |y_i| is ``num_tokens`` (default: this batch's), so micro-batch losses add up to the
    mini-batch's.

    Why this estimator. k_t is an unbiased estimate of KL(pi(.|s_t) || pi_T(.|s_t)) at the state
    s_t = (x, y_<t), and with the score function (E_pi[grad l] = 0) the gradient of L is, in
    expectation over the samples,

        gamma = 0:  sum_t E_{s_t}[ grad KL(pi(.|s_t) || pi_T(.|s_t)) ]     (states held fixed: the
                    per-token reverse KL of on-policy distillation, the lowest-variance choice)
        gamma = 1:  grad KL(pi(y|x) || pi_T(y|x)) = grad E_pi[sum_t k_t]    (the exact gradient of
                    the sequence-level reverse KL, through the states too)

    minus alpha times the REINFORCE gradient of the task reward. It needs only the teacher's
    log-prob of each sampled token, computed once per rollout: the exact full-vocabulary KL at each
    position would need both models' logits over the whole vocabulary at every response token in
    every update pass (a second model's forward per micro-batch, and [tokens, V] logits that the
    chunked log-prob computation otherwise never forms), would require the two vocabularies to
    match row for row, and would still ignore the states' dependence on pi (gamma = 0's bias), for
    no change in what is minimised: both are 0 exactly when pi = pi_T on the states the student
    visits.

    The value of L is a surrogate, not the KL: ``reverse_kl`` reports sum_{i,t} k_it / sum_i |y_i|
    (the token-mean estimate of the reverse KL). Metrics: ``policy_loss`` (L), ``reverse_kl``.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    mask = mask.bool()
    with torch.no_grad():
        # select, not multiply: padding log-probs (possibly -inf) must not leak into any sum
        kl = torch.where(mask, logprobs.detach() - teacher_logprobs.to(logprobs.dtype), 0.0)
        if discount == 0.0:
            advantages = -kl
        else:
            advantages, _ = gae(-kl, torch.zeros_like(kl), mask, gamma=discount, lam=1.0)  # return-to-go of -k
        if task_advantages is not None and reward_coef != 0.0:
            advantages = advantages + reward_coef * task_advantages.to(logprobs.dtype)[:, None]
    count = max(float(mask.sum() if num_tokens is None else num_tokens), 1.0)
    loss = -torch.where(mask, advantages * logprobs, 0.0).sum() / count
    return loss, {"policy_loss": loss.detach(), "reverse_kl": kl.sum() / count}
