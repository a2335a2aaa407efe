"""Reward functions: one protocol, ``(prompts, responses, metadata) -> rewards``."""

from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.combined import CombinedReward, RewardScores
from grape_lightning.rewards.reward_model import RewardModelScore
from grape_lightning.rewards.verifiers import ExactMatch, FormatReward, LengthPenalty, NumericMatch, RegexMatch, TaskVerifier

__all__ = [
    "CombinedReward", "ExactMatch", "FormatReward", "LengthPenalty", "NumericMatch", "RegexMatch",
    "RewardFunction", "RewardModelScore", "RewardScores", "TaskVerifier",
]
