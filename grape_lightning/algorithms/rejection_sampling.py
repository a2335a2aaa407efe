"""Online rejection sampling (best-of-n): sample, keep the best, fine-tune on them, repeat."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.algorithms.on_policy import OnPolicyModule, RunningMeans
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.losses.sft import sft_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
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
    minimise the SFT loss -mean_t l_t over the kept responses. Every rollout batch brings fresh
    samples from the updated policy.

    Per rollout batch: ``epochs`` passes over the kept responses in mini-batches of
    ``mini_batch_size`` (all at once when None), one optimizer step per mini-batch.

    Args:
        keep_top_k: responses kept per prompt (the best-scoring ones).
        reward_threshold: keep only responses scoring at least this (None: no threshold).
        epochs: passes over the kept responses per rollout batch.
        mini_batch_size: responses per optimizer step (None: all kept responses at once).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        keep_top_k: int = 1,
        reward_threshold: float | None = None,
        epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int = 64,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(
            policy, rewards, sampling, optimizer, reference=False, micro_batch_size=micro_batch_size,
            max_grad_norm=max_grad_norm, gradient_checkpointing=gradient_checkpointing,
            logprob_chunk_size=logprob_chunk_size, seed=seed,
        )
        self.keep_top_k = keep_top_k
        self.reward_threshold = reward_threshold
        self.epochs = epochs
        self.mini_batch_size = mini_batch_size

    def update(self, rollout: Rollout) -> None:
        kept = select_best(rollout.rewards, rollout.groups, rollout.valid, self.keep_top_k, self.reward_threshold)
        kept_rows = kept.nonzero().flatten()
        self.log_metrics({
            "kept_fraction": float(kept.float().mean()),
            "kept_reward": float(rollout.rewards[kept].mean()) if kept.any() else float("nan"),
        })
        means = RunningMeans()
        for epoch in range(self.epochs):
            for index in self.minibatches(kept_rows, self.mini_batch_size, salt=epoch):
                num_tokens = rollout.response_mask[index].sum()

                def micro_loss(micro: Tensor) -> Tensor:
                    inputs = rollout.model_inputs(micro)
                    logprobs = self.policy_logprobs(inputs, chunk_size=self.logprob_chunk_size).logprobs
                    loss, metrics = sft_loss(logprobs, inputs["response_mask"], num_tokens=num_tokens)
                    tokens = float(metrics["num_response_tokens"])
                    means.add({"nll": -(logprobs.detach() * inputs["response_mask"]).sum() / max(tokens, 1.0)}, weight=tokens)
                    return loss

                self.optimizer_step_over(index, micro_loss)
        self.log_metrics(means.means())
