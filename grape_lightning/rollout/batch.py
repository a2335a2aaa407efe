"""A scored rollout: the sampled sequences with everything the losses need."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Rollout:
    """N sampled responses (``N = prompts x group size``) in the engine's layout.

    ``old_logprobs`` are pi_old's log-probs (the weights that sampled, recomputed by the training
    forward so that the first ratio is exactly 1); ``ref_logprobs`` the reference's and
    ``teacher_logprobs`` a distillation teacher's, when there is one. ``sampling_logprobs`` are the
    sampler's: NaN on the response tokens of ``off_policy`` rows, which no sampler of this run
    produced (and so are ``old_logprobs`` there until pi_old's are computed). ``rewards`` is NaN
    where ``valid`` is False (a reward could not be computed).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    rewards: Tensor
    valid: Tensor
    groups: Tensor
    prompts: list[str]
    responses: list[str]
    metadata: list[dict[str, Any]]
    reward_terms: dict[str, Tensor] = field(default_factory=dict)  # raw value of each reward term, NaN where missing
    correct: Tensor | None = None  # [N] bool: the scorer's accuracy check passed (None: it has none)
    ref_logprobs: Tensor | None = None
    teacher_logprobs: Tensor | None = None  # a distillation teacher's log-probs of the sampled tokens
    sampling_logprobs: Tensor | None = None
    off_policy: Tensor | None = None  # [N] bool: responses not sampled from pi_old (GRAPE)
    details: list[dict[str, Any]] = field(default_factory=list)  # per-response extras for sample tables
    statistics: dict[str, float] = field(default_factory=dict)  # the scorer's statistics of the batch (logged)
    generation_seconds: float = 0.0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)

    @property
    def trained_mask(self) -> Tensor:
        """Response tokens that enter the loss: those of responses with a valid reward."""
        return self.response_mask & self.valid[:, None]

    def model_inputs(self, index: Tensor) -> dict[str, Tensor]:
        """The rows ``index`` as a model batch, trimmed to their longest real sequence."""
        attention_mask = self.attention_mask[index]
        width = int(attention_mask.nonzero()[:, 1].max()) + 1 if attention_mask.any() else attention_mask.shape[1]
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": attention_mask[:, :width],
            "response_mask": self.response_mask[index, :width],
        }

    def take(self, name: str, index: Tensor) -> Tensor:
        """A per-token tensor attribute (``old_logprobs``, ...) for the rows ``index``, trimmed like
        :meth:`model_inputs`."""
        width = self.model_inputs(index)["input_ids"].shape[1]
        return getattr(self, name)[index, :width]


def minibatch_indices(size: int, minibatch_size: int, generator: torch.Generator | None = None, shuffle: bool = True) -> list[Tensor]:
    """Split ``range(size)`` into mini-batches (shuffled with ``generator`` when asked)."""
    order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
    return list(order.split(minibatch_size))
