"""GRAPE's confidence-weighted aggregation of rubric item scores into one reward per response."""

from __future__ import annotations

import torch
from torch import Tensor


def _group_mean(values: Tensor, members: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """[num_groups, K] mean of ``values`` [N, K] over the rows of each group where ``members`` [N, K]."""
    weights = members.to(values.dtype)
    sums = torch.zeros(num_groups, values.shape[1], dtype=values.dtype, device=values.device).index_add(0, groups, values * weights)
    counts = torch.zeros_like(sums).index_add(0, groups, weights)
    return sums / counts.clamp(min=1)


def confidence_weighted_rewards(
    scores: Tensor, confidences: Tensor, weights: Tensor, groups: Tensor, applicable: Tensor, failed: Tensor
) -> tuple[Tensor, Tensor]:
    """Rewards of the sample sets (responses sharing a group index answer the same prompt).

    With J_i the items of i's category that could be scored (``applicable & ~failed``) and a set's
    members the responses with at least one scored item,

        omega_gk = w_k * mean_{i in g, k applicable} c_ik      (c_ik = 0 where (i, k) failed)
        r_i      = sum_{k in J_i} omega_gk s_ik / sum_{k in J_i} omega_gk

    - a response none of whose items could be scored is not a member: its reward is NaN, so it
      leaves the update and every statistic of its set, as an unscored response does in GRPO
      (with one verifiable item of weight 1 GRAPE stays exactly GRPO when a verifier fails);
    - a partially scored response aggregates over the items that were scored: a failed (i, k)
      gives no score, and i's reward is the omega-weighted mean of its other items;
    - a failure still counts as confidence 0 in omega_gk: an item that often cannot be judged
      loses weight in its set.

    Args:
        scores: [N, K] s_ik in [0, 1]; confidences: [N, K] c_ik in [0, 1]; weights: [K] w_k.
        groups: [N] sample-set index of each response.
        applicable: [N, K] True where item k belongs to response i's rubric category.
        failed: [N, K] True where (i, k) could not be scored (s_ik, c_ik are then ignored).

    Returns (rewards [N], omega [num_groups, K]). A response whose scored items all have
    omega_gk = 0 (none judged with any confidence in its set) also gets NaN: there is no reward,
    and it must not be guessed.
    """
    dtype = torch.promote_types(scores.dtype, torch.float64)
    scores, confidences, weights = scores.to(dtype), confidences.to(dtype), weights.to(dtype)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    scored = applicable & failed.logical_not()
    member = scored.any(-1, keepdim=True)
    confidences = torch.where(scored, confidences, 0.0)
    omega = weights * _group_mean(confidences, applicable & member, groups, num_groups)
    item_weights = torch.where(scored, omega[groups], 0.0)
    numerator = (item_weights * torch.where(scored, scores, 0.0)).sum(-1)
    denominator = item_weights.sum(-1)
    rewards = torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(dtype).tiny), float("nan"))
    return rewards, omega
