"""GSPO: group-relative advantages, a sequence-level importance ratio clipped per sequence."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.policy_update import policy_update
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.gspo import gspo_loss
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.sampling import SamplingParams


class GSPOModule(OnPolicyModule):
    """Group Sequence Policy Optimization (Zheng et al., 2025).

    For each prompt the DataModule supplies G samples (``group_size``); with r_i their rewards and
    l_it, l_old_it the log-probs of response token t under the policy and under pi_old (the
    weights that sampled),

        A_i = (r_i - mean_group r) / (std_group r + eps)          (``advantage``: any baseline and scaling)
        s_i = exp( (1/|y_i|) sum_t (l_it - l_old_it) )
        L   = -(1/B) sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    over the B valid responses of the global mini-batch
    (:func:`~grape_lightning.losses.gspo.gspo_loss`, :mod:`grape_lightning.algorithms.policy_update`).
    The ratio, its clip and the loss are per sequence, the unit the reward scores: a sequence whose
    ratio has left the range drops out whole. ``token_level`` takes GSPO-token's ratio
    s_it = sg[s_i] pi(y_it) / sg[pi(y_it)], equal to GSPO here, the advantages being per sequence.
    No KL term. Per rollout batch: ``update.epochs`` passes over shuffled mini-batches of
    ``update.mini_batch_size`` sequences, one optimizer step each (one step with the sampling
    weights has s_i = 1: the clip acts from the second step on).

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response
            (``train/accuracy``, ``val/accuracy``; None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline and scaling (default: group mean, group std).
        eps_low: sequence ratios below 1 - eps_low are clipped (GSPO's 3e-4: a length-normalised
            ratio moves far less than a token's).
        eps_high: sequence ratios above 1 + eps_high are clipped (GSPO's 4e-4).
        token_level: GSPO-token's ratio (the same loss and gradient for per-sequence advantages).
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
        eps_low: float = 3e-4,
        eps_high: float = 4e-4,
        token_level: bool = False,
        update: UpdateConfig | None = None,
        mismatch: MismatchCorrection | None = None,
        seed: int = 0,
        dynamic_sampling: DynamicSamplingConfig | None = None,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(
            policy, scorer, sampling, optimizer, update, reference=False, seed=seed, mismatch=mismatch,
            dynamic_sampling=dynamic_sampling,
        )
        if not 0 <= eps_low < 1 or eps_high < 0:
            raise ValueError(f"GSPO: eps_low must be in [0, 1) and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")
        self.check_dynamic_sampling(self.advantage.baseline)
        self.eps_low, self.eps_high, self.token_level = eps_low, eps_high, token_level


    def policy_loss(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_sequences: float, num_tokens: float,
        token_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return gspo_loss(logprobs, old_logprobs, advantages, mask, eps_low=self.eps_low, eps_high=self.eps_high,
                         token_level=self.token_level, num_sequences=num_sequences, token_weights=token_weights)

    def update(self, rollout: Rollout) -> None:
        advantages = compute_advantages(
            self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes
        ).advantages
        self.log_metrics(policy_update(self, rollout, advantages, self.policy_loss))
