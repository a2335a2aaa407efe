"""Advantages: one entry point, :func:`compute_advantages`, with one vocabulary.

    A = scale(r - b)

- baseline b: ``none`` (0), ``mean`` (of the response's group: the other samples of its prompt
  and itself), ``batch_mean`` (of every valid reward of the batch, every process's),
  ``leave_one_out`` (of the *other* members of its group, RLOO), ``moving_average`` (an
  exponential moving average of past batch means) or ``value`` (a value model: per-token GAE);
- scaling: ``none``, ``group`` (divide by the std of the group's rewards), ``batch`` (by the std
  of the batch's rewards, every process's) or ``whiten`` (subtract the batch mean of r - b and
  divide by its std, every process's).

Rewards are per sequence ([batch]); ``groups[i]`` is the index of the prompt that response i
answers (responses of one prompt share it, and never straddle processes). ``valid[i]`` is False
for a reward that could not be computed: such a response takes no part in any statistic and gets
advantage 0. Batch statistics are sums over every process (``sum_across``), so several processes
compute the advantages of their global batch.

One standard deviation everywhere: the unbiased one, sqrt(sum (x - mean)^2 / (n - 1)) over the n
valid entries (``torch.std``'s), 0 for a group of one (and 1 in place of an undefined batch std).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

Baseline = Literal["none", "mean", "batch_mean", "leave_one_out", "moving_average", "value"]
Scaling = Literal["none", "group", "batch", "whiten"]


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


def leave_one_out_baseline(rewards: Tensor, groups: Tensor, valid: Tensor | None = None) -> Tensor:
    """b_i = mean of the *other* valid rewards of i's group (RLOO); b_i = r_i when i is alone."""
    valid = _valid(rewards, valid)
    stats = group_statistics(rewards, groups, valid)
    # (sum_g - r_i) / (n - 1) written as mean + (mean - r_i) / (n - 1): exactly r_i in a tied group
    others = (stats.count[groups] - 1).clamp(min=1)
    mean = stats.mean[groups]
    baseline = mean + (mean - torch.where(valid, rewards, 0.0)) / others
    return torch.where(valid & (stats.count[groups] >= 2), baseline, torch.where(valid, rewards, 0.0))


SumAcross = Callable[[Tensor], Tensor]


def _this_process(tensor: Tensor) -> Tensor:
    return tensor


def batch_mean_baseline(rewards: Tensor, valid: Tensor | None = None, sum_across: SumAcross = _this_process) -> Tensor:
    """b = mean of the valid rewards of the batch, every process's (the same for every response; 0 for none)."""
    count, mean, _ = masked_moments(rewards, _valid(rewards, valid), sum_across)
    return mean.to(rewards.dtype).expand_as(rewards)


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

    The std is the unbiased one, sqrt(M2 / (n - 1)) over the n masked entries (1 for n <= 1), so
    the whitened entries have mean 0 and unbiased std 1.
    ``shift_mean=False`` only rescales (keeps the sign of every advantage).
    """
    mask = mask.bool()
    count, mean, m2 = masked_moments(values, mask, sum_across)
    std = (m2 / (count - 1)).sqrt() if count > 1 else torch.ones_like(mean)
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


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the tokens of ``mask`` of each row (s runs over
    the masked tokens from t on), zero outside ``mask``: :func:`gae` with V = 0 and lambda = 1."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


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
    """The (unbiased) standard deviation of a (count, mean, M2) stream; 1 while it is undefined or 0."""
    count, m2 = float(moments[0]), float(moments[2])
    std = (m2 / (count - 1)) ** 0.5 if count > 1 else 0.0
    return std if std > 0 else 1.0


def masked_mean_std(values: Tensor, mask: Tensor, sum_across: SumAcross = _this_process) -> tuple[float, float]:
    """Mean and (unbiased) standard deviation of the masked entries of every process; (0, 0) for
    none, std 0 for one."""
    count, mean, m2 = masked_moments(values, mask, sum_across).tolist()
    return (mean, (m2 / (count - 1)) ** 0.5 if count > 1 else 0.0) if count > 0 else (0.0, 0.0)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, sum_across: SumAcross = _this_process) -> float:
    """1 - Var[R - V] / Var[R] over the masked entries of every process: 1 for a perfect value
    model, 0 for one that predicts the mean, negative for a worse one (0 when the returns do not vary)."""
    _, target_std = masked_mean_std(returns, mask, sum_across)
    _, residual_std = masked_mean_std(returns.double() - values.double(), mask, sum_across)
    if target_std == 0.0:
        return 0.0
    return 1.0 - residual_std**2 / target_std**2


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------


@dataclass
class AdvantageConfig:
    """A = scale(r - b) (see the module docstring for the vocabulary).

    Args:
        baseline: ``none``, ``mean`` (of the group), ``batch_mean``, ``leave_one_out``,
            ``moving_average`` or ``value`` (a value model, per-token GAE: PPO).
        scaling: ``none``, ``group`` (std of the group's rewards), ``batch`` (std of the batch's
            rewards) or ``whiten`` (batch mean and std of r - b).
        eps: added to the std it divides by.
        momentum: of the ``moving_average`` baseline, b <- momentum b + (1 - momentum) batch mean.
        gamma: discount factor of the ``value`` baseline's GAE.
        lam: lambda of the ``value`` baseline's GAE.
    """

    baseline: Baseline = "mean"
    scaling: Scaling = "group"
    eps: float = 1e-4
    momentum: float = 0.9
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        if self.baseline not in Baseline.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"advantage.baseline must be one of {Baseline.__args__}, got {self.baseline!r}")  # type: ignore[attr-defined]
        if self.scaling not in Scaling.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"advantage.scaling must be one of {Scaling.__args__}, got {self.scaling!r}")  # type: ignore[attr-defined]
        if self.baseline == "value" and self.scaling not in ("none", "whiten"):
            raise ValueError(f"advantage.scaling {self.scaling!r} scales sequence rewards; with baseline 'value' use 'none' or 'whiten'")

    @property
    def per_group(self) -> bool:
        """Whether the advantages compare the members of a group (they need ``group_size`` >= 2)."""
        return self.baseline in ("mean", "leave_one_out") or self.scaling == "group"


class MovingAverageBaseline(nn.Module):
    """b_k = momentum b_{k-1} + (1 - momentum) mean_k, over the batch means of the run's rollouts;
    the first batch uses its own mean. Buffers, so checkpoints carry it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros((), dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def __call__(self, batch_mean: Tensor, momentum: float) -> Tensor:
        """The baseline of this batch (the average *before* this batch; its own mean the first time)."""
        baseline = torch.where(self.started, self.value, batch_mean.to(self.value.dtype))
        self.value.copy_(momentum * baseline + (1 - momentum) * batch_mean)
        self.started.fill_(True)
        return baseline


@dataclass
class Advantages:
    advantages: Tensor  # [N] per sequence, or [N, T] per token (baseline "value")
    returns: Tensor | None = None  # [N, T] value targets R_t = A_t + V_t (baseline "value"), before scaling


def compute_advantages(
    config: AdvantageConfig,
    rewards: Tensor,
    groups: Tensor,
    valid: Tensor,
    *,
    sum_across: SumAcross = _this_process,
    moving_average: MovingAverageBaseline | None = None,
    values: Tensor | None = None,
    token_mask: Tensor | None = None,
) -> Advantages:
    """A = scale(r - b) for the responses of one rollout (every process calls it, in the same order).

    ``rewards`` [N] per sequence; for baseline ``value``, per token [N, T] (see :func:`token_rewards`)
    with ``values`` V_old [N, T] and ``token_mask`` the tokens that count: then A, R = GAE(r, V)
    (:func:`gae`). ``moving_average`` holds the state of baseline ``moving_average``.
    """
    valid = _valid(rewards, valid) if rewards.dim() == 1 else valid
    if config.baseline == "value":
        if values is None or token_mask is None:
            raise ValueError("baseline 'value' needs the value model's values and the token mask")
        advantages, returns = gae(rewards, values, token_mask, config.gamma, config.lam)
        if config.scaling == "whiten":
            advantages = whiten(advantages, token_mask, eps=config.eps, sum_across=sum_across)
        return Advantages(advantages, returns)

    baseline = _baseline(config, rewards, groups, valid, sum_across, moving_average)
    centred = torch.where(valid, rewards - baseline, 0.0)
    if config.scaling == "group":
        centred = centred / (group_statistics(rewards, groups, valid).std[groups] + config.eps)
    elif config.scaling == "batch":
        count, _, m2 = masked_moments(rewards, valid, sum_across)
        std = (m2 / (count - 1)).sqrt() if count >= 2 else torch.ones_like(m2)
        centred = centred / (std.to(rewards.dtype) + config.eps)
    elif config.scaling == "whiten":
        centred = whiten(centred, valid, eps=config.eps, sum_across=sum_across)
    return Advantages(torch.where(valid, centred, 0.0))


def _baseline(
    config: AdvantageConfig, rewards: Tensor, groups: Tensor, valid: Tensor, sum_across: SumAcross,
    moving_average: MovingAverageBaseline | None,
) -> Tensor:
    if config.baseline == "none":
        return torch.zeros_like(rewards)
    if config.baseline == "mean":
        return group_statistics(rewards, groups, valid).mean[groups]
    if config.baseline == "leave_one_out":
        return leave_one_out_baseline(rewards, groups, valid)
    batch_mean = batch_mean_baseline(rewards, valid, sum_across)
    if config.baseline == "batch_mean":
        return batch_mean
    if moving_average is None:
        raise ValueError("baseline 'moving_average' needs its state (a MovingAverageBaseline)")
    count = masked_moments(rewards, valid, sum_across)[0]
    if count == 0:  # no reward this batch: the average stays, and so does the baseline
        return torch.where(moving_average.started, moving_average.value, 0.0).to(rewards.dtype).expand_as(rewards)
    return moving_average(batch_mean[0], config.momentum).to(rewards.dtype).expand_as(rewards)
