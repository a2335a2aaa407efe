"""The critic interface: judge (prompt, response, rubric item) into a score, a confidence and a critique."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgeRequest:
    prompt: str
    response: str
    item: str  # the rubric item's name
    question: str  # what the critic is asked about the response
    reference: str | None = None  # the dataset's reference answer, when there is one


@dataclass(frozen=True)
class Judgement:
    score: float  # s in [0, 1]
    confidence: float  # c in [0, 1]
    critique: str = ""


class Critic(ABC):
    """Judges a batch of requests. A request the critic could not judge is ``None`` in the output;
    GRAPE then gives that (response, item) confidence 0 and counts the failure."""

    @abstractmethod
    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]: ...


def checked(judgement: object) -> Judgement | None:
    """``judgement`` if it is a Judgement with score and confidence in [0, 1], else None (garbage)."""
    if not isinstance(judgement, Judgement):
        return None
    for value in (judgement.score, judgement.confidence):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
            return None
    return judgement


JUDGE_INSTRUCTIONS = (
    "You are a strict grader. Judge the response against the criterion. Reply with only a JSON object "
    '{"score": <0..1, how well the response meets the criterion>, "confidence": <0..1, how sure you are>, '
    '"critique": "<one sentence>"}.'
)


def judging_text(request: JudgeRequest) -> str:
    """The request as plain text, shared by every critic that prompts a language model."""
    reference = f"\nReference answer: {request.reference}" if request.reference else ""
    return f"Criterion: {request.question}\nPrompt: {request.prompt}{reference}\nResponse: {request.response}"
