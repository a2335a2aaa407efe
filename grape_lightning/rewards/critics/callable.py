"""A Python function as critic."""

from __future__ import annotations

from typing import Any

from grape_lightning.rewards.critics.base import Critic, Judgement, JudgeRequest
from grape_lightning.rewards.verifiers import import_callable


class CallableCritic(Critic):
    """``function(request: JudgeRequest)`` named by import path ("package.module:function")
    returns a Judgement, a (score, confidence[, critique]) tuple, a dict with those keys, or None.
    An exception counts as a failure (None) for that request.

    Args:
        function: import path ``package.module:function`` of the judging function.
    """

    def __init__(self, function: str) -> None:
        self.function = import_callable(function)

    def _one(self, request: JudgeRequest) -> Judgement | None:
        try:
            result: Any = self.function(request)
        except Exception:  # a user function that fails on one response must not stop the run
            return None
        if result is None or isinstance(result, Judgement):
            return result
        if isinstance(result, dict):
            return Judgement(result["score"], result["confidence"], str(result.get("critique", "")))
        return Judgement(*result)

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        return [self._one(request) for request in requests]
