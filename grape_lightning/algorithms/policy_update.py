"""The update of a policy loss over the valid rows of a rollout (GSPO, CISPO), and the pieces it
shares with :mod:`~grape_lightning.algorithms.surrogate_update`.

    L = loss(l, l_old, A, mask; B, N; w)

with l the policy's log-probs of the response tokens, l_old pi_old's, A the per-sequence
advantages, B and N the sequences and response tokens of the global mini-batch (the
normalisers, counted over every process) and w the per-token weights of the sampler/trainer
mismatch correction (None when off:
:meth:`~grape_lightning.algorithms.on_policy.OnPolicyModule.mismatch_weights`), optimised by
:func:`~grape_lightning.algorithms.update_loop.run_update`. No reference model, no KL term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from grape_lightning.algorithms.update_loop import LossOutput, run_update
from grape_lightning.models.logprobs import TokenLogprobs
from grape_lightning.rollout.batch import Rollout

if TYPE_CHECKING:
    from grape_lightning.algorithms.on_policy import OnPolicyModule

# (l, l_old, A [rows], response mask, B, N, w or None) -> (the micro-batch's share of the loss, metrics with "policy_loss")
PolicyLoss = Callable[[Tensor, Tensor, Tensor, Tensor, float, float, "Tensor | None"], tuple[Tensor, dict[str, Tensor]]]


def old_logprobs(module: OnPolicyModule, rollout: Rollout, micro: Tensor, logprobs: Tensor) -> Tensor:
    """pi_old's log-probs of the rows ``micro``: the collected ones, or, when the module takes one
    step per rollout with the weights that sampled (``needs_old_logprobs`` off), the detached
    log-probs of the update's own forward pass (the ratio is then exactly 1)."""
    return rollout.take("old_logprobs", micro) if module.needs_old_logprobs else logprobs.detach()


def linear_loss_pass(
    module: OnPolicyModule, inputs: dict[str, Tensor], linear_loss: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]
) -> tuple[TokenLogprobs, Tensor, dict[str, Tensor]]:
    """The policy's pass over ``inputs`` and a loss ``linear_loss(l)`` whose gradient

        w_t = dL/dl_t

    does not depend on the value of l (a loss linear in the log-probs): (the pass's log-probs and
    entropies, the loss to differentiate, the loss's metrics). The weights are read off the loss at
    l = 0 before the pass, so the LM head writes each chunk's gradient in the forward
    (:class:`~grape_lightning.models.logprobs.LinearHeadLinearLoss`) rather than recomputing the
    chunk in the backward. The loss returned has the value of L at the pass's log-probs and the
    gradient of sum_t w_t l_t.
    """
    with torch.enable_grad():
        at_zero = torch.zeros(inputs["response_mask"].shape, dtype=torch.float64, device=inputs["input_ids"].device,
                              requires_grad=True)
        (weights,) = torch.autograd.grad(linear_loss(at_zero)[0], at_zero)
    token = module.token_logprobs(inputs, with_entropy=True, linear_loss_weights=weights)
    loss, metrics = linear_loss(token.logprobs.detach())
    return token, token.linear_loss + (loss - token.linear_loss).detach(), metrics


def ratio_loss_pass(
    module: OnPolicyModule,
    rollout: Rollout,
    micro: Tensor,
    inputs: dict[str, Tensor],
    ratio_loss: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
    only_through_ratio: bool = True,
) -> tuple[TokenLogprobs, Tensor, dict[str, Tensor]]:
    """The policy's pass over the rows ``micro`` and the loss ``ratio_loss(l, l_old)`` on it:
    (the pass's log-probs and entropies, the loss to differentiate, the loss's metrics).

    When pi_old is read off this pass (``needs_old_logprobs`` off: l_old = sg[l], every ratio is
    exactly 1) and the loss depends on l only through l - l_old and terms linear in l
    (``only_through_ratio``: no KL to a reference), its gradient at ratio 1 does not depend on the
    value of l, and the pass is :func:`linear_loss_pass`'s.
    """
    if module.needs_old_logprobs or not only_through_ratio:
        token = module.token_logprobs(inputs, with_entropy=True)
        loss, metrics = ratio_loss(token.logprobs, old_logprobs(module, rollout, micro, token.logprobs))
        return token, loss, metrics
    return linear_loss_pass(module, inputs, lambda logprobs: ratio_loss(logprobs, logprobs.detach()))


def advantage_statistics(module: OnPolicyModule, rollout: Rollout, advantages: Tensor) -> dict[str, float]:
    """``advantage_abs_mean`` over the valid rows of every process (the share of tied groups is
    logged with the rollout, for every algorithm)."""
    totals = torch.stack([advantages[rollout.valid].abs().sum(), rollout.valid.sum()])
    advantage_abs, valid_count = module.sum_across_processes(totals.double()).tolist()
    return {"advantage_abs_mean": advantage_abs / max(valid_count, 1.0)}


def policy_update(module: OnPolicyModule, rollout: Rollout, advantages: Tensor, loss: PolicyLoss) -> dict[str, float]:
    """Optimise ``loss`` over the valid rows of ``rollout``; returns the metrics (the loss's own,
    token-weighted, with ``entropy``; ``policy_loss`` summed to the step's value)."""
    valid = rollout.valid
    valid_tokens = rollout.response_mask & valid[:, None]

    def normalisers(index: Tensor) -> Tensor:
        return torch.stack([valid[index].sum(), valid_tokens[index].sum()])

    def micro_loss(micro: Tensor, totals: Tensor) -> LossOutput:
        num_sequences, num_tokens = totals.tolist()
        inputs = rollout.model_inputs(micro)
        mask = inputs["response_mask"] & valid[micro, None]
        weights = module.mismatch_weights(rollout, micro)
        token, value, metrics = ratio_loss_pass(
            module, rollout, micro, inputs,
            lambda logprobs, pi_old: loss(logprobs, pi_old, advantages[micro], mask, num_sequences, num_tokens, weights),
        )
        tokens = float(mask.sum())
        metrics["entropy"] = (token.entropy.detach() * mask).sum() / max(tokens, 1.0)
        return LossOutput(value, terms={"policy_loss": metrics.pop("policy_loss")}, means=metrics, weight=tokens)

    metrics = run_update(module, valid.nonzero().flatten(), module.update_config, normalisers, micro_loss)
    return {**metrics, **advantage_statistics(module, rollout, advantages)}
