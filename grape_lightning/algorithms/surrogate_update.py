"""The clipped-surrogate update of GRPO and GRAPE: per-sequence advantages, KL to the reference.

    L = agg_{i,t} [ -w_it min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL_it ]

over the rows the algorithm trains on (:func:`~grape_lightning.losses.grpo.grpo_loss`), optimised
by :func:`~grape_lightning.algorithms.update_loop.run_update`; w_it is the module's sampler/trainer
mismatch correction (:meth:`~grape_lightning.algorithms.on_policy.OnPolicyModule.mismatch_weights`,
1 when off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from grape_lightning.advantages import group_statistics
from grape_lightning.algorithms.policy_update import advantage_statistics, ratio_loss_pass
from grape_lightning.algorithms.update_loop import LossOutput, run_update
from grape_lightning.losses.aggregation import Aggregation, aggregate
from grape_lightning.losses.grpo import grpo_loss
from grape_lightning.losses.kl import KLEstimator, check_loss_estimator, kl_penalty
from grape_lightning.rollout.batch import Rollout

if TYPE_CHECKING:
    from grape_lightning.algorithms.on_policy import OnPolicyModule


@dataclass
class SurrogateConfig:
    """The clipped surrogate with a KL penalty to the reference.

    Args:
        beta: weight of the KL penalty to the reference (0: no reference model).
        eps_low: lower clip range: ratios below 1 - eps_low are clipped.
        eps_high: upper clip range: ratios above 1 + eps_high are clipped (clip-higher when > eps_low).
        aggregation: loss over tokens: ``sequence`` (mean per sequence, then over sequences), ``token``
            or ``constant``.
        kl_estimator: KL term of the loss: ``k3`` (its gradient is that of KL(ref || pi)) or ``k2``
            (that of KL(pi || ref)); ``k1`` is refused, its expected gradient being 0.
        filter_tied_groups: drop groups whose rewards all tie from the loss (they then add neither
            KL nor normaliser weight).
    """

    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: Aggregation = "sequence"
    kl_estimator: KLEstimator = "k3"
    filter_tied_groups: bool = False

    def __post_init__(self) -> None:
        if self.beta != 0:
            check_loss_estimator(self.kl_estimator)


def surrogate_update(
    module: OnPolicyModule, rollout: Rollout, advantages: Tensor, trained: Tensor, config: SurrogateConfig
) -> dict[str, float]:
    """Optimise the clipped surrogate over the rows ``trained`` [N] bool; returns the metrics.

    ``train/kl`` averages the trained rows pi_old sampled: at tokens it did not sample (GRAPE's
    off-policy members) the KL term is in the loss but is no estimate of KL(pi || ref).
    """
    tied = group_statistics(rollout.rewards, rollout.groups, rollout.valid).tied
    if config.filter_tied_groups:
        trained = trained & ~tied[rollout.groups]
    sampled = trained & ~rollout.off_policy if rollout.off_policy is not None else trained
    trained_tokens = rollout.response_mask & trained[:, None]
    sampled_tokens = rollout.response_mask & sampled[:, None]
    constant_length = module.sampling.max_new_tokens
    with_kl = rollout.ref_logprobs is not None

    def normalisers(index: Tensor) -> Tensor:
        return torch.stack([trained[index].sum(), trained_tokens[index].sum(), sampled[index].sum(), sampled_tokens[index].sum()])

    def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
        num_sequences, num_tokens, kl_sequences, kl_tokens = totals.tolist()
        inputs = rollout.model_inputs(micro)
        mask = inputs["response_mask"] & trained[micro, None]
        ref_logprobs = rollout.take("ref_logprobs", micro) if with_kl else None
        weights = module.mismatch_weights(rollout, micro)

        def surrogate(logprobs: Tensor, pi_old: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            return grpo_loss(
                logprobs, pi_old, advantages[micro], mask, ref_logprobs=ref_logprobs, beta=config.beta,
                eps_low=config.eps_low, eps_high=config.eps_high, aggregation=config.aggregation,
                kl_estimator=config.kl_estimator, constant_length=constant_length, num_sequences=num_sequences, num_tokens=num_tokens,
                token_weights=weights,
            )

        token, loss, metrics = ratio_loss_pass(module, rollout, micro, inputs, surrogate, only_through_ratio=config.beta == 0)
        terms = {"policy_loss": metrics.pop("policy_loss")}
        metrics.pop("kl", None)  # over every trained row; the logged KL is over the sampled ones
        if with_kl and kl_sequences > 0:
            terms["kl"] = aggregate(
                kl_penalty(token.logprobs.detach(), ref_logprobs, config.kl_estimator), inputs["response_mask"] & sampled[micro, None],
                config.aggregation, constant_length=constant_length, num_sequences=kl_sequences, num_tokens=kl_tokens,
            )
        tokens = float(mask.sum())
        metrics["entropy"] = (token.entropy.detach() * mask).sum() / max(tokens, 1.0)
        return LossOutput(loss, terms=terms, means=metrics, weight=tokens)

    rows = trained.nonzero().flatten()
    metrics = run_update(module, rows, module.update_config, normalisers, micro_loss)
    return {**metrics, **advantage_statistics(module, rollout, advantages)}
