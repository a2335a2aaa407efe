"""A rollout's response tokens as rows, the layout in which TRPO evaluates the LM head.

Row k of a micro-batch is its k-th response token in row-major order of ``response_mask[:, 1:]``:
the trunk's last hidden state before the token, the token, its log-prob under pi_old and its
advantage. TRPO's quantities (surrogate, KL, Fisher-vector products) are sums over rows, taken a
chunk of rows at a time so that no [tokens, vocab] block is held for the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from grape_lightning.models.logprobs import final_logit_softcap, log_distribution, positions_from_mask
from grape_lightning.rollout.batch import Rollout


@dataclass
class ResponseRows:
    """One micro-batch of the update with its response tokens as rows."""

    inputs: dict[str, Tensor]
    old_logprobs: Tensor  # [n] l_t_old
    advantages: Tensor  # [n] A_t
    old_hidden: Tensor | None = None  # [n, hidden] the trunk's states at theta_old (set by the gradient pass)

    def __len__(self) -> int:
        return self.old_logprobs.shape[0]


def response_rows(rollout: Rollout, rows: Tensor, advantages: Tensor, micro_batch_size: int) -> list[ResponseRows]:
    """The sequences ``rows`` of ``rollout`` in micro-batches, response tokens as rows; advantages
    per sequence [N] (broadcast over its tokens) or per token [N, T] (aligned with ``response_mask``)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(rollout.response_mask)
    batches = []
    for index in rows.split(micro_batch_size):
        inputs = rollout.model_inputs(index)
        scored = inputs["response_mask"][:, 1:].bool()
        width = scored.shape[1] + 1
        batches.append(ResponseRows(
            inputs=inputs,
            old_logprobs=rollout.old_logprobs[index, 1:width][scored],
            advantages=advantages[index, 1:width][scored],
        ))
    return batches


def hidden_rows(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(h, y): the trunk's last hidden state before each response token [n, hidden] and the token [n]."""
    attention_mask = inputs["attention_mask"]
    outputs = model.base_model(
        input_ids=inputs["input_ids"], attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask), use_cache=False,
    )
    scored = inputs["response_mask"][:, 1:].bool()
    return outputs.last_hidden_state[:, :-1][scored], inputs["input_ids"][:, 1:][scored]


def row_log_distribution(
    model: nn.Module, hidden: Tensor, temperature: float, head_weights: dict[str, Tensor] | None = None
) -> Tensor:
    """log pi(. | s) [n, V] at rows of hidden states (:func:`log_distribution` with the model's LM
    head and soft cap); ``head_weights`` replaces head parameters by name (pi_old's head)."""
    head = model.get_output_embeddings()
    head = head if head_weights is None else partial(functional_call, head, head_weights)
    return log_distribution(hidden, head, temperature, final_logit_softcap(model))


def head_weights(model: nn.Module, parameters: Sequence[Tensor], values: Sequence[Tensor]) -> dict[str, Tensor]:
    """The LM head's parameters among ``parameters``, by name, with ``values`` in their place (a
    snapshot at theta_old); the head's other parameters are not in it (they do not move)."""
    value_of = {id(parameter): value for parameter, value in zip(parameters, values)}
    named = model.get_output_embeddings().named_parameters()
    return {name: value_of[id(parameter)] for name, parameter in named if id(parameter) in value_of}


def chunked_sum(term: Callable[..., Tensor], *rows: Tensor, chunk_size: int) -> Tensor:
    """sum over chunks of ``chunk_size`` rows of ``term(*chunk)``, in float64. Under autograd each
    chunk is recomputed in the backward, so no [chunk, V] block is held for it."""
    total = torch.zeros((), dtype=torch.float64, device=rows[0].device)
    for chunk in zip(*(row.split(chunk_size) for row in rows)):
        if torch.is_grad_enabled():
            total = total + checkpoint(term, *chunk, use_reentrant=False)
        else:
            total = total + term(*chunk)
    return total
