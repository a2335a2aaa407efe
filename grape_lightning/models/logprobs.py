"""Per-token log-probabilities of response tokens without a float32 [batch, time, vocab] tensor.

The trunk runs once over the whole sequence; the LM head is then applied only to the positions
that predict a response token, a chunk of ``chunk_size`` rows at a time. Under autograd each chunk
is recomputed in the backward pass (activation checkpointing), so the memory held for the
backward is the hidden states, never the logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from grape_lightning.models.head_chunk import chunk_logit_grad, chunk_statistics, fused


@dataclass
class TokenLogprobs:
    """Per-token values aligned with ``input_ids`` ([batch, time]); zero where the mask is off.

    ``logprobs[b, t] = log pi(input_ids[b, t] | input_ids[b, <t])``; ``entropy[b, t]`` is the
    entropy of that next-token distribution; ``top1[b, t]`` is True when the token is the argmax.
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    top1: Tensor | None = None
    hidden: Tensor | None = None  # [batch, time, hidden]: the trunk's last hidden states (``with_hidden``)
    linear_loss: Tensor | None = None  # sum_t w_t logprobs_t for ``linear_loss_weights`` w: the only differentiable output then


def head_logits(
    hidden: Tensor, head: Callable[[Tensor], Tensor], temperature: float = 1.0, softcap: float | None = None
) -> Tensor:
    """The LM head's logits at the sampling temperature, for rows h of hidden states:

        z = c tanh(head(h) / c) / T        (c: the model's final-logit soft cap; none: z = head(h) / T)

    in at least float32 (a bfloat16 head's logits are promoted before the soft cap and softmax).
    ``head`` is any map from hidden states to logits: the module, or its function with other
    weights (``functools.partial(torch.func.functional_call, head, weights)``).
    """
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def log_distribution(
    hidden: Tensor, head: Callable[[Tensor], Tensor], temperature: float = 1.0, softcap: float | None = None
) -> Tensor:
    """log pi(. | s) over the vocabulary, [rows, V]: log_softmax(z) of :func:`head_logits`."""
    return torch.log_softmax(head_logits(hidden, head, temperature, softcap), dim=-1)


def _head_statistics(
    hidden: Tensor, targets: Tensor, head: nn.Module, temperature: float, softcap: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    logits = head_logits(hidden, head, temperature, softcap)
    log_normaliser = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = log_normaliser - (probs * logits).sum(-1)
    top1 = target_logits >= logits.max(dim=-1).values
    return target_logits - log_normaliser, entropy, top1


class LinearHeadLogprobs(torch.autograd.Function):
    """For rows h_i of hidden states, a linear head W and targets y_i, with z_i = W h_i / T
    (:func:`head_logits` of :func:`weight_head`):

        l_i = z_i[y_i] - logsumexp(z_i)          H_i = -sum_v p_iv log p_iv,  p_i = softmax(z_i)

    a chunk of rows at a time, keeping no logits: the forward saves only logsumexp(z_i) (and H_i);
    the backward recomputes each chunk's logits once and writes the gradient with respect to them
    directly,

        dl_i/dz_i = onehot(y_i) - p_i           dH_i/dz_i = -p_i (log p_i + H_i),

    so one matrix product is recomputed per chunk (autograd with activation checkpointing would
    rerun the whole forward of the chunk and then differentiate every elementwise step of it).
    The elementwise work of a chunk (:mod:`grape_lightning.models.head_chunk`) is fused into a few
    kernels on a GPU. Returns (log-probs, entropies or an empty tensor, top-1 flags or an empty
    tensor).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy, with_top1):  # type: ignore[override]
        ctx.set_materialize_grads(False)
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        rows = hidden.shape[0]
        logprobs = hidden.new_empty(rows, dtype=dtype)
        log_normalisers = hidden.new_empty(rows, dtype=dtype)
        entropy = hidden.new_empty(rows if with_entropy else 0, dtype=dtype)
        top1 = torch.empty(rows if with_top1 else 0, dtype=torch.bool, device=hidden.device)
        statistics = fused(chunk_statistics, hidden.device)
        for start in range(0, rows, chunk_size):
            chunk = slice(start, start + chunk_size)
            chunk_logprobs, chunk_normalisers, chunk_entropy, chunk_top1 = statistics(
                hidden[chunk] @ weight.t(), targets[chunk], temperature, with_entropy, with_top1
            )
            logprobs[chunk], log_normalisers[chunk] = chunk_logprobs, chunk_normalisers
            if with_entropy:
                entropy[chunk] = chunk_entropy
            if with_top1:
                top1[chunk] = chunk_top1
        ctx.save_for_backward(hidden, weight, targets, log_normalisers, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(top1)
        return logprobs, entropy, top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_top1):  # type: ignore[override]
        hidden, weight, targets, log_normalisers, entropy = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        if grad_entropy is not None and entropy.numel() == 0:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            if grad_hidden is not None:
                grad_hidden.zero_()
            return grad_hidden, grad_weight, None, None, None, None, None
        logit_grad = fused(chunk_logit_grad, hidden.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            chunk = slice(start, start + ctx.chunk_size)
            grad_logits = logit_grad(
                hidden[chunk] @ weight.t(), targets[chunk], log_normalisers[chunk],
                None if grad_logprobs is None else grad_logprobs[chunk],
                None if grad_entropy is None else entropy[chunk],
                None if grad_entropy is None else grad_entropy[chunk],
                ctx.temperature,
            )
            if grad_hidden is not None:
                grad_hidden[chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[chunk])  # accumulated in the product's epilogue
        return grad_hidden, grad_weight, None, None, None, None, None


class LinearHeadLinearLoss(torch.autograd.Function):
    """A loss linear in the log-probs with weights known before the forward,

        L = sum_i w_i l_i,        dL/dz_i = w_i (onehot(y_i) - p_i)

    (SFT's mean negative log-likelihood: w_i = -1/N on each of its N response tokens), with l_i as
    in :class:`LinearHeadLogprobs`. As the weights are known, each chunk's gradient is written in
    the forward, from the logits it has just computed: no chunk is recomputed in the backward,
    which only scales the stored gradients by dL's upstream gradient. Returns (L, the log-probs,
    entropies or an empty tensor, top-1 flags or an empty tensor); only L is differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, temperature, chunk_size, with_entropy, with_top1):  # type: ignore[override]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        rows = hidden.shape[0]
        logprobs = hidden.new_empty(rows, dtype=dtype)
        entropy = hidden.new_empty(rows if with_entropy else 0, dtype=dtype)
        top1 = torch.empty(rows if with_top1 else 0, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        statistics = fused(chunk_statistics, hidden.device)
        logit_grad = fused(chunk_logit_grad, hidden.device)
        for start in range(0, rows, chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = hidden[chunk] @ weight.t()
            logprobs[chunk], log_normaliser, chunk_entropy, chunk_top1 = statistics(
                logits, targets[chunk], temperature, with_entropy, with_top1
            )
            if with_entropy:
                entropy[chunk] = chunk_entropy
            if with_top1:
                top1[chunk] = chunk_top1
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = logit_grad(logits, targets[chunk], log_normaliser, row_weights[chunk].to(dtype), None, None, temperature)
            if grad_hidden is not None:
                grad_hidden[chunk] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[chunk])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(logprobs, entropy, top1)
        return (row_weights.to(dtype) * logprobs).sum(), logprobs, entropy, top1

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprobs, _grad_entropy, _grad_top1):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def weight_head(weight: Tensor) -> Callable[[Tensor], Tensor]:
    """h -> W h, the bias-free linear head of weight W [V, hidden]."""
    return lambda hidden: hidden @ weight.t()


def _plain_linear_head(head: nn.Module) -> bool:
    """A bias-free linear head holding its whole weight (not an adapter, not a parameter shard)."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear and head.bias is None and weight is not None  # not an FSDP2 unit (a subclass)
        and tuple(weight.shape) == (head.out_features, head.in_features)
        and type(weight.data) is torch.Tensor  # a DTensor shard (FSDP2) is gathered only by the module's own call
        and not hasattr(weight, "ds_id")  # a ZeRO-3 parameter is gathered only by the module's own call
    )


def _called_once_per_pass(model: nn.Module, head: nn.Module) -> bool:
    """Heads whose module must be called once per log-prob pass, over all rows:
    - a DeepSpeed ZeRO-3 head: each call gathers its weight (a collective), which every rank must
      join equally often, whatever its number of response tokens;
    - an FSDP2 head tied to the input embedding (one grouped unit,
      :mod:`grape_lightning.models.sharding`): the group's hooks expect each module of the group
      to run once per forward (torch 2.11 reshards the group on a second head call)."""
    from torch.distributed.fsdp import FSDPModule

    weight = getattr(head, "weight", None)
    if hasattr(weight, "ds_id"):
        return True
    return isinstance(head, FSDPModule) and weight is model.get_input_embeddings().weight


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of each token among the real tokens of its row (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def final_logit_softcap(model: nn.Module) -> float | None:
    config = getattr(model, "config", None)
    return getattr(config, "final_logit_softcapping", None) if config is not None else None


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    with_top1: bool = False,
    with_hidden: bool = False,
    linear_loss_weights: Tensor | None = None,
) -> TokenLogprobs:
    """Log-probs of the tokens where ``response_mask`` is set, computed from a Hugging Face causal LM.

    Args:
        model: a ``PreTrainedModel`` for causal LM (``base_model`` is the trunk and
            ``get_output_embeddings()`` the LM head).
        input_ids: [batch, time] prompt + response tokens.
        response_mask: [batch, time] True on the tokens whose log-prob is wanted (position 0 is
            never scored: nothing predicts it).
        attention_mask: [batch, time] 1 on real tokens; ``None`` with ``position_ids`` that restart
            at 0 marks a packed row of several sequences (attention stays inside each sequence).
        position_ids: [batch, time] positions; by default counted over the attention mask, so a
            left-padded prompt gets the same positions as at generation time. Needed for packed rows.
        temperature: divides the logits, as the sampler did.
        chunk_size: rows of the LM head evaluated at once.
        with_hidden: also return the trunk's hidden states, for a value head on the same trunk.
        linear_loss_weights: [batch, time] weights w of a loss linear in the log-probs,
            L = sum_t w_t logprobs_t (SFT: -response_mask / N), returned as ``linear_loss``; with a
            plain linear head its gradient is computed in the forward (:class:`LinearHeadLinearLoss`),
            and the returned log-probs and entropies carry no gradient.
    """
    if position_ids is None and attention_mask is not None:
        position_ids = positions_from_mask(attention_mask)
    outputs = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    scored = response_mask[:, 1:].bool()
    hidden_rows = hidden[:, :-1][scored]  # [n, hidden]: the state before each scored token
    target_rows = input_ids[:, 1:][scored]  # [n]
    head = model.get_output_embeddings()
    softcap = final_logit_softcap(model)

    if softcap is None and _plain_linear_head(head) and linear_loss_weights is not None:
        weight_rows = linear_loss_weights[:, 1:][scored]
        linear_loss, logprob_rows, entropy_rows, top1_rows = LinearHeadLinearLoss.apply(
            hidden_rows, head.weight, target_rows, weight_rows, temperature, chunk_size, with_entropy, with_top1
        )
        return TokenLogprobs(
            logprobs=_scatter_rows(logprob_rows, scored),
            entropy=_scatter_rows(entropy_rows, scored) if with_entropy else None,
            top1=_scatter_rows(top1_rows, scored) if with_top1 else None,
            hidden=hidden if with_hidden else None,
            linear_loss=linear_loss,
        )

    if softcap is None and _plain_linear_head(head):
        logprob_rows, entropy_rows, top1_rows = LinearHeadLogprobs.apply(
            hidden_rows, head.weight, target_rows, temperature, chunk_size, with_entropy, with_top1
        )
        return _with_linear_loss(TokenLogprobs(
            logprobs=_scatter_rows(logprob_rows, scored),
            entropy=_scatter_rows(entropy_rows, scored) if with_entropy else None,
            top1=_scatter_rows(top1_rows, scored) if with_top1 else None,
            hidden=hidden if with_hidden else None,
        ), linear_loss_weights)

    # any other head (soft-capped logits, an adapter, a sharded weight): checkpointed chunks, or one
    # chunk of all rows (and one call even with none) where the sharding needs it
    pieces = []
    num_rows = hidden_rows.shape[0]
    if _called_once_per_pass(model, head):
        chunk_size = num_rows = max(num_rows, 1)
    for start in range(0, num_rows, chunk_size):
        args = (hidden_rows[start : start + chunk_size], target_rows[start : start + chunk_size], head, temperature, softcap)
        if torch.is_grad_enabled() and hidden_rows.requires_grad:
            pieces.append(checkpoint(_head_statistics, *args, use_reentrant=False))
        else:
            pieces.append(_head_statistics(*args))
    if pieces:
        logprob_rows, entropy_rows, top1_rows = (torch.cat(parts) for parts in zip(*pieces))
    else:
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logprob_rows = entropy_rows = hidden_rows.new_zeros(0, dtype=dtype)
        top1_rows = torch.zeros(0, dtype=torch.bool, device=hidden.device)

    return _with_linear_loss(TokenLogprobs(
        logprobs=_scatter_rows(logprob_rows, scored),
        entropy=_scatter_rows(entropy_rows, scored) if with_entropy else None,
        top1=_scatter_rows(top1_rows, scored) if with_top1 else None,
        hidden=hidden if with_hidden else None,
    ), linear_loss_weights)


def _with_linear_loss(token: TokenLogprobs, weights: Tensor | None) -> TokenLogprobs:
    """Adds L = sum_t w_t logprobs_t through autograd (the paths that keep differentiable log-probs)."""
    if weights is not None:
        token.linear_loss = (weights.to(token.logprobs.dtype) * token.logprobs).sum()
    return token


def _scatter_rows(rows: Tensor, scored: Tensor) -> Tensor:
    """Per-row values back into the [batch, time] layout of ``input_ids`` (zero where not scored)."""
    shifted = rows.new_zeros(scored.shape).masked_scatter(scored, rows)
    return torch.cat([rows.new_zeros(scored.shape[0], 1), shifted], dim=1)
