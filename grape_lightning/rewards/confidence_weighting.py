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
    """Rewards of the sample sets (responses sharing a group index answer the same prompt):

        omega_gk = w_k * mean_{i in g} c_ik                    (item weight for sample set g)
        r_i      = sum_k omega_gk s_ik / sum_k omega_gk        (k over the items of i's category)

    Args:
        scores: [N, K] s_ik in [0, 1]; confidences: [N, K] c_ik in [0, 1]; weights: [K] w_k.
        groups: [N] sample-set index of each response.
        applicable: [N, K] True where item k belongs to response i's rubric category.
        failed: [N, K] True where (i, k) could not be judged. Such a pair has c_ik = 0 and, since
            omega_gk multiplies every s_ik of the set, s_ik is set to the mean score of the judged
            members of the set: a failed judgement adds no relative signal.

    Returns (rewards [N], omega [num_groups, K]). A set whose omega are all 0 (no item could be
    judged with any confidence) gets NaN rewards: there is no reward, and it must not be guessed.
    """
    dtype = torch.promote_types(scores.dtype, torch.float64)
    scores, confidences, weights = scores.to(dtype), confidences.to(dtype), weights.to(dtype)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    judged = applicable & ~failed
    imputed = _group_mean(scores, judged, groups, num_groups)[groups]
    scores = torch.where(judged, scores, torch.where(applicable, imputed, 0.0))
    confidences = torch.where(judged, confidences, 0.0)
    applicable_in_group = _group_mean(applicable.to(dtype), torch.ones_like(applicable), groups, num_groups) > 0
    omega = weights * _group_mean(confidences, applicable, groups, num_groups) * applicable_in_group
    numerator = (omega[groups] * scores).sum(-1)
    denominator = omega[groups].sum(-1)
    rewards = torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(dtype).tiny), float("nan"))
    return rewards, omega
