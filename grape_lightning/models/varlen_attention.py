"""Variable-length attention for padding-free rows: each sequence of a packed row attends only to
itself, with no work spent on the other sequences of the row.

A packed row holds sequences s_1 .. s_n back to back, and ``position_ids`` restart with each one
(a new sequence starts wherever p_t != p_{t-1} + 1, and at the start of every row). With
cumulative lengths c_0 = 0, c_i = c_{i-1} + |s_i|, token t of sequence i attends to the tokens
c_{i-1} .. t only:

    o_t = sum_{u = c_{i-1}}^{t} softmax_u(q_t . k_u * scale) v_u

Registered with transformers as ``attn_implementation="sdpa_varlen"``. On CUDA in bfloat16 or
float16 it runs ``torch.nn.attention.varlen.varlen_attn`` (flash attention over the cumulative
lengths: work sum_i |s_i|^2 / 2, where a block-diagonal mask over the whole row costs
(sum_i |s_i|)^2 / 2); elsewhere (CPU, float32/float64) one causal SDPA per sequence, the same
numbers. Every other call (a padded batch with its attention mask, decoding with a cache, a
row holding a single sequence) is transformers' own ``sdpa``, unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

VARLEN_ATTENTION = "sdpa_varlen"


def sequence_boundaries(position_ids: Tensor) -> tuple[Tensor, int]:
    """(cumulative lengths [n + 1] as int32, longest length) of the sequences of the rows of
    ``position_ids`` [batch, time], read in row-major order: a sequence starts at the start of
    each row and wherever the position does not follow the previous one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    start_index = starts.flatten().nonzero().flatten()
    cumulative = torch.cat([start_index, start_index.new_tensor([position_ids.numel()])]).to(torch.int32)
    return cumulative, int((cumulative[1:] - cumulative[:-1]).max())


class _Boundaries:
    """The boundaries of the last ``position_ids`` seen: every layer of a forward gets the same
    tensor, so the device-to-host read of the longest length happens once per forward."""

    position_ids: Tensor | None = None
    value: tuple[Tensor, int] | None = None

    @classmethod
    def of(cls, position_ids: Tensor, batch: int) -> tuple[Tensor, int]:
        if position_ids is not cls.position_ids:
            # positions of a single row are sometimes shared by the whole batch
            cls.position_ids, cls.value = position_ids, sequence_boundaries(position_ids.expand(batch, -1))
        return cls.value  # type: ignore[return-value]


def _flash_varlen_available(query: Tensor) -> bool:
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(
    query: Tensor, key: Tensor, value: Tensor, cumulative: Tensor, longest: int, scale: float | None, dropout: float = 0.0
) -> Tensor:
    """Causal attention within each sequence of ``cumulative`` lengths. query [tokens, heads, dim],
    key/value [tokens, kv_heads, dim] (grouped-query heads shared); returns [tokens, heads, dim]."""
    grouped = query.shape[1] != key.shape[1]
    if dropout == 0.0 and _flash_varlen_available(query):
        from torch.nn.attention.varlen import varlen_attn

        # causal and grouped-query options as this torch names them (2.10 has is_causal and no
        # grouped heads; later versions a (left, right) window and enable_gqa)
        options = inspect.signature(varlen_attn).parameters
        extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in options else {"is_causal": True}
        if grouped and "enable_gqa" in options:
            extra["enable_gqa"] = True
        elif grouped:
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        return varlen_attn(query, key, value, cumulative, cumulative, longest, longest, scale=scale, **extra)
    outputs = []
    bounds = cumulative.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        piece = [x[start:end].transpose(0, 1) for x in (query, key, value)]  # [heads, length, dim]
        outputs.append(
            nn.functional.scaled_dot_product_attention(
                *piece, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=grouped
            ).transpose(0, 1)
        )
    return torch.cat(outputs)


@torch.compiler.disable
def _packed_attention(query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scaling: float | None, dropout: float) -> Tensor | None:
    """:func:`varlen_attention` over the sequences of ``position_ids``, or None when each row
    holds one sequence. Left out of ``torch.compile`` graphs (a compiled decoder layer breaks its
    graph here): the sequence boundaries are data, and the longest length is read on the host."""
    cumulative, longest = _Boundaries.of(position_ids, query.shape[0])
    if cumulative.numel() - 1 == query.shape[0]:
        return None
    batch, heads, time, dim = query.shape
    flat = [x.transpose(1, 2).reshape(batch * time, x.shape[1], dim) for x in (query, key, value)]
    output = varlen_attention(*flat, cumulative.to(query.device), longest, scaling, dropout)
    return output.reshape(batch, time, heads, dim)


def sdpa_varlen_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention signature: query [batch, heads, time, dim], key/value [batch,
    kv_heads, time, dim]; returns [batch, time, heads, dim]. Packed rows (no mask, positions
    restarting, no cache) take :func:`varlen_attention`; everything else is ``sdpa``."""
    position_ids = kwargs.get("position_ids")
    maybe_packed = (
        attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
        and getattr(module, "is_causal", True) and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False)
    )
    if maybe_packed:
        output = _packed_attention(query, key, value, position_ids, scaling, dropout)
        if output is not None:
            return output, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def sdpa_varlen_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
    attention_mask: Tensor | None = None, **kwargs: Any,
) -> Tensor | None:
    """No mask for a forward over whole rows without padding (packed or not: the attention finds
    the sequences from the positions, so no [time, time] mask is built); ``sdpa``'s mask for every
    other call (padding, a cache, a sliding window are in its mask function)."""
    whole_rows = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    config = kwargs.get("config")
    if attention_mask is None and whole_rows and q_length == kv_length and (config is None or supports_varlen(config)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def supports_varlen(config: Any) -> bool:
    """Models whose attention the packed path reproduces: full causal attention in every layer
    (no sliding window, no soft-capped scores)."""
    layer_types = getattr(config, "layer_types", None) or []
    return (
        getattr(config, "sliding_window", None) in (None, 0) or not getattr(config, "use_sliding_window", True)
    ) and all(kind == "full_attention" for kind in layer_types) and getattr(config, "attn_logit_softcapping", None) is None


AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_varlen_mask)
