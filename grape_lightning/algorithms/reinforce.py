"""REINFORCE with a baseline and an optional KL-to-reference penalty folded into the reward."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, MovingAverageBaseline, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.policy_update import linear_loss_pass
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.losses.reinforce import reinforce_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.sampling import SamplingParams


class REINFORCEModule(OnPolicyModule):
    """L = -(1/B) sum_i A_i l(y_i),  l(y_i) = sum_t log pi(y_it | .),  over the B valid responses of
    the global batch, one optimizer step per rollout batch (per mini-batch with
    ``update.mini_batch_size``).

    A_i = scale(r'_i - b_i) (``advantage``: by default the leave-one-out baseline, RLOO, unscaled;
    ``moving_average`` keeps its average in checkpoints). With ``kl_coef`` = beta > 0 the reward is
    r'_i = r_i - beta sum_t (l_old_t - l_ref_t), the k1 KL of the sampled response to the reference.

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline and scaling (default: leave-one-out, unscaled).
        kl_coef: beta of the k1 KL penalty to the reference subtracted from the reward (0: no reference).
        update: mini- and micro-batches, clipping (one epoch: REINFORCE has no ratio to correct a second).
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
        update: UpdateConfig | None = None,
        seed: int = 0,
        dynamic_sampling: DynamicSamplingConfig | None = None,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, optimizer, update, reference=kl_coef > 0, seed=seed, dynamic_sampling=dynamic_sampling)
        if self.update_config.epochs != 1:
            raise ValueError("REINFORCE takes one pass over each rollout (update.epochs: 1): its loss has no ratio for a second")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="leave_one_out", scaling="none")
        self.check_dynamic_sampling(self.advantage.baseline)
        self.kl_coef = kl_coef
        self.moving_average = MovingAverageBaseline()

    @property
    def needs_old_logprobs(self) -> bool:
        return self.kl_coef > 0  # l_old of the KL penalty; the loss itself has no ratio

    def shaped_rewards(self, rollout: Rollout) -> Tensor:
        """r - beta sum_t (l_old_t - l_ref_t); logs the mean sequence KL over every process's valid rows."""
        if self.kl_coef == 0:
            return rollout.rewards
        sequence_kl = torch.where(rollout.response_mask, rollout.old_logprobs - rollout.ref_logprobs, 0.0).sum(-1)
        totals = torch.stack([sequence_kl[rollout.valid].sum(), rollout.valid.sum()]).double()
        kl_sum, count = self.sum_across_processes(totals).tolist()
        self.log_metrics({"kl": kl_sum / max(count, 1.0)})
        return rollout.rewards - self.kl_coef * sequence_kl.to(rollout.rewards.dtype)

    def update(self, rollout: Rollout) -> None:
        advantages = compute_advantages(
            self.advantage, self.shaped_rewards(rollout), rollout.groups, rollout.valid,
            sum_across=self.sum_across_processes, moving_average=self.moving_average,
        ).advantages
        valid = rollout.valid

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            inputs = rollout.model_inputs(micro)
            mask = inputs["response_mask"] & valid[micro, None]
            token, loss, metrics = linear_loss_pass(
                self, inputs, lambda logprobs: reinforce_loss(logprobs, advantages[micro], mask, num_sequences=float(totals[0]))
            )
            tokens = float(mask.sum())
            entropy = (token.entropy.detach() * mask).sum() / max(tokens, 1.0)
            return LossOutput(loss, terms={"policy_loss": metrics["policy_loss"]}, means={"entropy": entropy}, weight=tokens)

        metrics = run_update(self, valid.nonzero().flatten(), self.update_config, lambda index: valid[index].sum()[None], micro_loss)
        advantage_abs, count = self.sum_across_processes(torch.stack([advantages[valid].abs().sum(), valid.sum()]).double()).tolist()
        self.log_metrics({**metrics, "advantage_abs_mean": advantage_abs / max(count, 1.0)})
