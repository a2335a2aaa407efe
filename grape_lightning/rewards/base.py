"""The reward protocol: ``(prompts, responses, metadata) -> rewards``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any


RESPONSE_TOKENS = "response_tokens"
"""Metadata key of a training response's length in generated tokens (EOS included), which the
rollout collector adds to each response's copy of its prompt's metadata (a row's own field of that
name is replaced)."""


class RewardFunction(ABC):
    """Scores a batch of responses. One value per response; ``None``, NaN or +-inf means "could not score"
    (the response is then left out of the update and counted, never treated as 0).

    ``weight`` scales this function inside a :class:`~grape_lightning.rewards.combined.CombinedReward`;
    ``name`` labels its metrics (``reward/<name>``).

    Args:
        weight: w_k, the weight of this function in the combined reward sum_k w_k r_k.
        name: label of its metrics (``reward/<name>``; default: the class name in snake_case).
    """

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        self.weight = weight
        self.name = name or _snake_case(type(self).__name__)

    @abstractmethod
    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float | None]: ...


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


def is_missing(value: float | None) -> bool:
    """Whether a reward value means "could not score": None, NaN or +-inf (an infinite reward
    would swamp every finite one in the baseline, so it is no more usable than NaN)."""
    return value is None or not math.isfinite(float(value))
