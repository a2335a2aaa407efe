"""Baselines and advantages: group-relative, leave-one-out, batch mean, whitening; per-token GAE.

Rewards are per sequence ([batch]); ``groups[i]`` is the index of the prompt that response i
answers (responses of one prompt share it). ``valid[i]`` is False for a reward that could not be
computed: such a response takes no part in any statistic and gets advantage 0.

Two standard deviations, on purpose. Group and batch scaling of sequence rewards (GRPO, GRAPE,
TRPO) divide by the unbiased std, sqrt(sum (r - mean)^2 / (n - 1)), as GRPO does (``torch.std``):
its groups are small, where the two differ (sqrt(n / (n - 1)) = 1.155 for n = 4). Whitening of
PPO's per-token advantages and its reward scale use the population std, sqrt(M2 / n), as PPO
implementations do: over the tokens of a batch the two agree to a fraction of a percent, and
whitened values then have mean square exactly 1. Each function names the one it uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RewardScaling = Literal["group", "batch", "none"]


@dataclass
class GroupStatistics:
    mean: Tensor  # [num_groups]
    std: Tensor  # [num_groups], unbiased (n - 1); 0 for groups of fewer than two valid rewards
    count: Tensor  # [num_groups] valid members

    @property
    def tied(self) -> Tensor:
        """Groups whose valid rewards are all equal (no learning signal from a group baseline)."""
        return self.std == 0


def _valid(rewards: Tensor, valid: Tensor | None) -> Tensor:
    return ~torch.isnan(rewards) if valid is None else valid & ~torch.isnan(rewards)


def group_statistics(rewards: Tensor, groups: Tensor, valid: Tensor | None = None) -> GroupStatistics:
    valid = _valid(rewards, valid)
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    count = torch.zeros(num_groups, dtype=rewards.dtype, device=rewards.device).index_add(0, groups, valid.to(rewards.dtype))
    # Shift each group by one of its valid rewards (the largest): a group of equal rewards then has
    # deviations exactly 0, so its mean is exactly that reward and its std exactly 0 (``tied``);
    # summing unshifted rewards would round (3 x 0.1 -> mean 0.10000000000000002, std 1e-17).
    shift = torch.zeros_like(count).scatter_reduce(0, groups[valid], rewards[valid], reduce="amax", include_self=False)
    deviations = torch.where(valid, rewards - shift[groups], 0.0)
    mean_deviation = torch.zeros_like(count).index_add(0, groups, deviations) / count.clamp(min=1)
    mean = shift + mean_deviation
    squared = torch.where(valid, (deviations - mean_deviation[groups]) ** 2, 0.0)
    variance = torch.zeros_like(count).index_add(0, groups, squared) / (count - 1).clamp(min=1)
    std = torch.where(count >= 2, variance.sqrt(), 0.0)
    return GroupStatistics(mean=mean, std=std, count=count)


def group_relative_advantages(
    rewards: Tensor, groups: Tensor, valid: Tensor | None = None, scaling: RewardScaling = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO: A_i = (r_i - mean_{g(i)} r) / (std + eps), std of the group, of the batch, or 1 (none).

    The std is the unbiased one, sqrt(sum (r - mean)^2 / (n - 1)) over the n valid rewards of the
    group (of the batch), 0 for a group of one; not :func:`whiten`'s population std. With
    eps = 0 a group's advantages have unbiased std 1. ``scaling="none"`` is Dr. GRPO's unscaled
    advantage r_i - mean_group r.
    """
    valid = _valid(rewards, valid)
    stats = group_statistics(rewards, groups, valid)
    centred = rewards - stats.mean[groups]
    if scaling == "group":
        centred = centred / (stats.std[groups] + eps)
    elif scaling == "batch":
        centred = centred / (rewards[valid].std() + eps if int(valid.sum()) >= 2 else 1.0 + eps)
    elif scaling != "none":
        raise ValueError(f"scaling must be 'group', 'batch' or 'none', got {scaling!r}")
    return torch.where(valid, centred, 0.0)


def leave_one_out_baseline(rewards: Tensor, groups: Tensor, valid: Tensor | None = None) -> Tensor:
    """b_i = mean of the *other* valid rewards of i's group (RLOO); b_i = r_i when i is alone."""
    valid = _valid(rewards, valid)
    stats = group_statistics(rewards, groups, valid)
    # (sum_g - r_i) / (n - 1) written as mean + (mean - r_i) / (n - 1): exactly r_i in a tied group
    others = (stats.count[groups] - 1).clamp(min=1)
    mean = stats.mean[groups]
    baseline = mean + (mean - torch.where(valid, rewards, 0.0)) / others
    return torch.where(valid & (stats.count[groups] >= 2), baseline, torch.where(valid, rewards, 0.0))


def batch_mean_baseline(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """b = mean of the valid rewards of the batch (same for every response)."""
    valid = _valid(rewards, valid)
    mean = rewards[valid].mean() if valid.any() else rewards.new_zeros(())
    return mean.expand_as(rewards)


SumAcross = Callable[[Tensor], Tensor]


def _this_process(tensor: Tensor) -> Tensor:
    return tensor


def masked_moments(values: Tensor, mask: Tensor, sum_across: SumAcross = _this_process) -> Tensor:
    """(count, mean, M2) in float64 of the entries where ``mask`` is set, over every process.

    ``sum_across`` sums a tensor over processes (under DDP an all-reduce, e.g. Lightning's
    ``trainer.strategy.reduce(x, reduce_op="sum")``; the identity in one process). Two
    reductions, the mean first, so M2 (the sum of squared deviations) has no cancellation error.
    Every process makes the same two calls, whatever its own count.
    """
    selected = values[mask.bool()].double()
    totals = sum_across(torch.stack([selected.new_tensor(float(selected.numel())), selected.sum()]))
    count = totals[0]
    mean = totals[1] / count.clamp(min=1.0)
    return torch.stack([count, mean, sum_across(((selected - mean) ** 2).sum())])


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, sum_across: SumAcross = _this_process) -> Tensor:
    """(v - mean) / (std + eps) over the entries where ``mask`` is set (padding ignored), of every
    process with ``sum_across`` (see :func:`masked_moments`); zeros elsewhere.

    The std is the population one, sqrt(M2 / n) over the n masked entries (1 for n <= 1), so the
    whitened entries have mean 0 and mean square 1; not the unbiased std of
    :func:`group_relative_advantages` (see the module docstring).
    ``shift_mean=False`` only rescales (keeps the sign of every advantage).
    """
    mask = mask.bool()
    count, mean, m2 = masked_moments(values, mask, sum_across)
    std = (m2 / count).sqrt() if count > 1 else torch.ones_like(mean)
    mean, std = mean.to(values.dtype), std.to(values.dtype)
    whitened = (values - mean) / (std + eps)
    if not shift_mean:
        whitened = whitened + mean / (std + eps)
    return torch.where(mask, whitened, 0.0)


# ------------------------------------------------------------------------------------------------
# Per-token advantages of PPO: rewards on tokens, GAE, running reward moments, value diagnostics
# ------------------------------------------------------------------------------------------------


def token_rewards(sequence_rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float | Tensor) -> Tensor:
    """r_t = -beta * kl_t on every token of ``mask``, plus the sequence reward r(x, y) on the last one.

    ``kl`` is the per-token KL estimate ([batch, time], e.g. l_old_t - l_ref_t); ``sequence_rewards``
    is [batch]. Zero outside ``mask``, also where a sequence reward is NaN but its row is masked out.
    """
    mask = mask.bool()
    rewards = torch.where(mask, -kl_coef * kl.to(sequence_rewards.dtype), 0.0)
    last = mask.long().cumsum(-1).argmax(-1)  # the first column where the token count peaks: the last token
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += sequence_rewards
    return torch.where(mask, rewards, 0.0)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the tokens of ``mask`` (Schulman et al., 2016):

        delta_t = r_t + gamma V_{t+1} - V_t          (V after the last token of a row is 0)
        A_t     = delta_t + gamma lambda A_{t+1}
        R_t     = A_t + V_t                          (the value target)

    ``t + 1`` is the next masked token of the same row (masked-out columns are skipped), so rows
    of any length and offset share one [batch, time] layout. Returns (A, R), zero outside ``mask``.
    """
    mask = mask.bool()
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        on = mask[:, t]
        advantages[:, t] = torch.where(on, advantage, 0.0)
        next_value = torch.where(on, values[:, t], next_value)
        next_advantage = torch.where(on, advantage, next_advantage)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def merge_moments(a: Tensor, b: Tensor) -> Tensor:
    """(count, mean, M2) of two streams together (the parallel merge of Chan et al., 1979):

        n = n_a + n_b,  mean = mean_a + (mean_b - mean_a) n_b / n,
        M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n
    """
    count = a[0] + b[0]
    if float(count) == 0:
        return a.clone()
    delta = b[1] - a[1]
    return torch.stack([count, a[1] + delta * b[0] / count, a[2] + b[2] + delta**2 * a[0] * b[0] / count])


def moments_std(moments: Tensor) -> float:
    """The population standard deviation of a (count, mean, M2) stream; 1 while it is undefined or 0."""
    count, m2 = float(moments[0]), float(moments[2])
    std = (m2 / count) ** 0.5 if count > 1 else 0.0
    return std if std > 0 else 1.0


def masked_mean_std(values: Tensor, mask: Tensor, sum_across: SumAcross = _this_process) -> tuple[float, float]:
    """Mean and (population) standard deviation of the masked entries of every process; (0, 0) for none."""
    count, mean, m2 = masked_moments(values, mask, sum_across).tolist()
    return (mean, (m2 / count) ** 0.5) if count > 0 else (0.0, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, sum_across: SumAcross = _this_process) -> float:
    """1 - Var[R - V] / Var[R] over the masked entries of every process: 1 for a perfect value
    model, 0 for one that predicts the mean, negative for a worse one (0 when the returns do not vary)."""
    _, target_std = masked_mean_std(returns, mask, sum_across)
    _, residual_std = masked_mean_std(returns.double() - values.double(), mask, sum_across)
    if target_std == 0.0:
        return 0.0
    return 1.0 - residual_std**2 / target_std**2
