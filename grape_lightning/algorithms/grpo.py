"""GRPO: group-relative advantages, clipped surrogate, k3 KL to the reference."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from grape_lightning.advantages import RewardScaling, group_relative_advantages, group_statistics
from grape_lightning.algorithms.on_policy import OnPolicyModule, RunningMeans
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.losses.aggregation import Aggregation
from grape_lightning.losses.grpo import grpo_loss
from grape_lightning.losses.kl import KLEstimator
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

    Per rollout batch: ``num_iterations`` passes, each over shuffled mini-batches of
    ``mini_batch_size`` sequences (all at once when None), one optimizer step per mini-batch, so
    ``max_steps`` = rollout batches x num_iterations x mini-batches per pass.

    Groups whose rewards all tie give zero advantages; their share is logged
    (``train/tied_groups``) and ``filter_tied_groups`` drops them from the loss entirely (they
    then add neither KL nor normaliser weight).
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
        return group_relative_advantages(rollout.rewards, rollout.groups, rollout.valid, self.reward_scaling)

    def trained_rows(self, rollout: Rollout, advantages: Tensor, tied_groups: Tensor) -> Tensor:
        """[N] bool: the responses that enter the loss (overridden by GRAPE for off-policy members)."""
        return rollout.valid & ~tied_groups[rollout.groups] if self.filter_tied_groups else rollout.valid

    def update(self, rollout: Rollout) -> None:
        advantages = self.advantages(rollout)
        tied = group_statistics(rollout.rewards, rollout.groups, rollout.valid).tied
        trained = self.trained_rows(rollout, advantages, tied)
        means = RunningMeans()
        for iteration in range(self.num_iterations):
            for index in self.minibatches(trained.nonzero().flatten(), self.mini_batch_size, salt=iteration):
                num_tokens = rollout.response_mask[index].sum()

                def micro_loss(micro: Tensor) -> Tensor:
                    inputs = rollout.model_inputs(micro)
                    token = self.policy_logprobs(
                        inputs, temperature=self.sampling.logprob_temperature,
                        chunk_size=self.logprob_chunk_size, with_entropy=True,
                    )
                    mask = inputs["response_mask"]
                    loss, metrics = grpo_loss(
                        token.logprobs, rollout.take("old_logprobs", micro), advantages[micro], mask,
                        ref_logprobs=rollout.take("ref_logprobs", micro) if rollout.ref_logprobs is not None else None,
                        beta=self.beta, eps_low=self.eps_low, eps_high=self.eps_high, aggregation=self.aggregation,
                        kl_estimator=self.kl_estimator, constant_length=self.sampling.max_new_tokens,
                        num_sequences=len(index), num_tokens=num_tokens,
                    )
                    micro_tokens = float(mask.sum())
                    metrics["entropy"] = (token.entropy.detach() * mask).sum() / max(micro_tokens, 1.0)
                    means.add(metrics, weight=micro_tokens)
                    means.add({"loss": loss.detach()}, weight=1.0)
                    return loss

                self.optimizer_step_over(index, micro_loss)
        self.log_metrics(means.means())
        self.log_metrics({"tied_groups": float(tied.float().mean()), "advantage_abs_mean": float(advantages[rollout.valid].abs().mean()) if rollout.valid.any() else 0.0})
