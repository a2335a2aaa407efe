"""The generation interface the algorithms use, and the tensors it returns.

Any backend (the reference KV-cache sampler here, a CUDA-graph engine, an external server) plugs
in by implementing :class:`GenerationEngine`; the algorithms only see :class:`Generation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from grape_lightning.rollout.sampling import SamplingParams


@dataclass
class Generation:
    """Prompts and sampled responses in one [batch, prompt_width + response_width] layout.

    The prompt part is left-padded (every prompt ends at column ``prompt_width - 1``) and the
    response part is right-padded, so ``input_ids[:, prompt_width:]`` are the responses.
    ``logprobs`` holds the sampler's log-prob of each response token (zero elsewhere), aligned
    with ``input_ids`` as :class:`~grape_lightning.models.logprobs.TokenLogprobs` is; NaN on the
    tokens of a response no sampler produced (GRAPE's off-policy members), where none exists.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    logprobs: Tensor
    prompt_width: int
    finished: Tensor  # [batch] bool: ended at EOS or a stop string (not cut by max_new_tokens)

    @property
    def response_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_width :]

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1)


class GenerationEngine(Protocol):
    """Samples responses for a batch of tokenised prompts from ``model``'s current weights."""

    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Generation: ...

    def release(self) -> None:
        """Free what the engine keeps between calls (caches, recorded graphs); the next call rebuilds it."""
        ...
