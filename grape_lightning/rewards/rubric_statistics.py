"""What a GRAPE run logs about each rubric item at each step, over every process's responses.

For item k ("category/item") at one training step, with the notation of
:mod:`~grape_lightning.rewards.confidence_weighting` (J_i the items scored on response i, omega_gk
the item weights of the step's weighting, u_ik = omega_{g_i k} / sum_{j in J_i} omega_{g_i j} the
weights of i's mean, so r_i = sum_k u_ik s_ik) and R the valid responses (those with a reward):

- ``failures``: the (i, k) that could not be scored (critic failures, verifiers returning None);
- ``score``: mean s_ik over the scored (i, k); ``confidence``: mean c_ik over the responses k
  applies to (a failure counts 0);
- ``spread``: the std of s_ik within a sample set (unbiased, over its scored responses), averaged
  over the sets with two or more of them (0 when there is none): 0 means the item never told a
  set's responses apart and carried no signal;
- ``omega``: omega_gk averaged over the sample sets whose members k applies to;
- ``reward_share``: sum_{i in R} u_ik s_ik / sum_{i in R} r_i, the item's part of the total reward
  (the shares of the items sum to 1; not logged when the total is 0);
- ``advantage_share``: sum_{i in R} sign(A_i) A_ik / sum_{i in R} |A_i|, where A_ik is the item's
  term of the advantage (:func:`item_advantages`: sum_k A_ik = A_i): the part of sum |A| the item
  carried. The shares sum to 1; an item whose terms push against the advantages the others make
  has a negative share; not logged when every advantage is 0;
- ``agreement`` and ``calibration_error`` of the items that are not verifiable, on the responses
  with a scored verifiable item of the same category
  (:mod:`~grape_lightning.rewards.judge_reliability`).

Every quantity is a ratio of sums that the processes add up (groups never straddle processes), so a
multi-process run logs the statistics of its global batch; ``critic_failures`` is the total of the
failures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, group_statistics, leave_one_out_baseline, masked_moments
from grape_lightning.rewards.confidence_weighting import item_present, item_shares
from grape_lightning.rewards.judge_reliability import CALIBRATION_BINS, agreement, calibration_sums, expected_calibration_error

SumAcross = Callable[[Tensor], Tensor]

STATISTICS = ("failures", "score", "confidence", "spread", "omega", "reward_share", "advantage_share", "agreement", "calibration_error")
"""The per-item statistics, logged as ``rubric/<category>/<item>/<name>``."""

DECOMPOSED_BASELINES = ("none", "mean", "leave_one_out", "batch_mean")
"""Baselines linear in the rewards: the advantage splits into one term per item."""


def _this_process(tensor: Tensor) -> Tensor:
    return tensor


def item_advantages(
    config: AdvantageConfig, terms: Tensor, rewards: Tensor, groups: Tensor, valid: Tensor, sum_across: SumAcross = _this_process
) -> tuple[Tensor, Tensor]:
    """The advantage A = scale(r - b) (:func:`~grape_lightning.advantages.compute_advantages`) split
    into one term per item: ([N, K] A_ik, [N] A_i).

    With t_ik = u_ik s_ik (``terms``, 0 off the valid rows) r_i = sum_k t_ik, and every baseline
    of :data:`DECOMPOSED_BASELINES` is linear in the rewards: b_i(r) = sum_k b_i(t_k). The scale
    is the one the rewards get (the group's or the batch's std of r; for ``whiten`` the std of
    r - b), so

        A_ik = (t_ik - b_i(t_k)) / sigma_i             (none, group, batch scaling)
        A_ik = (c_ik - mean_R c_k) / (std_R c + eps)   (whiten; c_k = t_k - b(t_k), c = r - b(r))

    and sum_k A_ik = A_i. Every process makes the same reductions (``sum_across``), in the same order.
    """
    if config.baseline not in DECOMPOSED_BASELINES:
        raise ValueError(f"the advantage splits into item terms for the baselines {DECOMPOSED_BASELINES}, not {config.baseline!r}")
    dtype = torch.promote_types(terms.dtype, torch.float64)
    columns = torch.cat([terms.to(dtype), rewards.to(dtype)[:, None]], dim=1)  # the items, then the reward itself
    columns = torch.where(valid[:, None], columns, 0.0)
    if config.baseline == "none":
        baseline = torch.zeros_like(columns)
    elif config.baseline == "mean":
        baseline = torch.stack([group_statistics(column, groups, valid).mean[groups] for column in columns.T], dim=1)
    elif config.baseline == "leave_one_out":
        baseline = torch.stack([leave_one_out_baseline(column, groups, valid) for column in columns.T], dim=1)
    else:
        totals = sum_across(torch.cat([valid.sum().to(dtype)[None], columns[valid].sum(0)]))
        baseline = (totals[1:] / totals[0].clamp(min=1.0)).expand_as(columns)
    centred = torch.where(valid[:, None], columns - baseline, 0.0)
    if config.scaling == "group":
        centred = centred / (group_statistics(columns[:, -1], groups, valid).std[groups] + config.eps)[:, None]
    elif config.scaling == "batch":
        count, _, m2 = masked_moments(columns[:, -1], valid, sum_across)
        std = (m2 / (count - 1)).sqrt() if count >= 2 else torch.ones_like(m2)
        centred = centred / (std.to(dtype) + config.eps)
    elif config.scaling == "whiten":
        count, _, m2 = masked_moments(centred[:, -1], valid, sum_across)
        std = (m2 / (count - 1)).sqrt() if count > 1 else torch.ones_like(m2)
        totals = sum_across(torch.cat([valid.sum().to(dtype)[None], centred[valid].sum(0)]))
        centred = (centred - totals[1:] / totals[0].clamp(min=1.0)) / (std.to(dtype) + config.eps)
    centred = torch.where(valid[:, None], centred, 0.0)
    return centred[:, :-1], centred[:, -1]


# the columns of the per-item sums that the processes add up
_FAILURES, _APPLICABLE, _SCORED, _SCORE, _CONFIDENCE, _OMEGA, _OMEGA_SETS, _SPREAD, _SPREAD_SETS = range(9)
_CONTRIBUTION, _REWARD, _ADVANTAGE, _ABS_ADVANTAGE, _MEASURED, _AGREEMENT = range(9, 15)
_COLUMNS = 15


@dataclass
class ItemStatistics:
    """One step's statistics: ``per_item[key][name]`` (see the module docstring; a statistic that
    is undefined at this step is absent), ``critic_failures``, and ``agreement`` [K] the step's
    mean agreement per item (NaN where none was measured), which feeds the reliability estimate."""

    per_item: dict[str, dict[str, float]]
    critic_failures: float
    agreement: Tensor

    def metrics(self) -> dict[str, float]:
        """The flat metric names a run logs: ``critic_failures``, ``rubric/<key>/<name>``."""
        flat = {"critic_failures": self.critic_failures}
        for key, values in self.per_item.items():
            flat.update({f"rubric/{key}/{name}": value for name, value in values.items()})
        return flat


def item_statistics(
    keys: list[str],
    scores: Tensor,
    confidences: Tensor,
    weights: Tensor,
    applicable: Tensor,
    failed: Tensor,
    verifiable: Tensor,
    groups: Tensor,
    omega: Tensor,
    advantages: Tensor | None = None,
    advantage_config: AdvantageConfig | None = None,
    sum_across: SumAcross = _this_process,
    bins: int = CALIBRATION_BINS,
) -> ItemStatistics:
    """The step's per-item statistics (module docstring) over every process's responses.

    Args:
        keys: the items, "category/item" (the K columns).
        scores, confidences: [N, K] s_ik, c_ik (c_ik = 0 where (i, k) failed).
        weights: [K] w_k; verifiable: [K] bool, the verifiable items.
        applicable, failed: [N, K] bool.
        groups: [N] sample set of each response; omega: [num_groups, K] the item weights the rewards used.
        advantages: [N] A_i as the update uses them, with ``advantage_config`` the settings that made
            them (None: no ``advantage_share``).
        sum_across: sums a tensor over the processes (every process calls this function alike).
        bins: confidence bins of the calibration error.
    """
    dtype = torch.float64
    device = scores.device
    scores, confidences = scores.to(dtype), torch.where(applicable & ~failed, confidences.to(dtype), 0.0)
    groups = groups.to(device)
    scored = applicable & ~failed
    shares = item_shares(omega.to(dtype), groups, scored)
    terms = shares * torch.where(scored, scores, 0.0)
    valid = shares.sum(-1) > 0
    rewards = terms.sum(-1)
    k = len(keys)
    sums = torch.zeros(k, _COLUMNS, dtype=dtype, device=device)
    sums[:, _FAILURES] = (failed & applicable).sum(0).to(dtype)
    sums[:, _APPLICABLE] = applicable.sum(0).to(dtype)
    sums[:, _SCORED] = scored.sum(0).to(dtype)
    sums[:, _SCORE] = torch.where(scored, scores, 0.0).sum(0)
    sums[:, _CONFIDENCE] = torch.where(applicable, confidences, 0.0).sum(0)
    present = item_present(groups, applicable, failed)
    sums[:, _OMEGA] = torch.where(present, omega.to(dtype), 0.0).sum(0)
    sums[:, _OMEGA_SETS] = present.sum(0).to(dtype)
    for column in range(k):
        spread = group_statistics(torch.where(scored[:, column], scores[:, column], float("nan")), groups, scored[:, column])
        several = spread.count >= 2
        sums[column, _SPREAD] = spread.std[several].sum()
        sums[column, _SPREAD_SETS] = several.sum().to(dtype)
    sums[:, _CONTRIBUTION] = terms[valid].sum(0)
    sums[:, _REWARD] = rewards[valid].sum()
    decomposed = advantages is not None and advantage_config is not None and advantage_config.baseline in DECOMPOSED_BASELINES
    if decomposed:
        per_item, _ = item_advantages(advantage_config, terms, rewards, groups, valid, sum_across)
        sign = torch.sign(advantages.to(device=device, dtype=dtype))
        sums[:, _ADVANTAGE] = (sign[valid, None] * per_item[valid]).sum(0)
        sums[:, _ABS_ADVANTAGE] = advantages.to(device=device, dtype=dtype)[valid].abs().sum()
    agreements, measured = agreement(scores, weights.to(device), scored, verifiable.to(device))
    sums[:, _MEASURED] = measured.sum(0).to(dtype)
    sums[:, _AGREEMENT] = agreements.sum(0)
    calibration = calibration_sums(confidences, agreements, measured, bins)
    totals = sum_across(torch.cat([sums.flatten(), calibration.flatten()]))
    sums = totals[: sums.numel()].reshape(sums.shape).cpu()
    calibration_error = expected_calibration_error(totals[sums.numel():].reshape(calibration.shape)).cpu()

    per_item: dict[str, dict[str, float]] = {}
    step_agreement = torch.full((k,), float("nan"), dtype=dtype)
    for column, key in enumerate(keys):
        row = sums[column].tolist()
        if row[_APPLICABLE] == 0:
            continue
        values = {"failures": row[_FAILURES]}
        if row[_SCORED] > 0:
            values["score"] = row[_SCORE] / row[_SCORED]
            values["confidence"] = row[_CONFIDENCE] / row[_APPLICABLE]
            values["spread"] = row[_SPREAD] / row[_SPREAD_SETS] if row[_SPREAD_SETS] > 0 else 0.0
        if row[_OMEGA_SETS] > 0:
            values["omega"] = row[_OMEGA] / row[_OMEGA_SETS]
        if row[_REWARD] > 0:
            values["reward_share"] = row[_CONTRIBUTION] / row[_REWARD]
        if decomposed and row[_ABS_ADVANTAGE] > 0:
            values["advantage_share"] = row[_ADVANTAGE] / row[_ABS_ADVANTAGE]
        if row[_MEASURED] > 0:
            values["agreement"] = row[_AGREEMENT] / row[_MEASURED]
            values["calibration_error"] = float(calibration_error[column])
            step_agreement[column] = values["agreement"]
        per_item[key] = values
    return ItemStatistics(per_item, float(sums[:, _FAILURES].sum()), step_agreement)
