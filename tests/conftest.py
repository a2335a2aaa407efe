"""Shared fixtures: tiny models built from a config with the built-in character tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grape_lightning.models.spec import ModelSpec  # noqa: E402

TINY_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def tiny_spec(**overrides) -> ModelSpec:
    fields = {"config": dict(TINY_CONFIG), "tokenizer": "grape/char"}
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
