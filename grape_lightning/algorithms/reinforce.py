"""REINFORCE with a baseline and an optional KL-to-reference penalty folded into the reward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from grape_lightning.advantages import batch_mean_baseline, leave_one_out_baseline
from grape_lightning.algorithms.on_policy import OnPolicyModule, RunningMeans
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.losses.reinforce import reinforce_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams

Baseline = Literal["none", "moving_average", "batch_mean", "leave_one_out"]


class REINFORCEModule(OnPolicyModule):
    """L = -(1/B) sum_i (r_i - b_i) l(y_i), one optimizer step per rollout batch.

    With ``kl_coef`` = beta > 0 the reward is r_i - beta * sum_t (l_old_t - l_ref_t) (the k1 KL of
    the sampled response to the reference). Baselines:

    - ``none``: b = 0;
    - ``moving_average``: b = exponential moving average (``baseline_momentum``) of past batch
      mean rewards (saved in checkpoints); the first batch uses its own mean;
    - ``batch_mean``: b = mean reward of this batch;
    - ``leave_one_out``: b_i = mean reward of the other samples of i's prompt (RLOO; needs
      ``group_size`` >= 2 in the DataModule).

    Args:
        baseline: ``none``, ``moving_average``, ``batch_mean`` or ``leave_one_out`` (RLOO).
        baseline_momentum: momentum of the ``moving_average`` baseline.
        kl_coef: beta of the k1 KL penalty to the reference subtracted from the reward (0: no
            reference).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        baseline: Baseline = "leave_one_out",
        baseline_momentum: float = 0.9,
        kl_coef: float = 0.0,
        micro_batch_size: int = 64,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(
            policy, rewards, sampling, optimizer, reference=kl_coef > 0, micro_batch_size=micro_batch_size,
            max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
            logprob_chunk_size=logprob_chunk_size, seed=seed,
        )
        if baseline not in ("none", "moving_average", "batch_mean", "leave_one_out"):
            raise ValueError(f"unknown baseline {baseline!r}")
        self.baseline = baseline
        self.baseline_momentum = baseline_momentum
        self.kl_coef = kl_coef
        self.register_buffer("moving_baseline", torch.zeros((), dtype=torch.float64))
        self.register_buffer("moving_baseline_started", torch.zeros((), dtype=torch.bool))

    def shaped_rewards(self, rollout: Rollout) -> Tensor:
        if self.kl_coef == 0:
            return rollout.rewards
        sequence_kl = ((rollout.old_logprobs - rollout.ref_logprobs) * rollout.response_mask).sum(-1)
        self.log_metrics({"kl": float(sequence_kl[rollout.valid].mean()) if rollout.valid.any() else 0.0})
        return rollout.rewards - self.kl_coef * sequence_kl.to(rollout.rewards.dtype)

    def baselines(self, rewards: Tensor, rollout: Rollout) -> Tensor:
        if self.baseline == "none":
            return torch.zeros_like(rewards)
        if self.baseline == "batch_mean":
            return batch_mean_baseline(rewards, rollout.valid)
        if self.baseline == "leave_one_out":
            return leave_one_out_baseline(rewards, rollout.groups, rollout.valid)
        batch_mean = batch_mean_baseline(rewards, rollout.valid)[0] if rollout.valid.any() else self.moving_baseline
        baseline = torch.where(self.moving_baseline_started, self.moving_baseline, batch_mean)
        self.moving_baseline.copy_(self.baseline_momentum * baseline + (1 - self.baseline_momentum) * batch_mean)
        self.moving_baseline_started.fill_(True)
        return baseline.expand_as(rewards)

    def update(self, rollout: Rollout) -> None:
        rewards = self.shaped_rewards(rollout)
        advantages = torch.where(rollout.valid, rewards - self.baselines(rewards, rollout), 0.0)
        index = rollout.valid.nonzero().flatten()
        if index.numel() == 0:
            return
        means = RunningMeans()

        def micro_loss(micro: Tensor) -> Tensor:
            inputs = rollout.model_inputs(micro)
            token = self.policy_logprobs(inputs, temperature=self.sampling.logprob_temperature, chunk_size=self.logprob_chunk_size, with_entropy=True)
            mask = inputs["response_mask"]
            loss, metrics = reinforce_loss(token.logprobs, advantages[micro], mask, num_sequences=len(index))
            metrics["entropy"] = (token.entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
            means.add(metrics, weight=float(mask.sum()))
            return loss

        self.optimizer_step_over(index, micro_loss)
        self.log_metrics({**means.means(), "advantage_abs_mean": float(advantages[index].abs().mean())})
