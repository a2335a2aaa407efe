"""Baselines and advantages: group-relative, leave-one-out, batch mean, whitening.

Rewards are per sequence ([batch]); ``groups[i]`` is the index of the prompt that response i
answers (responses of one prompt share it). ``valid[i]`` is False for a reward that could not be
computed: such a response takes no part in any statistic and gets advantage 0.
"""

from __future__ import annotations

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

    ``scaling="none"`` is Dr. GRPO's unscaled advantage r_i - mean_group r.
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


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(v - mean) / std over the entries where ``mask`` is set (padding ignored); zeros elsewhere.

    ``shift_mean=False`` only rescales (keeps the sign of every advantage).
    """
    mask = mask.bool()
    selected = values[mask]
    mean = selected.mean()
    std = selected.std(unbiased=False) if selected.numel() > 1 else values.new_ones(())
    whitened = (values - mean) / (std + eps)
    if not shift_mean:
        whitened = whitened + mean / (std + eps)
    return torch.where(mask, whitened, 0.0)
