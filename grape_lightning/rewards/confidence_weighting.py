"""GRAPE's aggregation of rubric item scores into one reward per response: the weight of each item
in each sample set (``confidence``, ``reliability`` or ``fixed``), then the weighted mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

WeightingMode = Literal["confidence", "reliability", "fixed"]


@dataclass
class WeightingConfig:
    """How a rubric item's weight in a sample set, omega_gk, is formed from its rubric weight w_k
    (:func:`item_weights` states the equations).

    Args:
        mode: ``confidence`` (omega_gk = w_k mean_i c_ik, the default), ``reliability``
            (omega_gk = w_k R_k f_gk with R_k the running agreement of a judged item with the
            verifiable items of its category; confidence where it has not been measured) or
            ``fixed`` (omega_gk = w_k; confidences ignored).
        momentum: of the running reliability estimate, R <- momentum R + (1 - momentum) a_step
            (:class:`~grape_lightning.rewards.judge_reliability.ReliabilityEstimate`).
    """

    mode: WeightingMode = "confidence"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.mode not in WeightingMode.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"weighting.mode must be one of {WeightingMode.__args__}, got {self.mode!r}")  # type: ignore[attr-defined]
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"weighting.momentum must be in [0, 1), got {self.momentum!r}")


def _group_mean(values: Tensor, members: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """[num_groups, K] mean of ``values`` [N, K] over the rows of each group where ``members`` [N, K]."""
    weights = members.to(values.dtype)
    sums = torch.zeros(num_groups, values.shape[1], dtype=values.dtype, device=values.device).index_add(0, groups, values * weights)
    counts = torch.zeros_like(sums).index_add(0, groups, weights)
    return sums / counts.clamp(min=1)


def _num_groups(groups: Tensor) -> int:
    return int(groups.max()) + 1 if groups.numel() else 0


def set_members(applicable: Tensor, failed: Tensor) -> Tensor:
    """[N, 1] bool: the members of their sample set, the responses with at least one scored item."""
    return (applicable & failed.logical_not()).any(-1, keepdim=True)


def item_present(groups: Tensor, applicable: Tensor, failed: Tensor) -> Tensor:
    """[num_groups, K] bool: item k applies to a member of set g (omega_gk is defined there)."""
    present = (applicable & set_members(applicable, failed)).to(torch.float64)
    counts = torch.zeros(_num_groups(groups), applicable.shape[1], dtype=torch.float64, device=applicable.device)
    return counts.index_add(0, groups, present) > 0


def item_weights(
    mode: WeightingMode,
    weights: Tensor,
    confidences: Tensor,
    groups: Tensor,
    applicable: Tensor,
    failed: Tensor,
    reliability: Tensor | None = None,
    measured: Tensor | None = None,
) -> Tensor:
    """[num_groups, K] omega_gk, the weight of item k in sample set g.

    With the set's members the responses with at least one scored item, M_gk those members to
    which item k applies, c_ik = 0 where (i, k) failed, and f_gk = |{i in M_gk: (i, k) scored}| / |M_gk|
    the share of them on which k could be scored:

        confidence:   omega_gk = w_k * mean_{i in M_gk} c_ik
        reliability:  omega_gk = w_k * R_k * f_gk           where R_k is measured (``measured[k]``)
                      omega_gk = w_k * mean_{i in M_gk} c_ik  elsewhere (as ``confidence``)
        fixed:        omega_gk = w_k

    and omega_gk = 0 where M_gk is empty. ``confidence`` lets an item the critic cannot judge
    confidently lose influence; ``reliability`` replaces the critic's own confidence by how often
    the item has agreed with the verifiable items of its category (R_k, measured over the run:
    :mod:`~grape_lightning.rewards.judge_reliability`), keeping the failure share f_gk, so a
    verifiable item (c = 1 where scored, R = 1) has the same weight in both; ``fixed`` uses the
    rubric's weights as they are: confidences are ignored, and a failed (i, k) only leaves item k
    out of response i's mean (it does not lower omega).

    Args:
        mode: ``confidence``, ``reliability`` or ``fixed``.
        weights: [K] w_k; confidences: [N, K] c_ik; groups: [N] sample-set index of each response.
        applicable: [N, K] item k belongs to response i's category; failed: [N, K] (i, k) was not scored.
        reliability: [K] R_k (``reliability`` mode); measured: [K] bool, R_k has been measured.
    """
    dtype = torch.promote_types(confidences.dtype, torch.float64)
    weights, confidences = weights.to(dtype), confidences.to(dtype)
    num_groups = _num_groups(groups)
    scored = applicable & failed.logical_not()
    members = applicable & set_members(applicable, failed)
    present = item_present(groups, applicable, failed)
    if mode == "fixed":
        return torch.where(present, weights.expand(num_groups, -1), 0.0)
    confidence = weights * _group_mean(torch.where(scored, confidences, 0.0), members, groups, num_groups)
    if mode == "confidence":
        return confidence
    if mode != "reliability":
        raise ValueError(f"unknown weighting mode {mode!r}")
    if reliability is None or measured is None:
        raise ValueError("weighting 'reliability' needs the items' reliability and which of them are measured")
    share_scored = _group_mean(scored.to(dtype), members, groups, num_groups)
    by_reliability = weights * reliability.to(dtype).to(weights.device) * share_scored
    return torch.where(measured.to(weights.device), by_reliability, confidence)


def item_shares(omega: Tensor, groups: Tensor, scored: Tensor) -> Tensor:
    """[N, K] u_ik = omega_{g_i k} / sum_{j in J_i} omega_{g_i j} for k in J_i (the items scored on
    response i), 0 elsewhere and on a row whose scored items all have omega 0: the weights of
    response i's mean, r_i = sum_k u_ik s_ik."""
    per_row = torch.where(scored, omega[groups], 0.0)
    denominator = per_row.sum(-1, keepdim=True)
    return torch.where(denominator > 0, per_row / denominator.clamp(min=torch.finfo(per_row.dtype).tiny), 0.0)


def weighted_rewards(scores: Tensor, omega: Tensor, groups: Tensor, scored: Tensor) -> Tensor:
    """[N] r_i = sum_{k in J_i} omega_{g_i k} s_ik / sum_{k in J_i} omega_{g_i k}, NaN where the
    denominator is 0 (no scored item, or none with any weight: no reward, and it must not be guessed)."""
    dtype = torch.promote_types(scores.dtype, torch.float64)
    item_weights_ = torch.where(scored, omega[groups], 0.0)
    numerator = (item_weights_ * torch.where(scored, scores.to(dtype), 0.0)).sum(-1)
    denominator = item_weights_.sum(-1)
    return torch.where(denominator > 0, numerator / denominator.clamp(min=torch.finfo(dtype).tiny), float("nan"))


def confidence_weighted_rewards(
    scores: Tensor, confidences: Tensor, weights: Tensor, groups: Tensor, applicable: Tensor, failed: Tensor,
    mode: WeightingMode = "confidence", reliability: Tensor | None = None, measured: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Rewards of the sample sets (responses sharing a group index answer the same prompt).

    With J_i the items of i's category that could be scored (``applicable & ~failed``) and a set's
    members the responses with at least one scored item, by default (``mode`` ``confidence``)

        omega_gk = w_k * mean_{i in g, k applicable} c_ik      (c_ik = 0 where (i, k) failed)
        r_i      = sum_{k in J_i} omega_gk s_ik / sum_{k in J_i} omega_gk

    (the other modes' omega: :func:`item_weights`).

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
        mode, reliability, measured: the weighting (:func:`item_weights`).

    Returns (rewards [N], omega [num_groups, K]). A response whose scored items all have
    omega_gk = 0 (none judged with any confidence in its set) also gets NaN: there is no reward,
    and it must not be guessed.
    """
    dtype = torch.promote_types(scores.dtype, torch.float64)
    scores, confidences, weights = scores.to(dtype), confidences.to(dtype), weights.to(dtype)
    omega = item_weights(mode, weights, confidences, groups, applicable, failed, reliability, measured)
    return weighted_rewards(scores, omega, groups, applicable & failed.logical_not()), omega
