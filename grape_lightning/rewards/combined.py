"""A weighted sum of reward functions, with missing values tracked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grape_lightning.rewards.base import RewardFunction, is_missing


@dataclass
class RewardScores:
    """``total[i] = sum_k w_k r_ik``; NaN where any term could not be scored (``valid`` is False)."""

    total: Tensor  # [batch] float64
    valid: Tensor  # [batch] bool
    per_function: dict[str, Tensor]  # name -> [batch] raw (unweighted) values, NaN where missing
    details: list[dict[str, Any]] = field(default_factory=list)  # per response, for sample tables


@dataclass
class InvalidRewards:
    """Where the rewards of one rollout batch could not be computed, for an error a user can act on:
    how many totals were invalid, how many raw values each function left missing (None/NaN/inf),
    and the first row with an invalid total."""

    total: int
    invalid: int
    per_function: dict[str, int]
    example: dict[str, Any] | None

    @classmethod
    def of(
        cls,
        per_function: dict[str, Tensor],
        valid: Tensor,
        prompts: list[str],
        responses: list[str],
        metadata: list[dict[str, Any]],
    ) -> InvalidRewards:
        per_function = {name: values.detach().cpu() for name, values in per_function.items()}
        valid = valid.cpu()
        counts = {name: int((~torch.isfinite(values)).sum()) for name, values in per_function.items()}
        invalid_rows = (~valid).nonzero().flatten().tolist()
        example = None
        if invalid_rows:
            row = invalid_rows[0]
            example = {
                "prompt": prompts[row], "response": responses[row], "metadata": metadata[row],
                **{name: float(values[row]) for name, values in per_function.items()},
            }
        return cls(total=len(valid), invalid=len(invalid_rows), per_function=counts, example=example)

    def describe(self) -> str:
        if not self.invalid:
            return f"all {self.total} rewards were valid"
        functions = ", ".join(f"{name!r} {count}" for name, count in self.per_function.items() if count)
        return (
            f"{self.invalid} of {self.total} rewards were invalid (None/NaN/inf); missing values by reward function: "
            f"{functions or 'none (the weighted sum was not finite)'}; first such row: {self.example!r}"
        )


class CombinedReward:
    """Scores responses with every function and combines them as sum_k w_k r_k."""

    def __init__(self, functions: list[RewardFunction]) -> None:
        if not functions:
            raise ValueError("at least one reward function is needed")
        names = [f.name for f in functions]
        if len(set(names)) != len(names):
            raise ValueError(f"reward function names must be unique, got {names}")
        self.functions = functions

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> RewardScores:
        total = torch.zeros(len(responses), dtype=torch.float64)
        per_function = {}
        for function in self.functions:
            values = function(prompts, responses, metadata)
            if len(values) != len(responses):
                raise ValueError(f"reward {function.name!r} returned {len(values)} values for {len(responses)} responses")
            raw = torch.tensor([float("nan") if is_missing(v) else float(v) for v in values], dtype=torch.float64)
            per_function[function.name] = raw
            total += function.weight * raw
        valid = torch.isfinite(total)
        return RewardScores(total=torch.where(valid, total, float("nan")), valid=valid, per_function=per_function)
