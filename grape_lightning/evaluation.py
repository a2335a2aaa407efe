"""Greedy-decoding evaluation of a policy: on a built-in task, or on prompts with a reward function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grape_lightning.data.collate import pad_left
from grape_lightning.data.formatting import Prompt, encode_prompt
from grape_lightning.data.tasks import Task
from grape_lightning.rewards.base import RewardFunction, is_missing


@dataclass
class TaskScore:
    accuracy: float  # share of responses with reward 1
    mean_reward: float  # over the responses that could be scored
    num_examples: int


@torch.no_grad()
def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    *,
    chat_template: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """The greedy continuation of every prompt, decoded without special tokens."""
    responses: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [encode_prompt(tokenizer, prompt, chat_template) for prompt in prompts[start : start + batch_size]]
            input_ids = pad_left(ids, tokenizer.pad_token_id).to(model.device)
            attention_mask = pad_left([[1] * len(p) for p in ids], 0).to(model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            responses += tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return responses


def score_of(rewards: list[float | None]) -> TaskScore:
    """Accuracy (share of all responses with reward exactly 1; an unscorable one counts as wrong)
    and the mean reward of the scorable ones."""
    scored = [r for r in rewards if not is_missing(r)]
    return TaskScore(
        sum(r == 1.0 for r in scored) / max(len(rewards), 1), sum(scored) / max(len(scored), 1), len(rewards)
    )


def greedy_task_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    *,
    split: str = "val",
    num_examples: int | None = None,
    chat_template: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> TaskScore:
    """Decode greedily for the task's ``split`` prompts and score with the task's verifier."""
    examples = task.examples(split)[:num_examples]
    responses = greedy_responses(
        model, tokenizer, [e.prompt for e in examples], chat_template=chat_template,
        max_new_tokens=max_new_tokens, batch_size=batch_size,
    )
    return score_of([task.verify(response, example.answer) for response, example in zip(responses, examples)])


def greedy_reward_score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    reward: RewardFunction,
    *,
    chat_template: bool = False,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> TaskScore:
    """Decode greedily for ``rows`` (``{"prompt", "metadata"}``, the reference answer in the
    metadata, as the DataModules' ``reference_rows`` give them) and score with ``reward``."""
    from grape_lightning.rollout.datamodule import prompt_text

    prompts = [row["prompt"] for row in rows]
    responses = greedy_responses(
        model, tokenizer, prompts, chat_template=chat_template, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return score_of(reward([prompt_text(p) for p in prompts], responses, [row["metadata"] for row in rows]))
