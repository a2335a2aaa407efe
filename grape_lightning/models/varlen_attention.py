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

SEQUENCE_WISE_ATTENTION = (VARLEN_ATTENTION, "flash_attention_2", "flash_attention_3", "flex_attention")
"""Attention implementations that run a packed row sequence by sequence (no work across the
sequences of a row); ``sdpa`` and ``eager`` mask a packed row block-diagonally, exact but with
the work of one sequence as long as the row."""


def padding_free_wanted(option: bool | None, model: nn.Module) -> bool:
    """A module's ``padding_free`` setting for ``model``: None means on where the model's attention
    is in :data:`SEQUENCE_WISE_ATTENTION` (``sdpa_varlen`` is the default on CUDA), off elsewhere,
    where batches stay padded as they were."""
    if option is not None:
        return option
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in SEQUENCE_WISE_ATTENTION


def sequence_boundaries(position_ids: Tensor) -> tuple[Tensor, int]:
    """(cumulative lengths [n + 1] as int32, longest length) of the sequences of the rows of
    ``position_ids`` [batch, time], read in row-major order: a sequence starts at the start of
    each row and wherever the position does not follow the previous one."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    # read on the host once (one synchronisation): the kernel takes the longest length as a number
    start_index = starts.flatten().cpu().nonzero().flatten()
    cumulative = torch.cat([start_index, start_index.new_tensor([position_ids.numel()])]).to(torch.int32)
    longest = int((cumulative[1:] - cumulative[:-1]).max())
    return cumulative.to(position_ids.device, non_blocking=True), longest


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


def _flash_varlen_options(query: Tensor, scale: float | None) -> dict[str, Any] | None:
    """Keyword arguments of ``varlen_attn`` for causal attention at ``scale`` in this torch (2.10
    names causality ``is_causal``; later versions take a (left, right) window, and ``enable_gqa``
    for grouped heads, present here when accepted), or None where it cannot run: not CUDA,
    not 16-bit, no ``varlen_attn``, or a scale it cannot take."""
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    accepted = inspect.signature(varlen_attn).parameters
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    if "enable_gqa" in accepted:
        options["enable_gqa"] = False
    if "scale" in accepted:
        options["scale"] = scale
    elif scale is not None and abs(scale - query.shape[-1] ** -0.5) > 1e-12:
        return None
    return options


def varlen_attention(
    query: Tensor, key: Tensor, value: Tensor, cumulative: Tensor, longest: int, scale: float | None,
    dropout: float = 0.0,
) -> Tensor:
    """Causal attention within each sequence of ``cumulative`` lengths. query [tokens, heads, dim],
    key/value [tokens, kv_heads, dim] (grouped-query heads shared); returns [tokens, heads, dim]."""
    grouped = query.shape[1] != key.shape[1]
    options = _flash_varlen_options(query, scale) if dropout == 0.0 else None
    if options is not None:
        from torch.nn.attention.varlen import varlen_attn

        if grouped and "enable_gqa" in options:
            options["enable_gqa"] = True
        elif grouped:  # a torch whose varlen_attn has no grouped heads: each query head gets its own copy
            repeats = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
        return varlen_attn(query, key, value, cumulative, cumulative, longest, longest, **options)
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
def _packed_attention(
    query: Tensor, key: Tensor, value: Tensor, position_ids: Tensor, scaling: float | None, dropout: float
) -> Tensor | None:
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
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def sdpa_varlen_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: Any = 0,
    attention_mask: Tensor | None = None, **kwargs: Any,
) -> Tensor | None:
    """No mask for a forward over whole rows without padding (packed or not: the attention finds
    the sequences from the positions, so no [time, time] mask is built); ``sdpa``'s mask for every
    other call (padding, a cache, a sliding window are in its mask function)."""
    whole_rows = isinstance(q_offset, int) and isinstance(kv_offset, int) and q_offset == kv_offset == 0
    config = kwargs.get("config")
    full_causal = config is None or supports_varlen(config)
    if attention_mask is None and whole_rows and q_length == kv_length and full_causal:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def supports_varlen(config: Any) -> bool:
    """Models whose attention the packed path reproduces: full causal attention in every layer
    (no sliding window, no soft-capped scores)."""
    layer_types = getattr(config, "layer_types", None) or []
    no_window = getattr(config, "sliding_window", None) in (None, 0) or not getattr(config, "use_sliding_window", True)
    full_layers = all(kind == "full_attention" for kind in layer_types)
    return no_window and full_layers and getattr(config, "attn_logit_softcapping", None) is None


AttentionInterface.register(VARLEN_ATTENTION, sdpa_varlen_attention_forward)
AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_varlen_mask)
