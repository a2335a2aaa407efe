"""Value models: a scalar head on a causal-LM trunk, shared with the policy or a separate copy."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.models.scores import score_head


class ValueHead(nn.Module):
    """V(h_t) = w^T h_t + b, one scalar per position. Initialised small so early values are near 0."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class ValueModel(nn.Module):
    """Per-token values [batch, time] from a transformer trunk and a :class:`ValueHead`.

    With ``trunk`` the policy's own ``base_model`` this is the "head on the policy trunk" option
    (one network, two outputs); with a separate trunk it is an independent critic
    (:meth:`from_sequence_scorer` builds one from a reward model).
    """

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        # in the trunk's dtype: sharded training (FSDP) needs one dtype per unit, and bf16-true
        # precision converts the head anyway; the values are returned in float32 (float64)
        self.head = ValueHead(hidden_size).to(next(trunk.parameters()).dtype)

    @classmethod
    def from_sequence_scorer(cls, scorer: nn.Module) -> ValueModel:
        """A separate critic that starts as a reward model (a sequence-classification model with
        one label): its trunk, and its scalar head copied into the value head, so V(h_t) = r(h_t)
        before training (the initialisation of Ziegler et al., 2019)."""
        source = score_head(scorer)
        value = cls(scorer.base_model, source.weight.shape[1])
        with torch.no_grad():
            value.head.linear.weight.copy_(source.weight)
            value.head.linear.bias.copy_(source.bias if source.bias is not None else torch.zeros(1))
        return value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None) -> Tensor:
        if position_ids is None and attention_mask is not None:
            position_ids = positions_from_mask(attention_mask)
        outputs = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return self.values_from_hidden(outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0])

    def values_from_hidden(self, hidden: Tensor) -> Tensor:
        """The head on hidden states the trunk already computed (a head sharing the policy's trunk
        reads the policy's forward pass); float32 values (float64 from a float64 trunk)."""
        return self.head(hidden).float() if hidden.dtype != torch.float64 else self.head(hidden)
