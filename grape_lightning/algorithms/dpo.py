"""Direct Preference Optimization (and IPO, hinge, conservative DPO) with an optional SFT term."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from grape_lightning.algorithms.base import PolicyModule, as_dataclass, log_stage
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.data.collate import padding_free, sequence_ids, sequence_sums
from grape_lightning.data.preference import collate_pairs
from grape_lightning.losses.dpo import DPOLossType, dpo_loss
from grape_lightning.losses.sft import sft_loss
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.varlen_attention import padding_free_wanted

ReferenceMode = Literal["online", "precompute"]


class DPOModule(PolicyModule):
    """DPO on batches of :class:`~grape_lightning.data.preference.PreferenceDataModule` (chosen and
    rejected concatenated, one forward pass).

    Loss: :func:`~grape_lightning.losses.dpo.dpo_loss` of type ``loss_type`` on sequence log-probs
    (sums over response tokens; per-token means when ``length_normalize``, the default for IPO),
    plus ``sft_weight`` times the chosen responses' token-mean NLL.

    The NLL term (``sft_weight``, DPO + NLL): DPO's loss depends only on the margin between the
    chosen and rejected log-probs, and it is often lowered by pushing both down, the rejected
    faster. Then the preferred responses lose probability too and greedy outputs can get worse
    (malformed, or ended early) while pair accuracy rises. The NLL term keeps the chosen log-prob
    up; use it whenever the chosen responses are good outputs in their own right (a verified
    answer, a demonstration). After each validation the module warns when the mean chosen drift
    l(y_w) - l_ref(y_w) is negative while the margin is positive, the sign of that failure.

    Padding-free (``padding_free``): the 2B chosen and rejected sequences of a batch run as one
    row of their real tokens, positions restarting per sequence, through the policy and the
    reference alike (:func:`~grape_lightning.data.collate.padding_free`); each sequence's sum is
    taken over its own tokens, so the loss and its gradients are those of the padded batch and no
    compute goes to padding.

    Reference log-probs:

    - ``online``: a frozen copy of the initial policy scores every batch;
    - ``precompute``: before training the initial policy scores every pair once (train and
      validation); the values are cached on disk (``reference_cache_dir``, keyed by model and
      data) and stored in checkpoints, and no reference model is kept in memory.

    Args:
        policy: the model to train (a :class:`ModelSpec`); its initial weights are the reference.
        beta: beta, the inverse temperature of the implicit reward beta (log pi_theta / pi_ref).
        loss_type: ``sigmoid`` (DPO; conservative DPO with ``label_smoothing``), ``ipo`` or ``hinge``.
        label_smoothing: epsilon of conservative DPO: the assumed probability that a label is flipped.
        sft_weight: weight of the chosen responses' token-mean NLL added to the loss.
        length_normalize: use per-token mean log-probs instead of sums (None: True for IPO only).
        reference_logprobs: ``online`` (a frozen reference scores each batch) or ``precompute`` (scored
            once, cached).
        reference_cache_dir: directory of the precomputed reference log-probs (None:
            ``<default_root_dir>/reference_logps``).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        logprob_chunk_size: response tokens per chunk of the LM-head log-prob computation.
        padding_free: run each batch as one packed row without padding (None: where the policy's
            attention runs packed rows sequence by sequence, as ``sdpa_varlen``, the default on CUDA).
    """

    def __init__(
        self,
        policy: ModelSpec,
        optimizer: OptimizerConfig | None = None,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        length_normalize: bool | None = None,
        reference_logprobs: ReferenceMode = "online",
        reference_cache_dir: str | None = None,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        padding_free: bool | None = None,
    ) -> None:
        super().__init__(optimizer)
        policy = as_dataclass(policy, ModelSpec)
        self.save_plain_hyperparameters(policy=policy, optimizer=self.optimizer_config)
        if reference_logprobs not in ("online", "precompute"):
            raise ValueError(f"reference_logprobs must be 'online' or 'precompute', got {reference_logprobs!r}")
        self.build_models(policy, reference=reference_logprobs == "online", gradient_checkpointing=gradient_checkpointing)
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.sft_weight = sft_weight
        self.length_normalize = loss_type == "ipo" if length_normalize is None else length_normalize
        self.reference_mode = reference_logprobs
        self.reference_cache_dir = reference_cache_dir
        self.logprob_chunk_size = logprob_chunk_size
        self.padding_free = padding_free
        self.reference_cache: dict[str, Tensor] = {}  # split -> [pairs, 2] (chosen, rejected)
        # validation sums of the chosen drift, the rejected drift and the pair count
        self._val_drifts = torch.zeros(3, dtype=torch.float64)

    # -- log-probs -------------------------------------------------------------------------------
    def sequence_logps(self, token_logprobs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """l(y_r) for the 2B sequences r of ``batch`` (chosen first): the sum of log-probs over
        the response tokens of sequence r (padded rows or a padding-free row alike), divided by
        their count when ``length_normalize``."""
        mask = batch["response_mask"].to(token_logprobs.dtype)
        ids, count = sequence_ids(batch), 2 * len(batch["pair_ids"])
        total = sequence_sums(token_logprobs * mask, ids, count)
        return total / sequence_sums(mask, ids, count).clamp(min=1) if self.length_normalize else total

    def _batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return padding_free(batch) if padding_free_wanted(self.padding_free, self.policy) else batch

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, Tensor], split: str) -> Tensor:
        if self.reference_mode == "online":
            return self.sequence_logps(self.reference_logprobs(batch, chunk_size=self.logprob_chunk_size), batch)
        pairs = self.reference_cache[split][batch["pair_ids"].cpu()].to(self.device)
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    # -- the reference cache ---------------------------------------------------------------------
    def _cache_key(self, pairs: dict[str, list[dict[str, Any]]]) -> str:
        digest = hashlib.sha256(json.dumps(self.hparams["policy"], sort_keys=True).encode())
        digest.update(str(self.length_normalize).encode())
        for split in sorted(pairs):
            for pair in pairs[split]:
                digest.update(json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"]]).encode())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def _score_pairs(self, pairs: list[dict[str, Any]], batch_size: int) -> Tensor:
        values = []
        was_training = self.policy.training
        self.policy.eval()
        with self.generation_context() as policy:  # before training: FSDP / ZeRO-3 parameters gathered
            for start in range(0, len(pairs), batch_size):
                batch = collate_pairs(pairs[start : start + batch_size], self.tokenizer.pad_token_id)
                batch = self._batch({k: v.to(self.device) for k, v in batch.items()})
                token = response_logprobs(policy, batch["input_ids"], batch["response_mask"], batch.get("attention_mask"),
                                          batch.get("position_ids"), chunk_size=self.logprob_chunk_size)
                logps = self.sequence_logps(token.logprobs, batch)
                half = len(batch["pair_ids"])
                values.append(torch.stack([logps[:half], logps[half:]], dim=1).cpu())
        self.policy.train(was_training)
        return torch.cat(values) if values else torch.zeros(0, 2)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference_mode != "precompute" or self.reference_cache:
            return  # online, or restored from a checkpoint (never recomputed with trained weights)
        datamodule = self.trainer.datamodule
        pairs = {"train": datamodule.train_pairs, "val": datamodule.val_pairs}
        directory = Path(self.reference_cache_dir or Path(self.trainer.default_root_dir) / "reference_logps")
        path = directory / f"{self._cache_key(pairs)}.pt"
        if path.is_file():
            self.reference_cache = torch.load(path, weights_only=True)
            rank_zero_info(f"reference log-probs loaded from {path}")
            return
        self.reference_cache = {split: self._score_pairs(items, datamodule.val_batch_size) for split, items in pairs.items()}
        if self.trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            torch.save(self.reference_cache, partial)
            partial.replace(path)
            rank_zero_info(f"reference log-probs of {sum(len(v) for v in pairs.values())} pairs cached in {path}")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.reference_cache:
            checkpoint["reference_logps"] = self.reference_cache

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_cache = checkpoint.get("reference_logps", {})

    # -- steps -----------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        batch = self._batch(batch)
        token = self.policy_logprobs(batch, chunk_size=self.logprob_chunk_size)
        logps = self.sequence_logps(token.logprobs, batch)
        ref_logps = self._reference_logps(batch, "train" if stage == "train" else "val")
        pairs = len(batch["pair_ids"])
        loss, metrics = dpo_loss(
            logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        )
        if self.sft_weight:
            # token mean over the chosen responses of every rank: normalised by the global count
            # times the processes, whose gradient average the strategy takes
            chosen = batch["response_mask"].bool() & (sequence_ids(batch) < pairs)
            tokens = float(self.sum_across_processes(chosen.sum().double())) / self.data_parallel_size
            nll, _ = sft_loss(token.logprobs, chosen, num_tokens=tokens)
            loss = loss + self.sft_weight * nll
            metrics["sft_nll"] = nll.detach()
        log_stage(self, stage, metrics, pairs, prog_bar=("loss", "rewards/accuracies"))
        if stage == "val":
            self._val_drifts = self._val_drifts.to(self.device) + torch.stack(
                [(logps[:pairs] - ref_logps[:pairs]).detach().sum(), (logps[pairs:] - ref_logps[pairs:]).detach().sum(),
                 torch.tensor(float(pairs), device=self.device)]
            ).double()
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_drifts = torch.zeros(3, dtype=torch.float64, device=self.device)

    def on_validation_epoch_end(self) -> None:
        """Warn when the chosen log-prob fell from the reference's while the margin rose (see the
        class docstring); the numbers are the validation means over every rank's pairs."""
        chosen, rejected, pairs = self.sum_across_processes(self._val_drifts).tolist()
        if pairs == 0 or (self._trainer is not None and self.trainer.sanity_checking):
            return
        chosen, rejected = chosen / pairs, rejected / pairs
        if chosen < 0 and chosen - rejected > 0:
            rank_zero_warn(
                f"step {self.global_step}: the chosen responses' log-prob fell by {-chosen:.3f} nats from the "
                f"reference's while the margin rose to {chosen - rejected:.3f} (the rejected fell by {-rejected:.3f}): "
                "DPO is lowering the preferred responses too, and greedy outputs can get worse while pair accuracy "
                f"rises. An NLL term (sft_weight, now {self.sft_weight}) keeps the chosen log-prob up."
            )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
