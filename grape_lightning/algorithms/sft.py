"""Supervised fine-tuning: maximise the likelihood of the demonstration responses."""

from __future__ import annotations

import torch
from torch import Tensor

from grape_lightning.algorithms.base import PolicyModule, as_dataclass, log_stage
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.data.collate import padding_free
from grape_lightning.losses.sft import sft_token_weights
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.varlen_attention import padding_free_wanted


class SFTModule(PolicyModule):
    """Completion-only SFT: L = -mean over response tokens of log pi_theta(y_t | x, y_<t)
    (:func:`~grape_lightning.losses.sft.sft_loss`, computed as its linear form
    :func:`~grape_lightning.losses.sft.sft_token_weights`).

    Batches come from :class:`~grape_lightning.data.sft.SFTDataModule` (padded or packed).
    Logs ``train/loss``, ``train/token_accuracy`` and the same under ``val/``.

    Padding-free (``padding_free``): each padded batch of B pairs runs as one row of its real
    tokens, positions restarting per pair (:func:`~grape_lightning.data.collate.padding_free`);
    the loss and its gradients are those of the padded batch, and no compute goes to padding.

    Args:
        policy: the model to train (a :class:`ModelSpec`).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        logprob_chunk_size: response tokens per chunk of the LM-head log-prob computation.
        padding_free: run each batch as one packed row without padding (None: where the policy's
            attention runs packed rows sequence by sequence, as ``sdpa_varlen``, the default on CUDA).
    """

    def __init__(
        self,
        policy: ModelSpec,
        optimizer: OptimizerConfig | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        padding_free: bool | None = None,
    ) -> None:
        super().__init__(optimizer)
        policy = as_dataclass(policy, ModelSpec)
        self.save_plain_hyperparameters(policy=policy, optimizer=self.optimizer_config)
        self.build_models(policy, gradient_checkpointing=gradient_checkpointing)
        self.logprob_chunk_size = logprob_chunk_size
        self.padding_free = padding_free

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        if padding_free_wanted(self.padding_free, self.policy):
            batch = padding_free(batch)
        mask = batch["response_mask"].bool()
        # The token mean of the global batch: normalised by every rank's tokens (one all-reduce)
        # times the processes, whose gradient average the strategy takes. The loss is linear in
        # the log-probs, so the LM head computes its gradient in the forward. The count stays on
        # the device until the metrics are read: one host synchronisation a step.
        num_tokens = self.sum_across_processes(mask.sum().double())
        weights = sft_token_weights(mask, num_tokens / self.data_parallel_size)
        token = self.policy_logprobs(batch, chunk_size=self.logprob_chunk_size, with_top1=True, linear_loss_weights=weights)
        summed = self.sum_across_processes(torch.stack([-(token.logprobs.detach() * mask).sum(), (token.top1 & mask).sum()]).double())
        nll, correct, num_tokens = torch.cat([summed, num_tokens[None]]).tolist()
        # Weighted by response tokens, so epoch values are exact token means across batches.
        log_stage(self, stage, {"loss": nll / max(num_tokens, 1.0), "token_accuracy": correct / max(num_tokens, 1.0)}, int(num_tokens))
        return token.linear_loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
