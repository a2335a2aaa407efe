"""GRPO: group-relative advantages, clipped surrogate, k3 KL to the reference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.advantages import RewardScaling, group_relative_advantages, group_statistics
from grape_lightning.algorithms.on_policy import OnPolicyModule, RunningMeans
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.losses.aggregation import Aggregation, aggregate
from grape_lightning.losses.grpo import grpo_loss
from grape_lightning.losses.kl import KLEstimator, check_loss_estimator, kl_penalty
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams


class GRPOModule(OnPolicyModule):
    """Group Relative Policy Optimization.

    For each prompt the DataModule supplies G copies (``group_size``); with r_i the rewards of
    a group,

        A_i = (r_i - mean_group r) / (std + eps)        (std of the group, of the batch, or 1)
        L   = agg_{i,t} [ -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_k3 ]

    with ``group`` scaling by the unbiased (n - 1) std of the group's valid rewards (``batch``: of
    every valid reward of the batch). ``kl_estimator`` is k3 (gradient of KL(ref || pi)) or k2
    (gradient of KL(pi || ref)); k1 is refused, since in a loss its expected gradient is 0.

    Per rollout batch: ``num_iterations`` passes, each over shuffled mini-batches of
    ``mini_batch_size`` sequences (all at once when None), one optimizer step per mini-batch, so
    ``max_steps`` = rollout batches x num_iterations x mini-batches per pass.

    Groups whose rewards all tie give zero advantages; their share is logged
    (``train/tied_groups``) and ``filter_tied_groups`` drops them from the loss entirely (they
    then add neither KL nor normaliser weight).

    Several processes (DDP, FSDP, DeepSpeed) optimise the loss of the global batch: each rank's
    groups are whole (a prompt's samples never straddle ranks), ``reward_scaling="batch"`` divides
    by the std of every rank's rewards, and the aggregation's normaliser (sequences, tokens) is
    counted over all ranks. Mini-batches are drawn from all rows of a rollout and rows out of the
    loss are masked, so every rank takes the same forward and backward passes and steps.

    Args:
        beta: weight of the KL penalty to the reference (0: no reference model).
        eps_low: lower clip range: ratios below 1 - eps_low are clipped.
        eps_high: upper clip range: ratios above 1 + eps_high are clipped (clip-higher when > eps_low).
        reward_scaling: divide advantages by the std of the group (``group``), of the batch (``batch``),
            or not (``none``).
        aggregation: loss over tokens: ``sequence`` (mean per sequence, then over sequences), ``token``
            or ``constant``.
        kl_estimator: KL term of the loss: ``k3`` (its gradient is that of KL(ref || pi)) or ``k2``
            (that of KL(pi || ref)); ``k1`` is refused, its expected gradient being 0.
        num_iterations: passes over each rollout batch.
        mini_batch_size: sequences per optimizer step (None: the whole rollout batch).
        filter_tied_groups: drop groups whose rewards all tie from the loss.
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.04,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        reward_scaling: RewardScaling = "group",
        aggregation: Aggregation = "sequence",
        kl_estimator: KLEstimator = "k3",
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        filter_tied_groups: bool = False,
        micro_batch_size: int = 64,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        if beta != 0:
            check_loss_estimator(kl_estimator)  # before building any model
        super().__init__(
            policy, rewards, sampling, optimizer, reference=beta > 0, micro_batch_size=micro_batch_size,
            max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
            logprob_chunk_size=logprob_chunk_size, seed=seed,
        )
        self.beta = beta
        self.eps_low = eps_low
        self.eps_high = eps_high
        self.reward_scaling = reward_scaling
        self.aggregation = aggregation
        self.kl_estimator = kl_estimator
        self.num_iterations = num_iterations
        self.mini_batch_size = mini_batch_size
        self.filter_tied_groups = filter_tied_groups

    def advantages(self, rollout: Rollout) -> Tensor:
        """Per-sequence advantages (overridden by GRAPE)."""
        if self.reward_scaling == "batch":
            centred = group_relative_advantages(rollout.rewards, rollout.groups, rollout.valid, "none")
            return centred / (self.batch_reward_std(rollout) + 1e-4)
        return group_relative_advantages(rollout.rewards, rollout.groups, rollout.valid, self.reward_scaling)

    def batch_reward_std(self, rollout: Rollout) -> Tensor:
        """Unbiased std of the valid rewards of the global batch (every process's), two passes
        (mean, then squared deviations); 1 with fewer than two valid rewards."""
        valid = rollout.valid & ~torch.isnan(rollout.rewards)
        rewards = rollout.rewards[valid].double()
        count, total = self.sum_across_processes(torch.stack([rewards.new_tensor(float(rewards.numel())), rewards.sum()])).tolist()
        squares = self.sum_across_processes(((rewards - total / max(count, 1.0)) ** 2).sum())
        std = (squares / (count - 1)).sqrt() if count >= 2 else torch.ones((), dtype=torch.float64, device=rewards.device)
        return std.to(rollout.rewards.dtype)

    @property
    def needs_old_logprobs(self) -> bool:
        # One pass, one mini-batch: the update's weights are the sampling weights, so pi_old is the
        # detached log-prob of the update's own forward pass (the ratio is exactly 1).
        return self.num_iterations > 1 or self.mini_batch_size is not None

    def trained_rows(self, rollout: Rollout, advantages: Tensor, tied_groups: Tensor) -> Tensor:
        """[N] bool: the responses that enter the loss (overridden by GRAPE for off-policy members)."""
        return rollout.valid & ~tied_groups[rollout.groups] if self.filter_tied_groups else rollout.valid

    def update(self, rollout: Rollout) -> None:
        advantages = self.advantages(rollout)
        tied = group_statistics(rollout.rewards, rollout.groups, rollout.valid).tied
        trained = self.trained_rows(rollout, advantages, tied)
        trained_tokens = rollout.response_mask & trained[:, None]
        # train/kl averages the trained rows pi_old sampled: at tokens it did not sample (GRAPE's
        # off-policy members) the KL term is in the loss but is no estimate of KL(pi || ref)
        sampled = trained & ~rollout.off_policy if rollout.off_policy is not None else trained
        sampled_tokens = rollout.response_mask & sampled[:, None]
        rows = torch.arange(len(rollout), device=self.device)
        scale = self.data_parallel_size  # the strategy averages gradients over the ranks
        means = RunningMeans()
        terms = RunningMeans()  # additive pieces of the global loss: summed over micro-batches and ranks
        for iteration in range(self.num_iterations):
            for index in self.minibatches(rows, self.mini_batch_size, salt=iteration):
                counts = torch.stack([
                    trained[index].sum(), trained_tokens[index].sum(), sampled[index].sum(), sampled_tokens[index].sum(),
                ]).double()
                num_sequences, num_tokens, kl_sequences, kl_tokens = self.sum_across_processes(counts).tolist()
                if num_sequences == 0:
                    continue  # no trained row on any rank: no step (Adam would still move the weights)
                step = {"loss": 0.0, "policy_loss": 0.0, "kl": 0.0}

                def micro_loss(micro: Tensor) -> Tensor:
                    inputs = rollout.model_inputs(micro)
                    token = self.policy_logprobs(
                        inputs, temperature=self.sampling.logprob_temperature,
                        chunk_size=self.logprob_chunk_size, with_entropy=True,
                    )
                    mask = inputs["response_mask"] & trained[micro, None]
                    old_logprobs = rollout.take("old_logprobs", micro) if self.needs_old_logprobs else token.logprobs.detach()
                    ref_logprobs = rollout.take("ref_logprobs", micro) if rollout.ref_logprobs is not None else None
                    loss, metrics = grpo_loss(
                        token.logprobs, old_logprobs, advantages[micro], mask, ref_logprobs=ref_logprobs,
                        beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high, aggregation=self.aggregation,
                        kl_estimator=self.kl_estimator, constant_length=self.sampling.max_new_tokens,
                        num_sequences=num_sequences, num_tokens=num_tokens,
                    )
                    step["loss"] += float(loss.detach())
                    step["policy_loss"] += float(metrics.pop("policy_loss"))
                    metrics.pop("kl", None)  # over every trained row; the logged KL is over the sampled ones
                    if ref_logprobs is not None:
                        step["kl"] += float(aggregate(
                            kl_penalty(token.logprobs.detach(), ref_logprobs, self.kl_estimator),
                            inputs["response_mask"] & sampled[micro, None], self.aggregation,
                            constant_length=self.sampling.max_new_tokens, num_sequences=kl_sequences, num_tokens=kl_tokens,
                        ))
                    micro_tokens = float(mask.sum())
                    metrics["entropy"] = (token.entropy.detach() * mask).sum() / max(micro_tokens, 1.0)
                    means.add(metrics, weight=micro_tokens)
                    return loss * scale

                self.optimizer_step_over(index, micro_loss)
                if rollout.ref_logprobs is None or kl_sequences == 0:
                    step.pop("kl")
                terms.add(step)
        self.log_metrics({**self.mean_across_processes(means), **self.mean_across_processes(terms, summed=True)})
        # over every rank's groups and responses
        totals = torch.stack([
            tied.sum(), torch.tensor(tied.numel(), device=tied.device), advantages[rollout.valid].abs().sum(), rollout.valid.sum(),
        ]).double()
        tied_count, group_count, advantage_abs, valid_count = self.sum_across_processes(totals).tolist()
        self.log_metrics({"tied_groups": tied_count / max(group_count, 1.0), "advantage_abs_mean": advantage_abs / max(valid_count, 1.0)})

    def mean_across_processes(self, means: RunningMeans, summed: bool = False) -> dict[str, float]:
        """The weighted means of ``means`` over every rank's values; ``summed``: values that are
        each rank's share of a global quantity (normalised by global counts) add up over ranks."""
        names = sorted(means.totals)
        if not names:
            return {}
        packed = torch.tensor([[means.totals[n], means.weights[n]] for n in names], dtype=torch.float64, device=self.device)
        packed = self.sum_across_processes(packed)
        world = self.data_parallel_size if summed else 1
        return {name: float(total) * world / max(float(weight), 1e-12) for name, (total, weight) in zip(names, packed.tolist())}
