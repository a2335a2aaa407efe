"""CISPO: group-relative advantages, REINFORCE on every token with clipped importance weights."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.policy_update import policy_update
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.cispo import cispo_loss
from grape_lightning.losses.mismatch import MismatchCorrection
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig
from grape_lightning.rollout.sampling import SamplingParams


class CISPOModule(OnPolicyModule):
    """Clipped IS-weight Policy Optimization (MiniMax-M1, 2025).

    For each prompt the DataModule supplies G samples (``group_size``); with r_i their rewards and
    l_it, l_old_it the log-probs of response token t under the policy and under pi_old (the
    weights that sampled),

        A_i  = (r_i - mean_group r) / (std_group r + eps)         (``advantage``: any baseline and scaling)
        r_it = exp(l_it - l_old_it)
        L    = -sum_{i,t} sg[clip(r_it, 1 - eps_low, 1 + eps_high)] A_i l_it / sum_i |y_i|

    over the valid responses of the global mini-batch
    (:func:`~grape_lightning.losses.cispo.cispo_loss`, :mod:`grape_lightning.algorithms.policy_update`).
    The clip bounds each token's importance weight and never drops the token: where the clipped
    surrogate of GRPO and PPO zeroes the gradient of a token whose ratio left the range (often a
    rare token that forks the reasoning), CISPO keeps it, weighted by the bound. No KL term. Per
    rollout batch: ``update.epochs`` passes over shuffled mini-batches of ``update.mini_batch_size``
    sequences, one optimizer step each (one step with the sampling weights has r = 1: plain
    token-mean REINFORCE).

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response
            (``train/accuracy``, ``val/accuracy``; None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        advantage: baseline and scaling (default: group mean, group std).
        eps_low: weights below 1 - eps_low are raised to it; MiniMax-M1 sets no lower bound, and the
            default 1.0 (a floor of 0) is none.
        eps_high: weights above 1 + eps_high are lowered to it; MiniMax-M1 tunes it without
            publishing a value; the default is DAPO's clip-higher 0.28.
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
        eps_low: float = 1.0,
        eps_high: float = 0.28,
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
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"CISPO: eps_low and eps_high must be >= 0, got eps_low={eps_low}, eps_high={eps_high}")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="mean", scaling="group")
        self.check_dynamic_sampling(self.advantage.baseline)
        self.eps_low, self.eps_high = eps_low, eps_high


    def policy_loss(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, num_sequences: float, num_tokens: float,
        token_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return cispo_loss(
            logprobs, old_logprobs, advantages, mask, eps_low=self.eps_low, eps_high=self.eps_high, num_tokens=num_tokens,
            token_weights=token_weights,
        )

    def update(self, rollout: Rollout) -> None:
        advantages = compute_advantages(
            self.advantage, rollout.rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes
        ).advantages
        self.log_metrics(policy_update(self, rollout, advantages, self.policy_loss))
