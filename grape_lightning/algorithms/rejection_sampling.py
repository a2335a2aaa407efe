"""Online rejection sampling (best-of-n): sample, keep the best, fine-tune on them, repeat."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.losses.sft import sft_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams


def select_best(rewards: Tensor, groups: Tensor, valid: Tensor, keep_top_k: int, threshold: float | None) -> Tensor:
    """Mask of the kept responses: per group the ``keep_top_k`` highest valid rewards (ties: the
    earlier sample), of those only the ones with reward >= ``threshold`` when one is given."""
    kept = torch.zeros_like(valid)
    for group in groups.unique():
        rows = ((groups == group) & valid).nonzero().flatten()
        best = rows[torch.argsort(-rewards[rows], stable=True)][:keep_top_k]
        if threshold is not None:
            best = best[rewards[best] >= threshold]
        kept[best] = True
    return kept


class RejectionSamplingModule(OnPolicyModule):
    """For each prompt sample n responses (``group_size`` of the DataModule) from pi_old, score them,
    keep the best ``keep_top_k`` (optionally only those scoring at least ``reward_threshold``), and
    minimise the SFT loss over the kept responses of the global batch,

        L = - sum_{i kept, t} l_it / (response tokens kept)

    Per rollout batch: ``update.epochs`` passes over the kept responses in mini-batches of
    ``update.mini_batch_size`` (all at once when None), one optimizer step per mini-batch.

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule.
        keep_top_k: responses kept per prompt (the best-scoring ones).
        reward_threshold: keep only responses scoring at least this (None: no threshold).
        update: epochs, mini- and micro-batches, clipping.
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        keep_top_k: int = 1,
        reward_threshold: float | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, optimizer, update, reference=False, seed=seed)
        self.keep_top_k = keep_top_k
        self.reward_threshold = reward_threshold

    @property
    def needs_old_logprobs(self) -> bool:
        return False  # the SFT loss has no ratio

    def update(self, rollout: Rollout) -> None:
        kept = select_best(rollout.rewards, rollout.groups, rollout.valid, self.keep_top_k, self.reward_threshold)
        kept_tokens = rollout.response_mask & kept[:, None]

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            inputs = rollout.model_inputs(micro)
            logprobs = self.token_logprobs(inputs).logprobs
            mask = inputs["response_mask"] & kept[micro, None]
            loss, _ = sft_loss(logprobs, mask, num_tokens=float(totals[1]))
            return LossOutput(loss, terms={"nll": loss.detach()})

        normalisers = lambda index: torch.stack([kept[index].sum(), kept_tokens[index].sum()])  # noqa: E731
        metrics = run_update(self, kept.nonzero().flatten(), self.update_config, normalisers, micro_loss)
        totals = torch.stack([kept.sum(), torch.tensor(len(rollout), device=kept.device), rollout.rewards[kept].sum()])
        kept_count, count, kept_reward = self.sum_across_processes(totals.double()).tolist()
        metrics.update(kept_fraction=kept_count / max(count, 1.0), kept_reward=kept_reward / kept_count if kept_count else float("nan"))
        self.log_metrics(metrics)
