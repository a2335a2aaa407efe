"""PPO with a value model and GAE, on verifier rewards or a learned reward model."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from grape_lightning.advantages import (
    AdvantageConfig,
    compute_advantages,
    explained_variance,
    masked_mean_std,
    masked_moments,
    merge_moments,
    moments_std,
    token_rewards,
)
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.losses.aggregation import Aggregation
from grape_lightning.losses.kl import kl_penalty
from grape_lightning.losses.ppo import adaptive_kl_coef, ppo_loss
from grape_lightning.models.loading import load_sequence_scorer, load_tokenizer
from grape_lightning.models.spec import ModelSpec
from grape_lightning.models.value import ValueModel
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams

ValueModelKind = Literal["head", "separate"]
RewardScaling = Literal["none", "batch", "running"]


class PPOModule(OnPolicyModule):
    """Proximal Policy Optimization with a learned value model (Schulman et al., 2017; the RLHF
    form of Ziegler et al., 2019).

    Per rollout batch, on the response tokens t of each sampled y (``gamma``, ``lam``, beta =
    ``kl_coef``):

        r_t     = -beta (l_old_t - l_ref_t) + [t is the last token] r(x, y) / s
        V_old_t = V(state before y_t), with the value model as it was at sampling time
        A_t, R_t = GAE(gamma, lambda) of r and V_old;  R_t = A_t + V_old_t is the value target
        A_t     <- (A_t - mean A) / std A               (``whiten_advantages``; over every process;
                                                         population std, see :func:`~grape_lightning.advantages.whiten`)
        L       = agg[-min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)]
                  + vf_coef agg[1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2)] - entropy_coef agg[H_t]

    with V_clip_t = V_old_t + clip(V_t - V_old_t, -value_clip, value_clip) (see
    :func:`~grape_lightning.losses.ppo.ppo_loss`). The last response token ends the episode
    (the value after it is 0), also when the response was cut at ``max_new_tokens``.

    ``reward_scaling``: s = 1 (``"none"``), the population standard deviation of the batch's
    sequence rewards over every process (``"batch"``), or that of every reward seen since the start of
    the run, this batch's included (``"running"``: the statistics are buffers, saved in
    checkpoints; a reward keeps the same scale from one batch to the next, unlike ``"batch"``).
    The rewards are divided, not shifted: their offset is the value model's to learn. A learned
    reward model's scores can spread over tens of units; scaled to unit spread, the value
    targets stay of order 1, so the value loss does not swamp the policy's gradient in the
    shared trunk and in the clipped global norm, and ``kl_coef`` and ``value_clip`` mean the
    same for any reward model.

    Values are aligned like log-probs: ``logprobs[b, t]`` is log pi(y_t | .) computed from the
    hidden state at position t - 1, and V_t, the value of the state in which y_t is chosen, is
    the value model's output at that same position t - 1. The first response token's value is
    thus read at the last prompt token.

    Value model (``value_model``):

    - ``"head"``: a scalar head on the policy's own trunk (one network, shared features);
    - ``"separate"``: its own trunk, a copy of the initial policy, or, with ``value_init``, a
      sequence-classification model such as a reward model (trunk and scalar head: V starts as
      the reward model's score). ``value_init`` must use the policy's tokenizer.

    Its weights are part of the module's ``state_dict``, so checkpoints save them and a resumed
    run continues with them. Policy and value model share one optimizer, gradient clipping
    (``max_grad_norm`` over both) and learning-rate schedule; ``vf_coef`` weighs the value loss.

    KL coefficient: fixed, or adaptive with ``kl_target`` (Ziegler et al.): after each rollout
    batch beta <- beta (1 + clip(KL / kl_target - 1, -0.2, 0.2) N / kl_horizon), KL the mean over
    the N sequences of sum_t (l_old_t - l_ref_t). beta is a buffer, saved in checkpoints.

    Optimisation: ``epochs`` passes over the rollout batch, each in shuffled mini-batches of
    ``mini_batch_size`` sequences (all at once for None), one optimizer step per mini-batch
    (gradients accumulated over micro-batches of ``micro_batch_size``). ``max_steps`` counts
    optimizer steps, so it is rollout batches x epochs x mini-batches per epoch. With
    ``target_kl`` the update of a rollout batch stops early (the rest of the epoch and the later
    epochs are skipped) once a mini-batch's approximate KL(pi_old || pi_theta), measured in its
    forward pass and averaged over every process, exceeds ``target_kl``; such a batch then takes
    fewer steps.

    Sequences whose reward could not be computed are masked out of the advantages, the whitening
    statistics and the loss. Mini-batches are cut from all rows (invalid ones included), so every
    process takes the same number of optimizer steps under DDP; the loss is the global batch's
    (normalised by token and sequence counts summed over the processes).

    Args:
        value_model: ``head`` (a scalar head on the policy's trunk) or ``separate`` (its own trunk).
        value_init: initial weights of a ``separate`` value model (a reward model, say; None: the
            policy's).
        reward_scaling: divide rewards by their std: ``none``, ``batch`` or ``running``.
        kl_coef: beta, the initial coefficient of the per-token KL penalty in the reward.
        kl_target: adapt beta towards this KL per sequence (None: fixed beta).
        kl_horizon: horizon of the adaptive KL controller (sequences).
        gamma: discount factor.
        lam: GAE lambda.
        eps_low: lower clip range of the policy ratio.
        eps_high: upper clip range of the policy ratio.
        value_clip: clip range of the value around its old prediction (None: no value clipping).
        vf_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        whiten_advantages: normalise advantages to zero mean and unit std over the batch.
        aggregation: loss over tokens: ``token``, ``sequence`` or ``constant``.
        epochs: passes over each rollout batch.
        mini_batch_size: sequences per optimizer step (None: the whole rollout batch).
        target_kl: stop a rollout batch's update once the approximate KL exceeds this (None: never).
    """

    def __init__(
        self,
        policy: ModelSpec,
        rewards: Sequence[RewardFunction] | None = None,
        accuracy: str | None = None,
        sampling: SamplingParams | None = None,
        optimizer: OptimizerConfig | None = None,
        value_model: ValueModelKind = "head",
        value_init: ModelSpec | None = None,
        advantage: AdvantageConfig | None = None,
        reward_scaling: RewardScaling = "none",
        kl_coef: float = 0.05,
        kl_target: float | None = None,
        kl_horizon: float = 10000.0,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        value_clip: float | None = 0.2,
        vf_coef: float = 0.5,
        entropy_coef: float = 0.0,
        aggregation: Aggregation = "token",
        target_kl: float | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        update = as_dataclass(update, UpdateConfig) or UpdateConfig(epochs=4)
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, optimizer, update, reference=kl_coef > 0 or kl_target is not None, seed=seed)
        self.value_model = self._build_value_model(value_model, as_dataclass(value_init, ModelSpec), update.gradient_checkpointing)
        if reward_scaling not in ("none", "batch", "running"):
            raise ValueError(f"reward_scaling must be 'none', 'batch' or 'running', got {reward_scaling!r}")
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="value", scaling="whiten", eps=1e-8)
        if self.advantage.baseline != "value":
            raise ValueError("PPO's advantages are GAE over its value model: advantage.baseline must be 'value'")
        self.reward_scaling = reward_scaling
        self.register_buffer("reward_moments", torch.zeros(3, dtype=torch.float64))  # count, mean, M2 of the rewards seen
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))
        self.kl_target = kl_target
        self.kl_horizon = kl_horizon
        self.eps_low = eps_low
        self.eps_high = eps_high
        self.value_clip = value_clip
        self.vf_coef = vf_coef
        self.entropy_coef = entropy_coef
        self.aggregation = aggregation
        self.target_kl = target_kl

    def _build_value_model(self, kind: ValueModelKind, init: ModelSpec | None, gradient_checkpointing: bool) -> ValueModel:
        hidden_size = self.policy.config.get_text_config().hidden_size
        if kind == "head":
            if init is not None:
                raise ValueError("value_init needs value_model: separate (a head shares the policy's trunk)")
            return ValueModel(self.policy.base_model, hidden_size)
        if kind != "separate":
            raise ValueError(f"value_model must be 'head' or 'separate', got {kind!r}")
        if init is None:
            return ValueModel(copy.deepcopy(self.policy).base_model, hidden_size)
        if load_tokenizer(init).get_vocab() != self.tokenizer.get_vocab():
            raise ValueError(f"value_init {init.name_or_path or 'config'!r} has another tokenizer than the policy")
        scorer = load_sequence_scorer(init, self.tokenizer)
        if gradient_checkpointing:
            scorer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return ValueModel.from_sequence_scorer(scorer).train()

    # -- values ----------------------------------------------------------------------------------
    @property
    def shares_trunk(self) -> bool:
        """A value head on the policy's own trunk: one trunk pass gives log-probs and values."""
        return self.value_model.trunk is self.policy.base_model

    @property
    def needs_old_logprobs(self) -> bool:
        # with a shared trunk, pi_old's log-probs come from the pass that computes V_old
        return not self.shares_trunk

    def token_values(self, inputs: dict[str, Tensor], hidden: Tensor | None = None) -> Tensor:
        """V[b, t] for the response tokens t of ``inputs``: the value model's output at position
        t - 1, whose hidden state chooses token t (the alignment of the log-probs); 0 elsewhere.
        ``hidden``: the policy trunk's hidden states of ``inputs`` when the value head shares it."""
        if hidden is not None:
            values = self.value_model.values_from_hidden(hidden)
        else:
            values = self.value_model(inputs["input_ids"], inputs["attention_mask"])
        before_token = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
        return torch.where(inputs["response_mask"], before_token, 0.0)

    @torch.no_grad()
    def rollout_values(self, rollout: Rollout) -> Tensor:
        """V_old: the values of the sampled states before any update, in eval mode (deterministic).
        With a shared trunk the same pass sets ``rollout.old_logprobs`` (pi_old's log-probs)."""
        was_training = self.value_model.training
        self.value_model.eval()
        dtype = torch.promote_types(rollout.old_logprobs.dtype, torch.float32)
        old_values = torch.zeros_like(rollout.old_logprobs, dtype=dtype)
        old_logprobs = torch.zeros_like(old_values) if self.shares_trunk else None
        for index in torch.arange(len(rollout), device=self.device).split(self.update_config.micro_batch_size):
            inputs = rollout.model_inputs(index)
            width = inputs["input_ids"].shape[1]
            if old_logprobs is None:
                old_values[index, :width] = self.token_values(inputs)
                continue
            token = self.token_logprobs(inputs, with_hidden=True)
            old_logprobs[index, :width] = token.logprobs
            old_values[index, :width] = self.token_values(inputs, token.hidden)
        if old_logprobs is not None:
            rollout.old_logprobs = old_logprobs
        self.value_model.train(was_training)
        return old_values

    # -- across processes ------------------------------------------------------------------------
    def _global_mean(self, total: float, count: float) -> tuple[float, float]:
        """(sum over processes of ``total``) / (sum of ``count``), and that summed count."""
        total, count = self.sum_across_processes(torch.tensor([total, count], dtype=torch.float64, device=self.device)).tolist()
        return total / max(count, 1.0), count

    def reward_scale(self, rollout: Rollout) -> float:
        """s of ``reward_scaling`` for this batch (``"running"`` first adds the batch to its statistics)."""
        if self.reward_scaling == "none":
            return 1.0
        batch_moments = masked_moments(rollout.rewards, rollout.valid, self.sum_across_processes)
        if self.reward_scaling == "batch":
            return moments_std(batch_moments)
        self.reward_moments.copy_(merge_moments(self.reward_moments, batch_moments))
        return moments_std(self.reward_moments)

    # -- the update ------------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> None:
        trained = rollout.trained_mask
        old_values = self.rollout_values(rollout)
        if rollout.ref_logprobs is not None:
            token_kl = torch.where(trained, kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, "k1"), 0.0)
        else:
            token_kl = torch.zeros_like(rollout.old_logprobs)
        reward_scale = self.reward_scale(rollout)
        rewards = token_rewards(rollout.rewards / reward_scale, token_kl, trained, self.kl_coef)
        estimate = compute_advantages(
            self.advantage, rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes, values=old_values, token_mask=trained,
        )
        returns = estimate.returns
        raw_advantages = returns - old_values

        metrics = self.optimise(rollout, estimate.advantages, old_values, returns)

        sequence_kl, num_valid = self._global_mean(float(token_kl.sum()), float(rollout.valid.sum()))
        metrics.update(kl=sequence_kl, kl_coef=float(self.kl_coef), reward_scale=reward_scale)
        if self.kl_target is not None and rollout.ref_logprobs is not None:
            self.kl_coef.fill_(adaptive_kl_coef(float(self.kl_coef), sequence_kl, self.kl_target, num_valid, self.kl_horizon))
        metrics["explained_variance"] = explained_variance(old_values, returns, trained, self.sum_across_processes)
        for name, values in (("advantage", raw_advantages), ("return", returns), ("value", old_values)):
            metrics[f"{name}_mean"], metrics[f"{name}_std"] = masked_mean_std(values, trained, self.sum_across_processes)
        self.log_metrics(metrics)

    def optimise(self, rollout: Rollout, advantages: Tensor, old_values: Tensor, returns: Tensor) -> dict[str, float]:
        """The clipped policy and value losses over the valid rows (:func:`run_update`); with
        ``target_kl`` the update stops once a step's approximate KL(pi_old || pi_theta), a token
        mean over every process, exceeds it."""
        trained = rollout.trained_mask

        def normalisers(index: Tensor) -> Tensor:
            return torch.stack([rollout.valid[index].sum(), trained[index].sum()])

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            num_sequences, num_tokens = totals.tolist()
            inputs = rollout.model_inputs(micro)
            width = inputs["input_ids"].shape[1]
            token = self.token_logprobs(inputs, with_entropy=True, with_hidden=self.shares_trunk)
            mask = trained[micro, :width]
            loss, metrics = ppo_loss(
                token.logprobs, rollout.take("old_logprobs", micro), advantages[micro, :width],
                self.token_values(inputs, token.hidden), old_values[micro, :width], returns[micro, :width], mask,
                entropy=token.entropy, eps_low=self.eps_low, eps_high=self.eps_high,
                value_clip=self.value_clip, vf_coef=self.vf_coef, entropy_coef=self.entropy_coef,
                aggregation=self.aggregation, constant_length=self.sampling.max_new_tokens,
                num_sequences=num_sequences, num_tokens=num_tokens,
            )
            tokens = float(mask.sum())
            terms = {
                "policy_loss": metrics.pop("policy_loss"), "value_loss": metrics.pop("value_loss"),
                "approx_kl_step": float(metrics["approx_kl"]) * tokens / max(num_tokens, 1.0),
            }
            return LossOutput(loss, terms=terms, means=metrics, weight=tokens)

        stop = None if self.target_kl is None else (lambda terms: terms["approx_kl_step"] > self.target_kl)
        metrics = run_update(self, rollout.valid.nonzero().flatten(), self.update_config, normalisers, micro_loss, stop)
        metrics.pop("approx_kl_step")
        return metrics
