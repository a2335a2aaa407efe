"""Critics for GRAPE's judged rubric items: a local causal LM, an OpenAI-compatible endpoint, a Python function."""

from grape_lightning.rewards.critics.base import Critic, Judgement, JudgeRequest
from grape_lightning.rewards.critics.callable import CallableCritic
from grape_lightning.rewards.critics.http import OpenAICompatibleCritic
from grape_lightning.rewards.critics.local import LocalLMCritic

__all__ = ["CallableCritic", "Critic", "Judgement", "JudgeRequest", "LocalLMCritic", "OpenAICompatibleCritic"]
