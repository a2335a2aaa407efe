"""Padding and packing of token sequences into batch tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from grape_lightning.models.logprobs import positions_from_mask


def pad_right(sequences: Sequence[Sequence[int]], value: int, dtype: torch.dtype = torch.long) -> Tensor:
    """[batch, max_len] with each sequence at the left and ``value`` after it."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=dtype)
    return out


def pad_left(sequences: Sequence[Sequence[int]], value: int, dtype: torch.dtype = torch.long) -> Tensor:
    """[batch, max_len] with each sequence at the right (the layout generation wants)."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            out[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=dtype)
    return out


def collate_prompt_completion(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Right-padded prompt+completion batch; ``response_mask`` marks the completion tokens."""
    sequences = [prompt + completion for prompt, completion in rows]
    masks = [[0] * len(prompt) + [1] * len(completion) for prompt, completion in rows]
    input_ids = pad_right(sequences, pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": pad_right([[1] * len(s) for s in sequences], 0),
        "response_mask": pad_right(masks, 0, dtype=torch.bool),
        "num_tokens": torch.tensor(sum(len(s) for s in sequences)),
    }


def pack_rows(rows: Sequence[tuple[list[int], list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing of prompt+completion pairs into rows of at most ``max_length`` tokens.

    Each packed row carries ``position_ids`` that restart at 0 for every sequence; a model given
    these positions and no attention mask keeps attention inside each sequence.
    """
    packed: list[dict[str, list[int]]] = []
    for prompt, completion in rows:
        length = len(prompt) + len(completion)
        target = next((row for row in packed if len(row["input_ids"]) + length <= max_length), None)
        if target is None:
            target = {"input_ids": [], "position_ids": [], "response_mask": []}
            packed.append(target)
        target["input_ids"] += prompt + completion
        target["position_ids"] += list(range(length))
        target["response_mask"] += [0] * len(prompt) + [1] * len(completion)
    return packed


def collate_packed(rows: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Packed rows padded on the right; the padding forms its own sequence (positions from 0, never scored)."""
    width = max(len(row["input_ids"]) for row in rows)
    positions = [row["position_ids"] + list(range(width - len(row["position_ids"]))) for row in rows]
    return {
        "input_ids": pad_right([row["input_ids"] for row in rows], pad_token_id),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "response_mask": pad_right([row["response_mask"] for row in rows], 0, dtype=torch.bool),
        "num_tokens": torch.tensor(sum(len(row["input_ids"]) for row in rows)),
    }


def padding_free(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A padded batch as one row of its real tokens: the R rows' tokens back to back ([1, N], N
    their total), ``position_ids`` restarting at 0 with each sequence and no attention mask, so a
    model spends nothing on padding and attention stays inside each sequence
    (:mod:`grape_lightning.models.varlen_attention`). ``sequence_ids`` [1, N] gives each token's
    row r in the padded batch; per-sequence sums are sums over equal ids (:func:`sequence_sums`).
    Keys other than the token-aligned ones are kept as they are. A batch without an attention
    mask (already packed) is returned unchanged.
    """
    if "attention_mask" not in batch:
        return batch
    real = batch["attention_mask"].bool()
    index = real.flatten().nonzero().squeeze(1)  # the one host synchronisation: the count of real tokens
    rows = torch.arange(real.shape[0], device=real.device)[:, None].expand_as(real)
    flat = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key, value in (("input_ids", batch["input_ids"]), ("response_mask", batch["response_mask"]),
                       ("position_ids", positions_from_mask(real)), ("sequence_ids", rows)):
        flat[key] = value.flatten()[index][None]
    return flat


def sequence_ids(batch: dict[str, Tensor]) -> Tensor:
    """The row of the padded batch each token belongs to ([batch, time]): ``sequence_ids`` of a
    :func:`padding_free` batch, else each row's index."""
    if "sequence_ids" in batch:
        return batch["sequence_ids"]
    rows, time = batch["input_ids"].shape
    return torch.arange(rows, device=batch["input_ids"].device)[:, None].expand(rows, time)


def sequence_sums(values: Tensor, ids: Tensor, num_sequences: int) -> Tensor:
    """s_r = sum over tokens t with ids_t = r of values_t, for r < ``num_sequences``: [num_sequences].
    A masked sum per sequence rather than a scatter-add, so it is deterministic on every device."""
    members = ids.flatten()[None, :] == torch.arange(num_sequences, device=ids.device)[:, None]
    return (values.flatten()[None, :] * members).sum(-1)
