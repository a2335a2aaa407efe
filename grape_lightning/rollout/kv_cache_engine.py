"""Reference generation engine: batched prefill, then token-by-token decode with a KV cache."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from grape_lightning.data.collate import pad_left
from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.rollout.engine import Generation
from grape_lightning.rollout.sampling import SamplingParams, sample_next_token


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

    def _eos_ids(self, model: nn.Module) -> Tensor:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list) else [configured])
        return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)

    def _hit_stop_string(self, responses: Tensor, active: Tensor, stop_strings: list[str]) -> Tensor:
        hit = torch.zeros_like(active)
        # Every token carries at least one character, so the last len(s) + 2 tokens hold any stop
        # string that the newest token completed (the +2 covers characters split over byte tokens).
        window = max(len(s) for s in stop_strings) + 2
        for row in active.nonzero().flatten().tolist():
            tail = self.tokenizer.decode(responses[row, -window:].tolist(), skip_special_tokens=True)
            hit[row] = any(s in tail for s in stop_strings)
        return hit

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Generation:
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        device = next(model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        input_ids = pad_left(prompt_ids, pad_id).to(device)
        attention_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)
        batch, prompt_width = input_ids.shape
        eos_ids = self._eos_ids(model).to(device)

        cache_kwarg = _cache_argument_name(model)
        cache = DynamicCache()
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        )
        next_position = attention_mask.sum(-1, keepdim=True)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens_out, logprobs_out, mask_out = [], [], []
        for step in range(params.max_new_tokens):
            tokens, logprobs = sample_next_token(out.logits[:, -1], params, generator)
            tokens = torch.where(active, tokens, pad_id)
            tokens_out.append(tokens)
            logprobs_out.append(torch.where(active, logprobs, 0.0))
            mask_out.append(active.clone())

            stopped = active & torch.isin(tokens, eos_ids)
            if params.stop_strings:
                stopped |= self._hit_stop_string(torch.stack(tokens_out, 1), active & ~stopped, params.stop_strings)
            finished |= stopped
            active &= ~stopped
            if not active.any() or step == params.max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, active.long()[:, None]], dim=1)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                use_cache=True,
                **{cache_kwarg: cache},
            )
            next_position = next_position + 1

        response_mask = torch.stack(mask_out, 1)
        response_logprobs = torch.stack(logprobs_out, 1)
        prompt_mask = pad_left([[1] * len(p) for p in prompt_ids], 0).to(device)
        return Generation(
            input_ids=torch.cat([input_ids, torch.stack(tokens_out, 1)], dim=1),
            attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
            response_mask=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), response_mask], dim=1),
            logprobs=torch.cat([response_logprobs.new_zeros(batch, prompt_width), response_logprobs], dim=1),
            prompt_width=prompt_width,
            finished=finished,
        )
