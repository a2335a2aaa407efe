"""The on-policy data flow: prompts -> rollout -> scores -> advantages -> loss -> step.

    prompts (RolloutDataModule) -> RolloutCollector (generate, score, pi_old / reference log-probs)
      -> ``update(rollout)`` (the algorithm: advantages, loss) -> run_update (optimizer steps)

Optimisation is manual, since one rollout batch may feed several optimizer steps. Lightning's
``global_step`` counts optimizer steps, so ``max_steps`` is a number of optimizer steps; each
algorithm documents how many it takes per rollout batch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from grape_lightning.advantages import group_statistics
from grape_lightning.algorithms.base import PolicyModule, as_dataclass
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.models.spec import ModelSpec
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.losses.mismatch import MismatchCorrection, correction_weights, mismatch_statistics
from grape_lightning.rewards.combined import InvalidRewards
from grape_lightning.rewards.scorer import Scorer, Scores
from grape_lightning.rollout.batch import Rollout, minibatch_indices
from grape_lightning.rollout.collector import RolloutCollector
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig, dynamic_sample
from grape_lightning.rollout.off_policy import OffPolicyResponses
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_engine import build_engine


# A checkpoint of an on-policy module holds the weights after the rollout's update, which is what a
# resumed run continues from (it samples a fresh rollout); Lightning's reminder does not apply.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")


def _unscored(prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> Scores:
    raise ValueError("this module was built without rewards: pass them to train or evaluate it")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and every run."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part) + 1) % (2**63 - 1)
    return seed


class OnPolicyModule(PolicyModule):
    """The data flow every on-policy algorithm shares, each training step:

        rollout = collect(prompts)     generate, score, pi_old / reference log-probs (rollout/)
        update(rollout)                the algorithm: advantages, loss, optimizer steps

    A subclass builds its scorer and defines :meth:`update` (with :func:`run_update` for its
    optimizer steps) and, when its first step reads pi_old off its own forward pass, turns
    :attr:`needs_old_logprobs` off.

    Args:
        policy: the model to train (a :class:`ModelSpec`).
        scorer: scores the responses (None: a module loaded for export or inspection).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule (defaults when None).
        update: epochs, mini- and micro-batches, clipping (:class:`UpdateConfig`).
        reference: keep a frozen copy of the initial policy (for KL terms).
        seed: seeds sampling; the generator of a rollout is derived from (seed, rank, step), so a
            resumed run samples what the uninterrupted run would have.
        off_policy: responses added to each sample set besides the policy's samples (GRAPE).
        dynamic_sampling: DAPO's dynamic sampling of the training rollouts: groups whose rewards
            all tie are replaced by fresh ones (:mod:`grape_lightning.rollout.dynamic_sampling`;
            None: off). Only for algorithms whose advantages are relative to the group.
        mismatch: correction of the sampler/trainer mismatch (:class:`MismatchCorrection`; an
            algorithm that applies it takes it as an argument; default: none).
    """

    def __init__(
        self,
        policy: ModelSpec,
        scorer: Scorer | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        update: UpdateConfig | None = None,
        reference: bool = False,
        seed: int = 0,
        off_policy: OffPolicyResponses | None = None,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        mismatch: MismatchCorrection | None = None,
    ) -> None:
        super().__init__(optimizer)
        self.mismatch: MismatchCorrection = as_dataclass(mismatch, MismatchCorrection) or MismatchCorrection()
        self.automatic_optimization = False
        policy = as_dataclass(policy, ModelSpec)
        self.sampling = as_dataclass(sampling, SamplingParams) or SamplingParams()
        self.update_config: UpdateConfig = as_dataclass(update, UpdateConfig) or UpdateConfig()
        self.dynamic_sampling: DynamicSamplingConfig | None = as_dataclass(dynamic_sampling, DynamicSamplingConfig)
        if self.dynamic_sampling is not None and not self.dynamic_sampling.enabled:
            self.dynamic_sampling = None
        # (the correction is saved only by the algorithms that take it as an argument: a checkpoint's
        # hyper-parameters must rebuild the module that wrote it)
        given = {"mismatch": self.mismatch} if mismatch is not None else {}
        self.save_plain_hyperparameters(
            policy=policy, sampling=self.sampling, optimizer=self.optimizer_config, update=self.update_config, **given
        )
        self.build_models(policy, reference=reference, gradient_checkpointing=self.update_config.gradient_checkpointing)
        self.collector = RolloutCollector(
            build_engine(self.sampling.engine, self.tokenizer), scorer or _unscored, off_policy,
            self.update_config.micro_batch_size, self.update_config.logprob_chunk_size,
        )
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
        strategy.config["gradient_clipping"] = self.update_config.max_grad_norm or 0.0

    # -- rollout ---------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, self.global_rank, self.global_step))
        return generator

    def _round_generator(self, round_number: int) -> torch.Generator:
        """The generator of dynamic sampling's extra round ``round_number`` (>= 1), derived from
        (seed, rank, step, round): a resumed run samples what the uninterrupted run would have."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(derive_seed(self.seed, self.global_rank, self.global_step, round_number))
        return generator

    def collect_rollout(self, batch: dict[str, Any], sampling: SamplingParams | None = None) -> Rollout:
        """Sample responses for ``batch`` and score them; for training (not greedy) also pi_old's
        log-probs when :attr:`needs_old_logprobs` and the reference's when there is one. Training
        rollouts go through dynamic sampling when it is on (its statistics in
        :attr:`dynamic_sampling_statistics`)."""
        sampling = sampling or self.sampling
        training = not sampling.greedy
        if not training or self.dynamic_sampling is None:
            return self.collector(
                self, batch, sampling, self._generator() if training else None,
                old_logprobs=training and self.needs_old_logprobs, reference=training and self.reference is not None,
            )
        rollout, self.dynamic_sampling_statistics = dynamic_sample(
            self.dynamic_sampling, batch,
            sample=lambda prompts, number: self.sample_round(prompts, sampling, number),
            draw=self.fresh_prompts_source(),
            idle=self.idle_round,
            sum_across=self.sum_across_processes,
            pad_id=self.tokenizer.pad_token_id or 0,
        )
        return self.collector.add_logprobs(
            self, rollout, sampling, old_logprobs=self.needs_old_logprobs, reference=self.reference is not None
        )

    dynamic_sampling_statistics: dict[str, float] = {}

    def check_dynamic_sampling(self, baseline: str) -> None:
        """Dynamic sampling drops the groups whose rewards tie, which carry no signal only under a
        baseline relative to the group (``mean``, ``leave_one_out``): refuse it under any other."""
        if self.dynamic_sampling is not None and baseline not in ("mean", "leave_one_out"):
            raise ValueError(
                f"{type(self).__name__}: dynamic_sampling keeps the groups whose rewards differ, which is what carries a "
                f"signal under a group baseline; advantage.baseline is {baseline!r}: use 'mean' or 'leave_one_out', or "
                "turn dynamic_sampling off"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        group_size = getattr(self.trainer.datamodule, "group_size", None)
        if self.dynamic_sampling is not None and group_size is not None and group_size < 2:
            raise ValueError(
                f"dynamic_sampling needs several samples per prompt to tell groups apart; the DataModule's group_size is "
                f"{group_size}: set data.init_args.group_size >= 2 (or turn dynamic_sampling off)"
            )

    def sample_round(self, batch: dict[str, Any], sampling: SamplingParams, round_number: int) -> Rollout:
        """Generate and score ``batch``: round 0 with the step's generator, a later round of dynamic
        sampling with its own (:meth:`_round_generator`)."""
        generator = self._generator() if round_number == 0 else self._round_generator(round_number)
        return self.collector.sample(self, batch, sampling, generator)

    def idle_round(self) -> None:
        """A round of dynamic sampling in which this process samples nothing: it still enters the
        generation context, whose parameter gathering (FSDP, ZeRO-3) is a collective."""
        with self.generation_context():
            pass

    def fresh_prompts_source(self) -> Any:
        """``draw(count, round)`` of fresh training prompts for dynamic sampling (``prompts: fresh``
        and a DataModule with ``draw_prompts``), or None (the batch's tied prompts are sampled again)."""
        assert self.dynamic_sampling is not None
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        draw_prompts = getattr(datamodule, "draw_prompts", None)
        if self.dynamic_sampling.prompts != "fresh" or draw_prompts is None:
            if self.dynamic_sampling.prompts == "fresh" and not getattr(self, "_warned_no_fresh_prompts", False):
                self._warned_no_fresh_prompts = True
                rank_zero_warn(
                    "dynamic_sampling: the DataModule has no draw_prompts, so extra rounds sample the batch's tied "
                    "prompts again (prompts: repeat)"
                )
            return None

        def draw(count: int, round_number: int) -> dict[str, Any]:
            # seeded by (seed, rank, step, round) like the round's sampling, and apart from it (salt 1)
            seed = derive_seed(self.seed, self.global_rank, self.global_step, round_number, 1)
            return draw_prompts(count, torch.Generator().manual_seed(seed))

        return draw

    reads_old_logprobs_off_its_pass = False
    """True for a ratio-based algorithm that, taking one optimizer step per rollout (one epoch,
    one mini-batch), reads pi_old's log-probs off the update's own forward pass: the weights are
    those that sampled, so the ratio is exactly 1."""

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the update needs pi_old's log-probs recomputed by the training forward pass
        (the sampler's may differ in rounding). An algorithm that takes one optimizer step per
        rollout with the weights that sampled can read them off its own forward pass instead
        (:attr:`reads_old_logprobs_off_its_pass`), which saves one forward over the rollout,
        unless it corrects the mismatch, whose ratio pi_old / pi_sampler needs both."""
        if self.mismatch.enabled:
            return True
        return not (self.reads_old_logprobs_off_its_pass and self.update_config.one_step_per_rollout)

    def mismatch_weights(self, rollout: Rollout, micro: Tensor) -> Tensor | None:
        """The stop-gradient weights w_t of the mismatch correction for the rows ``micro``, trimmed
        like :meth:`Rollout.take` (None when the correction is off)."""
        if not self.mismatch.enabled:
            return None
        if rollout.sampling_logprobs is None:
            raise ValueError(f"mismatch.mode {self.mismatch.mode!r} needs the sampler's log-probs, which this rollout lacks")
        return correction_weights(
            rollout.take("old_logprobs", micro), rollout.take("sampling_logprobs", micro),
            rollout.model_inputs(micro)["response_mask"], self.mismatch,
        )

    # -- optimisation ----------------------------------------------------------------------------
    def minibatches(self, rows: Tensor, minibatch_size: int | None, salt: int = 0) -> list[Tensor]:
        """The row indices ``rows`` in shuffled mini-batches (all of them at once for None).

        The order is derived from (seed, rank, step, salt), so a resumed run shuffles the same way.
        """
        if rows.numel() == 0:
            return []
        shuffle = torch.Generator().manual_seed(derive_seed(self.seed, self.global_rank, self.global_step, salt))
        orders = minibatch_indices(rows.numel(), minibatch_size or rows.numel(), shuffle)
        return [rows[order.to(rows.device)] for order in orders]

    def token_logprobs(self, inputs: dict[str, Tensor], **kwargs: Any) -> Any:
        """The policy's log-probs of the response tokens of ``inputs`` (with gradients) at the
        sampling temperature, chunked as the update settings say."""
        return self.policy_logprobs(
            inputs, temperature=self.sampling.logprob_temperature, chunk_size=self.update_config.logprob_chunk_size, **kwargs
        )

    # -- the algorithm ---------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rollout = self.collect_rollout(batch)
        self.last_invalid_rewards = InvalidRewards.of(
            rollout.reward_terms, rollout.valid, rollout.prompts, rollout.responses, rollout.metadata
        )
        self._log_rollout(rollout, "train")
        if self.dynamic_sampling is not None:
            self.log_metrics(self.dynamic_sampling_statistics, prefix="train/dynamic_sampling/")
        self.update(rollout)
        self._log_mismatch(rollout)

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
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # correct, reward sum, valid, responses
        has_accuracy = False
        for batch in loader:
            rollout = self.collect_rollout(self.trainer.strategy.batch_to_device(batch), self.greedy_sampling)
            has_accuracy = rollout.correct is not None
            correct = float(rollout.correct.sum()) if has_accuracy else 0.0
            totals += torch.tensor(
                [correct, float(rollout.rewards[rollout.valid].sum()), float(rollout.valid.sum()), float(len(rollout))],
                dtype=torch.float64, device=self.device,
            )
        totals = self.sum_across_processes(totals).tolist()
        metrics = {"val/accuracy": totals[0] / max(totals[3], 1.0)} if has_accuracy else {}
        metrics["val/reward"] = totals[1] / max(totals[2], 1.0)
        self.initial_metrics = metrics
        for logger in self.loggers:
            logger.log_metrics(metrics, step=0)
        rank_zero_info("initial policy: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))

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
        if rollout.correct is not None:
            self.log(f"{stage}/accuracy", rollout.correct.float().mean(), prog_bar=stage == "val", **log)
        if on_step and rollout.statistics:
            self.log_metrics(rollout.statistics, prefix="")
        if on_step:
            self._log_group_spread(rollout, log)
        self.log(f"{stage}/invalid_rewards", (~rollout.valid).float().sum(), reduce_fx="sum", **{**log, "batch_size": 1})
        self.log(f"{stage}/response_length", rollout.response_lengths.float().mean(), **log)
        if on_step:
            tokens = float(rollout.response_mask.sum()) if rollout.generated_tokens is None else rollout.generated_tokens
            self.log("train/generation_tokens_per_s", tokens / max(rollout.generation_seconds, 1e-9), **log)
            details = rollout.details or [{} for _ in rollout.responses]
            self.last_samples = [
                {"prompt": p, "response": r, "reward": float(w), **extra}
                for p, r, w, extra in zip(rollout.prompts, rollout.responses, rollout.rewards.tolist(), details)
            ]

    def _log_group_spread(self, rollout: Rollout, log: dict[str, Any]) -> None:
        """Over the sampled groups of two or more valid responses, on every process:
        ``train/tied_groups``, the share whose rewards all tie, so that every group-relative
        baseline gives them zero advantage, and ``train/group_reward_std``, the mean reward std
        within a group (the signal a group baseline leaves). Logged for every algorithm, as they
        are the first thing to read when nothing learns."""
        stats = group_statistics(rollout.rewards, rollout.groups, rollout.valid)
        scored = stats.count >= 2
        totals = torch.stack([(stats.tied & scored).sum(), stats.std[scored].sum(), scored.sum()]).double()
        tied, spread, groups = self.sum_across_processes(totals).tolist()
        if groups:
            self.log("train/tied_groups", tied / groups, **log)
            self.log("train/group_reward_std", spread / groups, **log)

    def _log_mismatch(self, rollout: Rollout) -> None:
        """The sampler/trainer mismatch over the valid sampled tokens of every process, whenever
        pi_old's log-probs were recomputed (after the update: PPO's shared trunk computes them
        there): ``mismatch_kl`` (k3 estimate of KL(pi_sampler || pi_old)), ``mismatch_ratio_max``
        (of pi_old / pi_sampler), ``mismatch_abs_max`` (of l_old - l_samp) and, with a correction,
        ``mismatch_corrected`` (the share of tokens truncated or dropped)."""
        # (until recomputed, pi_old's log-probs are the sampler's own tensor: nothing to compare)
        if rollout.sampling_logprobs is None or rollout.old_logprobs is rollout.sampling_logprobs:
            return
        sums, maxima = mismatch_statistics(rollout.old_logprobs, rollout.sampling_logprobs, rollout.trained_mask, self.mismatch)
        count, k3, corrected = self.sum_across_processes(sums).tolist()
        ratio_max, abs_max = self.max_across_processes(maxima).tolist()
        if count == 0:
            return
        metrics = {"mismatch_kl": k3 / count, "mismatch_ratio_max": ratio_max, "mismatch_abs_max": abs_max}
        if self.mismatch.enabled:
            metrics["mismatch_corrected"] = corrected / count
        self.log_metrics(metrics)

    def log_metrics(self, metrics: dict[str, float], prefix: str = "train/") -> None:
        for name, value in metrics.items():
            self.log(prefix + name, value, on_step=True, on_epoch=False)
