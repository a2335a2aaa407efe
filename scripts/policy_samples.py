"""Answers sampled from the shipped SFT-warmed policy, grape/tiny-addition-sft, as configs/grpo.yaml
and configs/grape.yaml sample them (temperature 1, at most 6 new tokens): the material the scripts
that build the other shipped tiny models (the reward model, the critic) train on."""

from __future__ import annotations

import torch

from grape_lightning.data.formatting import encode_prompt
from grape_lightning.data.tasks.base import Example
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.rollout import SamplingParams
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine

POLICY = ModelSpec(name_or_path="grape/tiny-addition-sft")


@torch.no_grad()
def sample_policy_answers(examples: list[Example], samples: int, seed: int) -> dict[str, list[str]]:
    """``samples`` answers of the policy to each prompt, in the order drawn (deterministic under
    ``seed``: 256 prompts a generation batch)."""
    tokenizer = load_tokenizer(POLICY)
    policy = load_causal_lm(POLICY, tokenizer).eval()
    engine = KVCacheEngine(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    answers: dict[str, list[str]] = {}
    for start in range(0, len(examples), 256):
        repeated = [example for example in examples[start : start + 256] for _ in range(samples)]
        prompt_ids = [encode_prompt(tokenizer, example.prompt, chat_template=False) for example in repeated]
        generation = engine.generate(policy, prompt_ids, SamplingParams(max_new_tokens=6, temperature=1.0), generator)
        responses = tokenizer.batch_decode(
            [ids[mask].tolist() for ids, mask in zip(generation.input_ids, generation.response_mask)], skip_special_tokens=True
        )
        for example, response in zip(repeated, responses):
            answers.setdefault(example.prompt, []).append(response)
    return answers
