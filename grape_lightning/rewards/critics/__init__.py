"""Critics for GRAPE's judged rubric items: a local causal LM, an OpenAI-compatible endpoint, a Python function, and one corrupted on purpose."""

from grape_lightning.rewards.critics.base import Critic, Judgement, JudgeRequest
from grape_lightning.rewards.critics.callable import CallableCritic
from grape_lightning.rewards.critics.corrupted import CorruptedCritic
from grape_lightning.rewards.critics.http import OpenAICompatibleCritic
from grape_lightning.rewards.critics.local import LocalLMCritic

__all__ = ["CallableCritic", "CorruptedCritic", "Critic", "Judgement", "JudgeRequest", "LocalLMCritic", "OpenAICompatibleCritic"]
