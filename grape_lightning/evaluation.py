"""Greedy-decoding evaluation of a policy on a built-in task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from grape_lightning.data.collate import pad_left
from grape_lightning.data.formatting import encode_prompt
from grape_lightning.data.tasks import Task


@dataclass
class TaskScore:
    accuracy: float  # share of responses with reward 1
    mean_reward: float
    num_examples: int


@torch.no_grad()
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
    rewards: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [encode_prompt(tokenizer, example.prompt, chat_template) for example in chunk]
            input_ids = pad_left(prompts, tokenizer.pad_token_id).to(model.device)
            attention_mask = pad_left([[1] * len(p) for p in prompts], 0).to(model.device)
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
            responses = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
            rewards += [task.verify(response, example.answer) for response, example in zip(responses, chunk)]
    finally:
        model.train(was_training)
    count = max(len(rewards), 1)
    return TaskScore(sum(r == 1.0 for r in rewards) / count, sum(rewards) / count, len(rewards))
