"""The shipped SFT-warmed tiny models of the word-problem and sort families: they load with the
character tokenizer, and answer some but not all validation prompts under greedy decoding, the
room that reinforcement learning is meant to use (their full-split accuracies are in
scripts/make_tiny_warm_model.py)."""

from __future__ import annotations

import pytest

from grape_lightning.data.char_tokenizer import build_char_tokenizer
from grape_lightning.data.tasks import SortTask, WordProblemTask
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer

# The tasks as scripts/make_tiny_warm_model.py builds them (the same seed, so the same val split).
WARM = {
    "grape/tiny-word_problem-sft": (WordProblemTask(max_value=10, num_train=3000, num_val=200), 4),
    "grape/tiny-sort-sft": (SortTask(min_length=3, max_length=6, num_train=3000, num_val=200), 8),
}


@pytest.mark.parametrize("name", sorted(WARM))
def test_warm_model_loads_and_is_partly_right_on_val_prompts(name):
    task, max_new_tokens = WARM[name]
    spec = ModelSpec(name_or_path=name)
    tokenizer = load_tokenizer(spec)
    assert tokenizer.get_vocab() == build_char_tokenizer().get_vocab()
    model = load_causal_lm(spec, tokenizer)
    score = greedy_task_score(model, tokenizer, task, num_examples=50, max_new_tokens=max_new_tokens)
    assert 0.1 <= score.accuracy <= 0.8, score
