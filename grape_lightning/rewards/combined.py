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
        valid = ~torch.isnan(total) & ~torch.isinf(total)
        return RewardScores(total=torch.where(valid, total, float("nan")), valid=valid, per_function=per_function)
