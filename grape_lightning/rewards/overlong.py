"""DAPO's soft overlong punishment: a length-aware penalty in the last ``cache_length`` tokens of the budget."""

from __future__ import annotations

from typing import Any

from grape_lightning.rewards.base import RESPONSE_TOKENS, RewardFunction


def overlong_punishment(length: float, max_length: int, cache_length: int) -> float:
    """R_overlong(y) of DAPO (Yu et al., 2025, eq. 13), with |y| = ``length`` tokens,
    L_max = ``max_length`` and L_cache = ``cache_length``:

        R(y) = 0                                     if |y| <= L_max - L_cache
        R(y) = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
        R(y) = -1                                    if L_max < |y|

    It falls linearly from 0 to -1 over the last L_cache tokens of the budget, so a response is
    penalised for nearing the limit rather than only for being cut (which gives -1 at once).
    """
    soft_start = max_length - cache_length
    if length <= soft_start:
        return 0.0
    if length <= max_length:
        return (soft_start - length) / cache_length
    return -1.0


class OverlongPunishment(RewardFunction):
    """DAPO's soft overlong punishment of a response of |y| tokens (:func:`overlong_punishment`):
    0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max, -1 beyond.

    |y| counts the tokens the policy generated (EOS included), which reward functions, scoring
    text, cannot recover exactly by tokenising it again: the rollout collector passes it in each
    response's metadata as ``response_tokens``. Responses are cut at ``sampling.max_new_tokens``:
    with ``max_length`` equal to it (DAPO's setting) a cut response scores exactly -1 and the last
    branch never applies; a smaller ``max_length`` gives a band of hard -1 below the cut. Add it
    to the task's reward in the ``rewards:`` list (r = sum_k w_k r_k).

    Args:
        max_length: L_max, tokens a response may have (usually ``sampling.max_new_tokens``).
        cache_length: L_cache, the length of the soft-penalty interval before L_max.
    """

    def __init__(self, max_length: int, cache_length: int, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        if not 0 < cache_length <= max_length:
            raise ValueError(
                f"OverlongPunishment: cache_length must be in (0, max_length], got cache_length={cache_length}, max_length={max_length}"
            )
        self.max_length = max_length
        self.cache_length = cache_length

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float | None]:
        values = []
        for row, meta in enumerate(metadata):
            if RESPONSE_TOKENS not in meta:
                raise ValueError(
                    f"OverlongPunishment: row {row} has no metadata[{RESPONSE_TOKENS!r}], the response's length in tokens that "
                    "the rollout collector sets; it scores training rollouts of the on-policy modules only"
                )
            values.append(overlong_punishment(meta[RESPONSE_TOKENS], self.max_length, self.cache_length))
        return values
