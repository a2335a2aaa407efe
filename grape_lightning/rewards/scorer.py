"""Scoring a rollout: one interface for reward functions and GRAPE's rubric alike.

A :class:`Scorer` turns the responses of a rollout into one reward per response, plus what a
run logs about them: the raw value of every term (reward function or rubric item), which
responses count as correct, and statistics of the batch. Collection calls it once per rollout;
nothing about a scorer's state outlives the :class:`Scores` it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.combined import CombinedReward


@dataclass
class Scores:
    """The scores of N responses.

    ``rewards`` is NaN where ``valid`` is False (no reward could be computed: the response
    leaves the update). ``terms`` holds each term's raw value, NaN where it is missing.
    ``correct`` marks the responses the scorer's accuracy check passed (None: the scorer has no
    accuracy check). ``statistics`` are scalars of the batch that the run logs as they are.
    ``confidences`` holds each term's confidence where a scorer has them (GRAPE's rubric items:
    c where the item applies, 0 where it failed, NaN where it does not apply).
    """

    rewards: Tensor  # [N] float64
    valid: Tensor  # [N] bool
    terms: dict[str, Tensor]  # name -> [N] float64
    correct: Tensor | None = None  # [N] bool
    details: list[dict[str, Any]] = field(default_factory=list)  # per response, for sample tables
    statistics: dict[str, float] = field(default_factory=dict)
    confidences: dict[str, Tensor] = field(default_factory=dict)  # name -> [N] float64


class Scorer(Protocol):
    """Scores the responses of one rollout; ``groups[i]`` is the sample set (prompt) of response i."""

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> Scores: ...


def accuracy_term(terms: dict[str, Tensor], accuracy: str | None, source: str) -> Tensor | None:
    """[N] bool: the responses whose term ``accuracy`` is 1 (a passed check); None without one.
    An unknown name is an error that lists the terms there are."""
    if accuracy is None:
        return None
    if accuracy not in terms:
        raise ValueError(f"accuracy: {source} has no term {accuracy!r}; its terms are {sorted(terms)}")
    return terms[accuracy] == 1


class RewardScorer:
    """r_i = sum_k w_k r_k(x_i, y_i) over reward functions (:class:`CombinedReward`).

    Args:
        functions: the reward functions.
        accuracy: name of the function whose value 1 marks a correct response (None: no accuracy).
    """

    def __init__(self, functions: list[RewardFunction], accuracy: str | None = None) -> None:
        self.reward = CombinedReward(functions)
        names = [function.name for function in functions]
        if accuracy is not None and accuracy not in names:
            raise ValueError(f"accuracy: no reward function is named {accuracy!r}; the functions are {names}")
        self.accuracy = accuracy

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]], groups: Tensor) -> Scores:
        scored = self.reward(prompts, responses, metadata)
        correct = accuracy_term(scored.per_function, self.accuracy, "the reward functions")
        return Scores(rewards=scored.total, valid=scored.valid, terms=scored.per_function, correct=correct)

