"""GRPO: group-relative advantages, clipped surrogate, KL to the reference."""

from __future__ import annotations

from collections.abc import Sequence

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.surrogate_update import SurrogateConfig, surrogate_update
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.sampling import SamplingParams


class GRPOModule(OnPolicyModule):
    """Group Relative Policy Optimization.

    For each prompt the DataModule supplies G samples (``group_size``); with r_i their rewards,

        A_i = (r_i - mean_group r) / (std_group r + eps)          (``advantage``: any baseline and scaling)
        L   = agg_{i,t} [ -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it ]

    (:mod:`grape_lightning.advantages`, :mod:`grape_lightning.algorithms.surrogate_update`). Per
    rollout batch: ``update.epochs`` passes, each over shuffled mini-batches of
    ``update.mini_batch_size`` sequences (all at once when None), one optimizer step per
    mini-batch, so ``max_steps`` = rollout batches x epochs x mini-batches per pass. Groups whose
    rewards all tie have zero advantages; their share is logged (``train/tied_groups``).

    Several processes (DDP, FSDP, DeepSpeed) optimise the loss of the global batch: a prompt's
    samples never straddle processes, and batch statistics and normalisers are counted over all.

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response
            (``train/accuracy``, ``val/accuracy``; None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline and scaling (default: group mean, group std).
        loss: clip range, KL penalty and token aggregation of the surrogate.
        update: epochs, mini- and micro-batches, clipping.
        mismatch: correction of the sampler/trainer mismatch (``tis``, ``token_mask``,
            ``sequence_mask``; default none), a stop-gradient weight on each token's policy term
            (:mod:`grape_lightning.losses.mismatch`).
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
        dynamic_sampling: DAPO's dynamic sampling: groups whose rewards all tie are replaced by
            fresh ones (``{max_rounds: 3}``; None: off; :mod:`grape_lightning.rollout.dynamic_sampling`).
    """

    reads_old_logprobs_off_its_pass = True

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        advantage: AdvantageConfig | None = None,
        loss: SurrogateConfig | None = None,
        update: UpdateConfig | None = None,
        mismatch: MismatchCorrection | None = None,
        seed: int = 0,
        dynamic_sampling: DynamicSamplingConfig | None = None,
    ) -> None:
        loss = as_dataclass(loss, SurrogateConfig) or SurrogateConfig()
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(
            policy, scorer, sampling, optimizer, update, reference=loss.beta > 0, seed=seed, mismatch=mismatch,
            dynamic_sampling=dynamic_sampling,
        )
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")
        self.check_dynamic_sampling(self.advantage.baseline)
        self.loss = loss


    def update(self, rollout: Rollout) -> None:
        advantages = compute_advantages(self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes)
        self.log_metrics(surrogate_update(self, rollout, advantages.advantages, rollout.valid, self.loss))
