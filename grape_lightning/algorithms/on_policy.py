"""Shared machinery of the on-policy algorithms: sample, score, then let the subclass update.

    prompts (RolloutDataModule) -> generate (engine) -> score (rewards) -> old / reference log-probs
      -> ``update(rollout)`` (the algorithm) -> optimizer steps

Optimisation is manual, since one rollout batch may feed several optimizer steps. Lightning's
``global_step`` counts optimizer steps, so ``max_steps`` is a number of optimizer steps; each
algorithm documents how many it takes per rollout batch.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from grape_lightning.algorithms.base import PolicyModule, as_dataclass
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.combined import CombinedReward, InvalidRewards, RewardScores
from grape_lightning.rollout.batch import Rollout, minibatch_indices
from grape_lightning.rollout.engine import Generation, GenerationEngine
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_engine import build_engine


# A checkpoint of an on-policy module holds the weights after the rollout's update, which is what a
# resumed run continues from (it samples a fresh rollout); Lightning's reminder does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and every run."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return seed


class OnPolicyModule(PolicyModule):
    """Base of REINFORCE, rejection sampling, GRPO (and PPO, TRPO, GRAPE).

    Args:
        policy: the model to train (a :class:`ModelSpec`).
        rewards: reward functions, combined as sum_k w_k r_k (the first is the "primary" one that
            defines ``val/accuracy``: the share of greedy responses it scores 1).
        sampling: sampling parameters of the training rollouts.
        reference: keep a frozen copy of the initial policy (for KL terms).
        micro_batch_size: sequences per forward/backward (gradients accumulate up to a step).
        max_grad_norm: clip the global gradient norm before each step (None: no clipping).
        seed: seeds sampling; the generator of a rollout is derived from (seed, rank, step), so a
            resumed run samples what the uninterrupted run would have.
        optimizer: AdamW and learning-rate schedule (defaults when None).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        logprob_chunk_size: response tokens per chunk of the LM-head log-prob computation (bounds the
            [tokens, vocab] memory).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        reference: bool = False,
        micro_batch_size: int = 64,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        logprob_chunk_size: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__(optimizer)
        self.automatic_optimization = False
        policy = as_dataclass(policy, ModelSpec)
        self.sampling = as_dataclass(sampling, SamplingParams) or SamplingParams()
        self.save_plain_hyperparameters(policy=policy, sampling=self.sampling, optimizer=self.optimizer_config)
        self.build_models(policy, reference=reference, gradient_checkpointing=gradient_checkpointing)
        # None only when a checkpoint is loaded for export or inspection; training needs rewards.
        self.reward = CombinedReward(list(rewards)) if rewards else None
        self.engine: GenerationEngine = build_engine(self.sampling.engine, self.tokenizer)
        self.micro_batch_size = micro_batch_size
        self.max_grad_norm = max_grad_norm
        self.logprob_chunk_size = logprob_chunk_size
        self.seed = seed
        self.last_samples: list[dict[str, Any]] = []
        self.last_invalid_rewards: InvalidRewards | None = None  # of the last training rollout
        self.initial_metrics: dict[str, float] = {}

    # Whether the update may run on parameters a strategy shards (FSDP2, DeepSpeed); TRPO's may not.
    updates_sharded_parameters = True

    def configure_model(self) -> None:
        if self._trainer is None:  # loaded for export or inspection (load_from_checkpoint): nothing to shard
            return
        self.check_strategy()
        self.configure_deepspeed()
        super().configure_model()

    def check_strategy(self) -> None:
        """Refuse, with the way out, the strategies under which the manual update cannot run
        (before the strategy wraps the module)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        name = type(self).__name__
        if isinstance(strategy, FSDPStrategy):
            raise ValueError(
                f"{name} optimises inside training_step, which FSDPStrategy (FSDP1) runs inside the root unit's "
                "forward, where FSDP1 refuses a backward. Use FSDP2, which shards the same way: "
                "--trainer.strategy fsdp2 (grape_lightning.strategies.FSDP2Strategy)."
            )
        if not self.updates_sharded_parameters and isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"{name} computes its step on whole parameters and has no optimizer state to shard: "
                f"{type(strategy).__name__} is not supported; use ddp"
            )

    def configure_deepspeed(self) -> None:
        """Manual optimisation under DeepSpeed: the micro-batches' gradients accumulate locally and
        ``optimizer.step()`` reduces and applies them (``managed_gradient_accumulation: false``;
        DeepSpeed's own counter would take every backward for a step of its own), and DeepSpeed
        clips to ``max_grad_norm`` (Lightning leaves clipping to it)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, DeepSpeedStrategy):
            return
        from deepspeed import DeepSpeedEngine

        if not hasattr(DeepSpeedEngine, "managed_gradient_accumulation"):
            raise ImportError(
                f"{type(self).__name__} accumulates micro-batches before each optimizer step, which needs a "
                "DeepSpeed with managed_gradient_accumulation (pip install -U deepspeed)"
            )
        strategy.config["managed_gradient_accumulation"] = False
        strategy.config["gradient_clipping"] = self.max_grad_norm or 0.0

    # -- rollout ---------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, self.global_rank, self.global_step))
        return generator

    @torch.no_grad()
    def token_logprobs(self, model: torch.nn.Module, rollout_inputs: dict[str, Tensor]) -> Tensor:
        """Log-probs of the response tokens under ``model`` at the sampling temperature, without a
        graph. (Not inference mode: FSDP2 keeps the parameters it gathers here for later calls
        under autograd, which inference tensors would refuse.)"""
        return response_logprobs(
            model, rollout_inputs["input_ids"], rollout_inputs["response_mask"], rollout_inputs["attention_mask"],
            temperature=self.sampling.logprob_temperature, chunk_size=self.logprob_chunk_size,
        ).logprobs

    def _in_micro_batches(self, size: int, compute: Callable[[Tensor], Tensor], like: Tensor) -> Tensor:
        out = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
        for index in torch.arange(size, device=self.device).split(self.micro_batch_size):
            values = compute(index)
            out[index, : values.shape[1]] = values
        return out

    def collect_rollout(self, batch: dict[str, Any], sampling: SamplingParams | None = None) -> Rollout:
        """Sample responses for ``batch``, score them and compute pi_old and reference log-probs."""
        sampling = sampling or self.sampling
        was_training = self.policy.training
        self.policy.eval()
        start = time.perf_counter()
        with self.generation_context() as policy:
            generation = self.engine.generate(policy, batch["prompt_ids"], sampling, None if sampling.greedy else self._generator())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        generation_seconds = time.perf_counter() - start
        self.engine.release()  # the KV cache and decode graphs are rebuilt next time; their memory goes to the update
        self.policy.train(was_training)

        if not sampling.greedy:
            generation, batch = self.extend_sample_set(batch, generation)
        responses = self.tokenizer.batch_decode(
            [ids[mask].tolist() for ids, mask in zip(generation.input_ids, generation.response_mask)], skip_special_tokens=True
        )
        groups = batch["groups"].to(self.device)
        scores = self.score(batch["prompts"], responses, batch["metadata"], groups)
        rollout = Rollout(
            input_ids=generation.input_ids,
            attention_mask=generation.attention_mask,
            response_mask=generation.response_mask,
            old_logprobs=generation.logprobs,
            sampling_logprobs=generation.logprobs,
            rewards=scores.total.to(self.device),
            valid=scores.valid.to(self.device),
            groups=groups,
            prompts=batch["prompts"],
            responses=responses,
            metadata=batch["metadata"],
            reward_terms=scores.per_function,
            off_policy=batch.get("off_policy", torch.zeros(len(responses), dtype=torch.bool)).to(self.device),
            details=scores.details,
        )
        if not sampling.greedy:
            if self.needs_old_logprobs:
                rollout.old_logprobs = self._in_micro_batches(
                    len(rollout), lambda i: self.token_logprobs(self.policy, rollout.model_inputs(i)), rollout.old_logprobs
                )
            if self.reference is not None:
                rollout.ref_logprobs = self._in_micro_batches(
                    len(rollout), lambda i: self.with_reference(self.token_logprobs, rollout.model_inputs(i)), rollout.old_logprobs
                )
        rollout.generation_seconds = generation_seconds
        return rollout

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the update needs pi_old's log-probs recomputed by the training forward pass
        (the sampler's may differ in rounding). An algorithm that takes one optimizer step per
        rollout with the weights that sampled can read them off its own forward pass instead, which
        saves one forward over the rollout."""
        return True

    def extend_sample_set(self, batch: dict[str, Any], generation: Generation) -> tuple[Generation, dict[str, Any]]:
        """Hook for algorithms whose sample set holds more than the policy's samples (GRAPE's
        off-policy responses): returns the extended generation and batch; here, both unchanged."""
        return generation, batch

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> RewardScores:
        """Rewards of the sampled responses (``groups`` lets sample-set-aware scorers see the sets)."""
        if self.reward is None:
            raise ValueError(f"{type(self).__name__} needs 'rewards' to score rollouts")
        return self.reward(prompts, responses, metadata)

    # -- optimisation ----------------------------------------------------------------------------
    def optimizer_step_over(self, index: Tensor, micro_loss: Callable[[Tensor], Tensor]) -> None:
        """One optimizer step on the rows ``index``: accumulate ``micro_loss`` over micro-batches
        (each already normalised by the whole mini-batch), clip, step the optimizer and schedule."""
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        for micro in index.split(self.micro_batch_size):
            self.manual_backward(micro_loss(micro))
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def minibatches(self, rows: Tensor, minibatch_size: int | None, salt: int = 0) -> list[Tensor]:
        """The row indices ``rows`` in shuffled mini-batches (all of them at once for None).

        The order is derived from (seed, rank, step, salt), so a resumed run shuffles the same way.
        """
        if rows.numel() == 0:
            return []
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, self.global_rank, self.global_step, salt))
        orders = minibatch_indices(rows.numel(), minibatch_size or rows.numel(), shuffle)
        return [rows[order.to(rows.device)] for order in orders]

    # -- the algorithm ---------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.collect_rollout(batch)
        self.last_invalid_rewards = InvalidRewards.of(
            rollout.reward_terms, rollout.valid, rollout.prompts, rollout.responses, rollout.metadata
        )
        self._log_rollout(rollout, "train")
        self.update(rollout)

    @property
    def greedy_sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.sampling.max_new_tokens, temperature=0.0, stop_strings=self.sampling.stop_strings, engine=self.sampling.engine
        )

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._log_rollout(self.collect_rollout(batch, self.greedy_sampling), "val")

    @torch.no_grad()
    def on_train_start(self) -> None:
        """Evaluate the initial policy (greedy, the whole validation split) and log it at step 0, so
        every run shows its starting point (Lightning does not log its sanity check)."""
        datamodule = self.trainer.datamodule
        if self.global_step > 0 or datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return
        loader = datamodule.val_dataloader()
        if not loader:
            return
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, reward sum, count
        for batch in loader:
            rollout = self.collect_rollout(self.trainer.strategy.batch_to_device(batch), self.greedy_sampling)
            primary = next(iter(rollout.reward_terms.values()))
            totals += torch.tensor(
                [float((primary == 1).sum()), float(rollout.rewards[rollout.valid].sum()), float(rollout.valid.sum())],
                dtype=torch.float64, device=self.device,
            )
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        count = max(float(totals[2]), 1.0)
        metrics = {"val/accuracy": float(totals[0]) / count, "val/reward": float(totals[1]) / count}
        self.initial_metrics = metrics
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)
        rank_zero_info(f"initial policy: val/accuracy {metrics['val/accuracy']:.3f}, val/reward {metrics['val/reward']:.3f}")

    # -- logging ---------------------------------------------------------------------------------
    def _log_rollout(self, rollout: Rollout, stage: str) -> None:
        size = len(rollout)
        on_step = stage == "train"
        log = {"on_step": on_step, "on_epoch": not on_step, "batch_size": size, "sync_dist": not on_step}
        valid_rewards = rollout.rewards[rollout.valid]
        if valid_rewards.numel():
            self.log(f"{stage}/reward", valid_rewards.float().mean(), prog_bar=True, **log)
            if on_step:
                self.log(f"{stage}/reward_std", valid_rewards.float().std() if valid_rewards.numel() > 1 else 0.0, **log)
        for name, values in rollout.reward_terms.items():
            present = values[torch.isfinite(values)]
            if present.numel():
                self.log(f"{stage}/reward/{name}", present.float().mean(), **log)
        primary = next(iter(rollout.reward_terms.values()))
        self.log(f"{stage}/accuracy", (primary == 1).float().mean(), prog_bar=stage == "val", **log)
        self.log(f"{stage}/invalid_rewards", (~rollout.valid).float().sum(), reduce_fx="sum", **{**log, "batch_size": 1})
        self.log(f"{stage}/response_length", rollout.response_lengths.float().mean(), **log)
        if on_step:
            tokens = float(rollout.response_mask.sum())
            self.log("train/generation_tokens_per_s", tokens / max(rollout.generation_seconds, 1e-9), **log)
            details = rollout.details or [{} for _ in rollout.responses]
            self.last_samples = [
                {"prompt": p, "response": r, "reward": float(w), **extra}
                for p, r, w, extra in zip(rollout.prompts, rollout.responses, rollout.rewards.tolist(), details)
            ]

    def log_metrics(self, metrics: dict[str, float], prefix: str = "train/") -> None:
        for name, value in metrics.items():
            self.log(prefix + name, value, on_step=True, on_epoch=False)


class RunningMeans:
    """Weighted means of metrics over the micro-batches of one update (for one log per rollout)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, Tensor | float], weight: float = 1.0) -> None:
        for name, value in metrics.items():
            self.totals[name] = self.totals.get(name, 0.0) + float(value) * weight
            self.weights[name] = self.weights.get(name, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {name: total / max(self.weights[name], 1e-12) for name, total in self.totals.items()}
