"""The elementwise work of one chunk of the linear-head log-prob function, fused on a GPU.

For a chunk of raw head outputs a = W h (rows of [chunk, V], in the weights' dtype), targets y,
the sampling temperature T and z = a / T in at least float32:

    forward:   lse = logsumexp(z),  l = z[y] - lse,  H = lse - sum_v p_v z_v,  top1 = z[y] >= max z
    backward:  dL/da = (g_l (onehot(y) - p) - g_H p (log p + H)) / T,   p = exp(z - lse)

Written as plain tensor code, each line is a pass over [chunk, V] in float32 (the upcast, the
scaling, the maximum, the exponentials, the sums, the gradient's products): on a GPU those passes,
not the head's matrix products, set the time. :func:`chunk_statistics` and :func:`chunk_logit_grad`
are compiled there with ``torch.compile``, which fuses each into one or two kernels that read the
chunk's logits once in their own dtype; elsewhere they run as written, which is also the reference
the compiled kernels are tested against.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def chunk_statistics(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, with_top1: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(l, lse, H or None, top1 or None) of a chunk of raw head outputs ``logits`` [chunk, V]."""
    scaled = _at_least_float32(logits) / temperature
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    target_logits = scaled.gather(-1, targets[:, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = log_normaliser - ((scaled - log_normaliser[:, None]).exp() * scaled).sum(-1)
    top1 = target_logits >= scaled.max(dim=-1).values if with_top1 else None
    return target_logits - log_normaliser, log_normaliser, entropy, top1


def chunk_logit_grad(
    logits: Tensor,
    targets: Tensor,
    log_normaliser: Tensor,
    grad_logprobs: Tensor | None,
    entropy: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """dL/da [chunk, V] in the dtype of ``logits``, given the upstream gradients of l and H."""
    log_probs = _at_least_float32(logits) / temperature - log_normaliser[:, None]
    probs = log_probs.exp()
    grad = torch.zeros_like(log_probs)
    if grad_entropy is not None:
        grad = grad - grad_entropy[:, None] * probs * (log_probs + entropy[:, None])
    if grad_logprobs is not None:
        # onehot(y) as a comparison with the column index rather than a scatter, so that the
        # compiled version stays one elementwise kernel with no float32 buffer in between
        onehot = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]
        grad = grad + grad_logprobs[:, None] * (onehot.to(probs.dtype) - probs)
    return (grad / temperature).to(logits.dtype)


def _at_least_float32(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


@functools.cache
def _compiled(function):
    return torch.compile(function, dynamic=None)


def fused(function, device: torch.device):
    """``function`` compiled into fused kernels on a CUDA device, as written elsewhere."""
    return _compiled(function) if device.type == "cuda" else function
