"""Programmatic rewards: answer checks, format and length terms, a built-in task's own verifier."""

from __future__ import annotations

import re
from typing import Any

from grape_lightning.data.tasks import Task
from grape_lightning.rewards.base import RewardFunction


def _answer_line(response: str) -> str:
    """The part of a response an answer check reads: its first non-blank line, stripped."""
    stripped = response.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


def _reference(metadata: dict[str, Any], key: str) -> Any:
    if key not in metadata:
        return None  # no reference: the response cannot be scored (counted, not guessed)
    return metadata[key]


class ExactMatch(RewardFunction):
    """1 if the response's first line equals ``metadata[answer_key]`` (both stripped), else 0.

    Args:
        answer_key: metadata field holding the reference answer.
    """

    def __init__(self, answer_key: str = "answer", weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.answer_key = answer_key

    def __call__(self, prompts, responses, metadata):
        rewards: list[float | None] = []
        for response, meta in zip(responses, metadata):
            answer = _reference(meta, self.answer_key)
            rewards.append(None if answer is None else float(_answer_line(response) == str(answer).strip()))
        return rewards


class NumericMatch(RewardFunction):
    """1 if the first number in the response's first line is within ``tolerance`` of the answer.

    Args:
        answer_key: metadata field holding the reference answer.
        tolerance: largest absolute difference counted as a match.
    """

    NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

    def __init__(self, answer_key: str = "answer", tolerance: float = 1e-6, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.answer_key = answer_key
        self.tolerance = tolerance

    def __call__(self, prompts, responses, metadata):
        rewards: list[float | None] = []
        for response, meta in zip(responses, metadata):
            answer = _reference(meta, self.answer_key)
            if answer is None:
                rewards.append(None)
                continue
            found = self.NUMBER.search(_answer_line(response))
            rewards.append(float(found is not None and abs(float(found.group()) - float(answer)) <= self.tolerance))
        return rewards


class RegexMatch(RewardFunction):
    """1 if ``pattern`` is found in the response (``re.search``), else 0.

    Args:
        pattern: regular expression searched for in the response.
        flags: ``re`` flags (for example 2 for ``re.IGNORECASE``).
    """

    def __init__(self, pattern: str, flags: int = 0, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.pattern = re.compile(pattern, flags)

    def __call__(self, prompts, responses, metadata):
        return [float(self.pattern.search(response) is not None) for response in responses]


class FormatReward(RewardFunction):
    """1 if the whole response (stripped) matches ``pattern`` (``re.fullmatch``), else 0.

    Args:
        pattern: regular expression the whole stripped response must match.
    """

    def __init__(self, pattern: str, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.pattern = re.compile(pattern, re.DOTALL)

    def __call__(self, prompts, responses, metadata):
        return [float(self.pattern.fullmatch(response.strip()) is not None) for response in responses]


class LengthPenalty(RewardFunction):
    """-(characters beyond ``max_chars``) / ``scale``, capped at -1; 0 for responses within budget.

    Args:
        max_chars: characters a response may have without penalty.
        scale: characters over budget that cost one unit of reward.
    """

    def __init__(self, max_chars: int, scale: float = 100.0, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        self.max_chars = max_chars
        self.scale = scale

    def __call__(self, prompts, responses, metadata):
        return [-min(1.0, max(0, len(response) - self.max_chars) / self.scale) for response in responses]


class TaskVerifier(RewardFunction):
    """The verifier of a built-in task, reading the reference from ``metadata["answer"]``.

    Args:
        task: the built-in task whose ``verify`` scores the responses.
    """

    def __init__(self, task: Task, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name or f"{task.name}_verifier")
        self.task = task

    def __call__(self, prompts, responses, metadata):
        return [None if "answer" not in meta else self.task.verify(response, meta["answer"]) for response, meta in zip(responses, metadata)]


def _strip_code_fence(text: str) -> str:
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else ""
        stripped = stripped.rsplit("```", 1)[0]
    return stripped.strip()


class JSONSchemaMatch(RewardFunction):
    """1 if the response (optionally inside a ``` fence) parses as JSON valid under ``schema``, else 0.

    Args:
        schema: JSON Schema the parsed response must satisfy.
    """

    def __init__(self, schema: dict[str, Any], weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name)
        import jsonschema

        jsonschema.validators.validator_for(schema).check_schema(schema)
        self.validator = jsonschema.validators.validator_for(schema)(schema)

    def __call__(self, prompts, responses, metadata):
        import json

        rewards: list[float | None] = []
        for response in responses:
            try:
                rewards.append(float(self.validator.is_valid(json.loads(_strip_code_fence(response)))))
            except ValueError:
                rewards.append(0.0)
        return rewards


class PythonCallable(RewardFunction):
    """A user function ``function(prompt, response, metadata) -> float | None`` named by import path
    ("package.module:function"), called once per response.

    Args:
        function: import path ``package.module:function`` of the reward function.
    """

    def __init__(self, function: str, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__(weight, name or function.rsplit(":", 1)[-1])
        self.function = import_callable(function)

    def __call__(self, prompts, responses, metadata):
        return [self.function(p, r, m) for p, r, m in zip(prompts, responses, metadata)]


def import_callable(path: str) -> Any:
    """``"package.module:attribute"`` -> the object, with an error that says what was wrong."""
    import importlib

    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"expected 'package.module:function', got {path!r}")
    target = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(target):
        raise ValueError(f"{path!r} is not a callable")
    return target
