"""Reward functions: one protocol, ``(prompts, responses, metadata) -> rewards``."""

from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.combined import CombinedReward, RewardScores
from grape_lightning.rewards.overlong import OverlongPunishment, overlong_punishment
from grape_lightning.rewards.reward_model import RewardModelScore
from grape_lightning.rewards.code_execution import UnitTests
from grape_lightning.rewards.verifiers import (
    ExactMatch,
    FormatReward,
    JSONSchemaMatch,
    LengthPenalty,
    NumericMatch,
    PythonCallable,
    RegexMatch,
    TaskVerifier,
)

__all__ = [
    "CombinedReward", "ExactMatch", "FormatReward", "JSONSchemaMatch", "LengthPenalty", "NumericMatch",
    "OverlongPunishment", "overlong_punishment",
    "PythonCallable", "RegexMatch", "UnitTests",
    "RewardFunction", "RewardModelScore", "RewardScores", "TaskVerifier",
]
