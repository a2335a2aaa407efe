"""PPO with a value model and GAE, on verifier rewards or a learned reward model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.advantages import AdvantageConfig, compute_advantages, token_rewards
from grape_lightning.algorithms.base import as_dataclass
from grape_lightning.algorithms.on_policy import OnPolicyModule
from grape_lightning.algorithms.optim import OptimizerConfig
from grape_lightning.algorithms.reward_scaling import RewardScale, RewardScaling
from grape_lightning.algorithms.update_loop import LossOutput, UpdateConfig, run_update
from grape_lightning.algorithms.value_function import ValueModelKind, build_value_model, rollout_values, shares_trunk, token_values
from grape_lightning.algorithms.value_function import value_metrics
from grape_lightning.losses.aggregation import Aggregation
from grape_lightning.losses.kl import kl_penalty
from grape_lightning.losses.ppo import adaptive_kl_coef, ppo_loss
from grape_lightning.models.spec import ModelSpec
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.scorer import RewardScorer
from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.sampling import SamplingParams


class PPOModule(OnPolicyModule):
    """Proximal Policy Optimization with a learned value model (Schulman et al., 2017; the RLHF
    form of Ziegler et al., 2019). Per rollout batch, on the response tokens t of each sampled y
    (beta = ``kl_coef``; gamma, lambda, eps and the scaling of ``advantage``):

        r_t      = -beta (l_old_t - l_ref_t) + [t is the last token] r(x, y) / s
        V_old_t  = V(state before y_t) at sampling time  (:mod:`~grape_lightning.algorithms.value_function`)
        A_t, R_t = GAE(gamma, lambda) of r and V_old;  R_t = A_t + V_old_t is the value target
        A_t     <- (A_t - mean A) / (std A + eps)         (``advantage.scaling`` ``whiten``; ``none`` keeps A)
        L        = agg[-min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)]
                   + vf_coef agg[1/2 max((V_t - R_t)^2, (V_clip_t - R_t)^2)] - entropy_coef agg[H_t]

    with V_clip_t = V_old_t + clip(V_t - V_old_t, -value_clip, value_clip); the last response token
    ends the episode (V after it is 0), also when cut at ``max_new_tokens``. Means and stds are
    over the valid tokens of every process; stds are unbiased (n - 1).

    ``reward_scaling`` (:mod:`~grape_lightning.algorithms.reward_scaling`): s = 1, or the std of
    the batch's or of the run's rewards. At unit spread the value loss does not swamp the
    policy's gradient, and ``kl_coef`` and ``value_clip`` mean the same for any reward model.

    Adaptive KL (``kl_target``, Ziegler et al.): after each rollout batch beta <- beta (1 +
    clip(KL / kl_target - 1, -0.2, 0.2) N / kl_horizon), KL the mean over the N valid sequences of
    sum_t (l_old_t - l_ref_t); beta is a buffer, saved in checkpoints.

    Update (:func:`~grape_lightning.algorithms.update_loop.run_update`): ``update.epochs`` passes
    over the valid rows in shuffled mini-batches, one optimizer step each for policy and value
    model together (``max_steps`` = rollout batches x epochs x mini-batches); with ``target_kl``
    it stops after a step whose approximate KL(pi_old || pi_theta) (token mean) exceeds it.

    Args:
        policy: the model to train.
        rewards: reward functions, combined as sum_k w_k r_k.
        accuracy: name of the reward function whose value 1 marks a correct response (None: no accuracy).
        sampling: sampling parameters of the training rollouts.
        optimizer: AdamW and learning-rate schedule (of policy and value model together).
        value_model: ``head`` (a scalar head on the policy's trunk) or ``separate`` (its own trunk).
        value_init: initial weights of a ``separate`` value model (a reward model, say; None: the policy's).
        advantage: baseline ``value`` (GAE, its gamma and lambda); scaling ``whiten`` (default, eps 1e-8) or ``none``.
        reward_scaling: divide rewards by their std: ``none``, ``batch`` or ``running``.
        kl_coef: beta, the initial coefficient of the per-token KL penalty in the reward.
        kl_target: adapt beta towards this KL per sequence (None: fixed beta).
        kl_horizon: horizon of the adaptive KL controller (sequences).
        eps_low: lower clip range of the policy ratio.
        eps_high: upper clip range of the policy ratio.
        value_clip: clip range of the value around its old prediction (None: no value clipping).
        vf_coef: weight of the value loss.
        entropy_coef: weight of the entropy bonus.
        aggregation: loss over tokens: ``token``, ``sequence`` or ``constant``.
        target_kl: stop a rollout batch's update once the approximate KL exceeds this (None: never).
        update: epochs (default 4), mini- and micro-batches, clipping.
        seed: seeds sampling (per rank and step, so a resumed run samples the same).
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
        kl_coef: float = 0.05, kl_target: float | None = None, kl_horizon: float = 10000.0,
        eps_low: float = 0.2, eps_high: float = 0.2, value_clip: float | None = 0.2,
        vf_coef: float = 0.5, entropy_coef: float = 0.0, aggregation: Aggregation = "token",
        target_kl: float | None = None,
        update: UpdateConfig | None = None,
        seed: int = 0,
    ) -> None:
        update = as_dataclass(update, UpdateConfig) or UpdateConfig(epochs=4)
        scorer = RewardScorer(list(rewards), accuracy) if rewards else None
        super().__init__(policy, scorer, sampling, optimizer, update, reference=kl_coef > 0 or kl_target is not None, seed=seed)
        self.advantage = as_dataclass(advantage, AdvantageConfig) or AdvantageConfig(baseline="value", scaling="whiten", eps=1e-8)
        if self.advantage.baseline != "value":
            raise ValueError("PPO's advantages are GAE over its value model: advantage.baseline must be 'value'")
        init = as_dataclass(value_init, ModelSpec)
        self.value_model = build_value_model(self.policy, self.tokenizer, value_model, init, update.gradient_checkpointing)
        self.reward_scale = RewardScale(reward_scaling)
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))
        self.kl_target, self.kl_horizon, self.target_kl = kl_target, kl_horizon, target_kl
        self.eps_low, self.eps_high, self.value_clip = eps_low, eps_high, value_clip
        self.vf_coef, self.entropy_coef, self.aggregation = vf_coef, entropy_coef, aggregation

    @property
    def needs_old_logprobs(self) -> bool:  # with a shared trunk, pi_old's come from the pass that computes V_old
        return not shares_trunk(self.value_model, self.policy)

    def update(self, rollout: Rollout) -> None:
        trained = rollout.trained_mask
        old_values = rollout_values(self, rollout)  # first: with a shared trunk it also sets pi_old's log-probs
        token_kl = torch.zeros_like(rollout.old_logprobs)
        if rollout.ref_logprobs is not None:
            token_kl = torch.where(trained, kl_penalty(rollout.old_logprobs, rollout.ref_logprobs, "k1"), 0.0)
        reward_scale = self.reward_scale(rollout.rewards, rollout.valid, self.sum_across_processes)
        rewards = token_rewards(rollout.rewards / reward_scale, token_kl, trained, self.kl_coef)
        estimate = compute_advantages(
            self.advantage, rewards, rollout.groups, rollout.valid, sum_across=self.sum_across_processes, values=old_values, token_mask=trained,
        )
        metrics = self.optimise(rollout, estimate.advantages, old_values, estimate.returns)

        kl_sum, num_valid = self.sum_across_processes(torch.stack([token_kl.sum().double(), rollout.valid.sum().double()])).tolist()
        sequence_kl = kl_sum / max(num_valid, 1.0)
        metrics.update(kl=sequence_kl, kl_coef=float(self.kl_coef), reward_scale=reward_scale)
        if self.kl_target is not None and rollout.ref_logprobs is not None:
            self.kl_coef.fill_(adaptive_kl_coef(float(self.kl_coef), sequence_kl, self.kl_target, num_valid, self.kl_horizon))
        self.log_metrics({**metrics, **value_metrics(old_values, estimate.returns, trained, self.sum_across_processes)})

    def optimise(self, rollout: Rollout, advantages: Tensor, old_values: Tensor, returns: Tensor) -> dict[str, float]:
        """The clipped policy and value losses over the valid rows, normalised by the global counts
        of sequences and tokens; with ``target_kl``, stop once a step's approximate KL exceeds it."""
        trained = rollout.trained_mask

        def normalisers(index: Tensor) -> Tensor:
            return torch.stack([rollout.valid[index].sum(), trained[index].sum()])

        def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
            num_sequences, num_tokens = totals.tolist()
            inputs = rollout.model_inputs(micro)
            width = inputs["input_ids"].shape[1]
            token = self.token_logprobs(inputs, with_entropy=True, with_hidden=shares_trunk(self.value_model, self.policy))
            mask = trained[micro, :width]
            loss, metrics = ppo_loss(
                token.logprobs, rollout.take("old_logprobs", micro), advantages[micro, :width],
                token_values(self.value_model, inputs, token.hidden), old_values[micro, :width], returns[micro, :width], mask,
                entropy=token.entropy, eps_low=self.eps_low, eps_high=self.eps_high, value_clip=self.value_clip,
                vf_coef=self.vf_coef, entropy_coef=self.entropy_coef, aggregation=self.aggregation,
                constant_length=self.sampling.max_new_tokens, num_sequences=num_sequences, num_tokens=num_tokens,
            )
            tokens = float(mask.sum())
            terms = {"policy_loss": metrics.pop("policy_loss"), "value_loss": metrics.pop("value_loss"),
                     "approx_kl_step": float(metrics["approx_kl"]) * tokens / max(num_tokens, 1.0)}
            return LossOutput(loss, terms=terms, means=metrics, weight=tokens)

        stop = None if self.target_kl is None else (lambda terms: terms["approx_kl_step"] > self.target_kl)
        metrics = run_update(self, rollout.valid.nonzero().flatten(), self.update_config, normalisers, micro_loss, stop)
        metrics.pop("approx_kl_step")
        return metrics
