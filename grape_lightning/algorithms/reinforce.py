"""REINFORCE with a baseline and an optional KL-to-reference penalty folded into the reward (per
sequence, or per token with a reward-to-go: REINFORCE++)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch
from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, MovingAverageBaseline, compute_advantages, reward_to_go, whiten
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.policy_update import linear_loss_pass
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.losses.kl import kl_penalty
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.losses.reinforce import reinforce_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.sampling import SamplingParams

KLReward = Literal["sequence", "token"]


class REINFORCEModule(OnPolicyModule):
    """L = -(1/B) sum_i A_i l(y_i),  l(y_i) = sum_t log pi(y_it | .),  over the B valid responses of
    the global batch, one optimizer step per rollout batch (per mini-batch with
    ``update.mini_batch_size``).

    A_i = scale(r'_i - b_i) (``advantage``: by default the leave-one-out baseline, RLOO, unscaled;
    ``moving_average`` keeps its average in checkpoints). With ``kl_coef`` = beta > 0 and
    ``kl_reward: sequence`` the reward is r'_i = r_i - beta sum_t k1_t, k1_t = l_old_t - l_ref_t,
    the k1 KL of the sampled response to the reference.

    ``kl_reward: token`` (REINFORCE++, Hu 2025) puts -beta k1_t on every token and r_i on the last,
    so each token's advantage is its reward-to-go, scaled over the tokens of the global batch:

        A_it = scale_tokens( r_i - b_i - beta sum_{s >= t} k1_is ),     L = -(1/B) sum_{i,t} A_it l_it

    with b the sequence baseline of ``advantage.baseline`` and ``advantage.scaling`` ``none`` or
    ``whiten`` (mean and std over every valid response token of every process). A token is then
    credited only with the KL of what follows it, not of what came before.

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline and scaling (default: leave-one-out, unscaled).
        kl_coef: beta of the k1 KL penalty to the reference subtracted from the reward (0: no reference).
        kl_reward: where the KL penalty enters the reward: ``sequence`` (summed, on the sequence
            reward) or ``token`` (per token, a reward-to-go: REINFORCE++).
        update: mini- and micro-batches, clipping (one epoch: REINFORCE has no ratio to correct a second).
        mismatch: correction of the sampler/trainer mismatch (``tis``, ``token_mask``,
            ``sequence_mask``; default none), a stop-gradient weight on each token's policy term
            (:mod:`grape_lightning.losses.mismatch`).
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards all tie are replaced by
            fresh ones (``{max_rounds: 3}``; None: off; :mod:`grape_lightning.rollout.dynamic_sampling`).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        advantage: AdvantageConfig | None = None,
        kl_coef: float = 0.0,
        kl_reward: KLReward = "sequence",
        update: UpdateConfig | None = None,
        mismatch: MismatchCorrection | None = None,
        seed: int = 0,
        dynamic_sampling: DynamicSamplingConfig | None = None,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(
            policy, scorer, sampling, optimizer, update, reference=kl_coef > 0, seed=seed, mismatch=mismatch,
            dynamic_sampling=dynamic_sampling,
        )
        if self.update_config.epochs != 1:
            raise ValueError("REINFORCE takes one pass over each rollout (update.epochs: 1): its loss has no ratio for a second")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="leave_one_out", scaling="none")
        self.check_dynamic_sampling(self.advantage.baseline)
        if kl_reward not in KLReward.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"REINFORCE: kl_reward must be one of {KLReward.__args__}, got {kl_reward!r}")  # type: ignore[attr-defined]
        if self.advantage.baseline == "value":
            raise ValueError("REINFORCE has no value model: advantage.baseline 'value' is PPO's")
        if kl_reward == "token" and self.advantage.scaling not in ("none", "whiten"):
            raise ValueError(
                f"REINFORCE with kl_reward 'token' scales per-token advantages: advantage.scaling must be 'none' or "
                f"'whiten', got {self.advantage.scaling!r}"
            )
        self.kl_coef = kl_coef
        self.kl_reward = kl_reward
        self.moving_average = MovingAverageBaseline()

    @property
    def needs_old_logprobs(self) -> bool:
        # l_old of the KL penalty, and of the mismatch correction's ratio; the loss itself has no ratio
        return self.kl_coef > 0 or self.mismatch.enabled

    def token_kl(self, rollout: Rollout) -> Tensor:
        """k1_t = l_old_t - l_ref_t on the response tokens of the valid rows (0 elsewhere); logs
        the mean sequence KL sum_t k1_t over every process's valid rows."""
        kl = torch.where(rollout.trained_mask, kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, "k1"), 0.0)
        totals = torch.stack([kl.sum(), rollout.valid.sum()]).double()
        kl_sum, count = self.sum_across_processes(totals).tolist()
        self.log_metrics({"kl": kl_sum / max(count, 1.0)})
        return kl

    def shaped_rewards(self, rollout: Rollout) -> Tensor:
        """r - beta sum_t k1_t (``kl_reward: sequence``)."""
        if self.kl_coef == 0:
            return rollout.rewards
        return rollout.rewards - self.kl_coef * self.token_kl(rollout).sum(-1).to(rollout.rewards.dtype)

    def advantages(self, rollout: Rollout) -> Tensor:
        """A [N] per sequence, or [N, T] per token for ``kl_reward: token`` (see the class docstring)."""
        per_token = self.kl_reward == "token" and self.kl_coef > 0
        if not per_token:
            return compute_advantages(
                self.advantage, self.shaped_rewards(rollout), rollout.groups, rollout.valid,
                sum_across=self.sum_across_processes, moving_average=self.moving_average,
            ).advantages
        centred = compute_advantages(  # r_i - b_i, scaled after the KL is in
            replace(self.advantage, scaling="none"), rollout.rewards, rollout.groups, rollout.valid,
            sum_across=self.sum_across_processes, moving_average=self.moving_average,
        ).advantages
        mask = rollout.trained_mask
        returns = torch.where(mask, centred[:, None] + reward_to_go(-self.kl_coef * self.token_kl(rollout), mask), 0.0)
        if self.advantage.scaling == "whiten":
            returns = whiten(returns, mask, eps=self.advantage.eps, sum_across=self.sum_across_processes)
        return returns

    def update(self, rollout: Rollout) -> None:
        advantages = self.advantages(rollout)
        valid = rollout.valid

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            inputs = rollout.model_inputs(micro)
            mask = inputs["response_mask"] & valid[micro, None]
            width = mask.shape[1]
            micro_advantages = advantages[micro] if advantages.dim() == 1 else advantages[micro, :width]
            weights = self.mismatch_weights(rollout, micro)
            token, loss, metrics = linear_loss_pass(
                self, inputs,
                lambda logprobs: reinforce_loss(logprobs, micro_advantages, mask, num_sequences=float(totals[0]), token_weights=weights),
            )
            tokens = float(mask.sum())
            entropy = (token.entropy.detach() * mask).sum() / max(tokens, 1.0)
            return LossOutput(loss, terms={"policy_loss": metrics["policy_loss"]}, means={"entropy": entropy}, weight=tokens)

        metrics = run_update(self, valid.nonzero().flatten(), self.update_config, lambda index: valid[index].sum()[None], micro_loss)
        # |A| over the valid rows, or over their response tokens for per-token advantages
        counted = valid if advantages.dim() == 1 else rollout.trained_mask
        advantage_abs, count = self.sum_across_processes(torch.stack([advantages[counted].abs().sum(), counted.sum()]).double()).tolist()
        self.log_metrics({**metrics, "advantage_abs_mean": advantage_abs / max(count, 1.0)})
