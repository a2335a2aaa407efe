"""Scalar scores of whole sequences: the head of a sequence-classification model on the last real token."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grape_lightning.models.logprobs import positions_from_mask


def score_head(model: nn.Module) -> nn.Module:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(model).__name__} has no scalar head ('score' or 'classifier')")


def last_token_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """r(x, y) [batch]: the head applied to the hidden state of each row's last real token.

    Found from the attention mask (not from pad ids, which may equal EOS), so it works with left
    or right padding.
    """
    outputs = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask), use_cache=False
    )
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    last = attention_mask.long().cumsum(-1).argmax(-1)  # the first position where the count peaks
    scores = score_head(model)(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return scores.squeeze(-1).to(torch.promote_types(scores.dtype, torch.float32))
