"""Reference generation engine: batched prefill, then token-by-token decode with a KV cache."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from grape_lightning.data.collate import pad_left
from grape_lightning.models.compile import eager_layers
from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.rollout.decoding import (
    assemble_generation,
    check_prompts,
    eos_token_ids,
    sample_responses,
)
from grape_lightning.rollout.engine import Generation
from grape_lightning.rollout.sampling import SamplingParams


def _cache_argument_name(model: nn.Module) -> str:
    """Newer transformers name the KV-cache argument ``cache``; older ones ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVCacheEngine:
    """Works with any Hugging Face causal LM on any device.

    Prompts are left-padded and positioned by their attention mask, so a prompt's continuation
    does not depend on the other prompts of the batch. A row stops at any EOS id of the
    tokenizer/model or when its decoded tail contains a stop string; its later slots are padding
    (masked out). Decoding ends when every row has stopped or ``max_new_tokens`` is reached.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def release(self) -> None:
        """Nothing to free: the cache of a call lives only during the call."""

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Generation:
        # compiled decoder layers (training on a GPU) run eagerly here: each decoding step's new
        # cache length would make them trace again
        with eager_layers():
            return self._generate(model, prompt_ids, params, generator)

    def _generate(
        self, model: nn.Module, prompt_ids: list[list[int]], params: SamplingParams, generator: torch.Generator | None
    ) -> Generation:
        check_prompts(prompt_ids)
        device = next(model.parameters()).device
        input_ids = pad_left(prompt_ids, self.tokenizer.pad_token_id).to(device)
        prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)

        cache_kwarg = _cache_argument_name(model)
        cache = DynamicCache()
        first = model(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            position_ids=positions_from_mask(prompt_mask),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        ).logits[:, -1]
        state = {"attention_mask": prompt_mask, "position": prompt_mask.sum(-1, keepdim=True)}

        def step(tokens: torch.Tensor, index: int) -> torch.Tensor:
            # every row gets its next slot; a stopped row's tokens are padding and never scored
            state["attention_mask"] = torch.cat([state["attention_mask"], torch.ones_like(tokens)[:, None]], dim=1)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=state["attention_mask"],
                position_ids=state["position"],
                use_cache=True,
                **{cache_kwarg: cache},
            )
            state["position"] = state["position"] + 1
            return out.logits[:, -1]

        tokens, logprobs, mask, finished = sample_responses(
            first, step, params, generator, self.tokenizer, eos_token_ids(self.tokenizer, model)
        )
        return assemble_generation(input_ids, prompt_mask, tokens, logprobs, mask, finished)
