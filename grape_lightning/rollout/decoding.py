"""The token loop every generation engine shares: sample, stop rows at EOS or a stop string, feed
the sampled tokens back, and lay the result out as a :class:`Generation`.

An engine supplies the logits: those of the prompts' last tokens, and a ``step`` function that
feeds one token per row (at its next position) and returns the logits after it. How it does so
(a dynamic KV cache, a preallocated one replayed as a CUDA graph) is the engine's business.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from grape_lightning.rollout.engine import Generation
from grape_lightning.rollout.sampling import SamplingParams, sample_next_token

# step(tokens [batch], step index) -> logits [batch, vocab] after feeding ``tokens``
StepFunction = Callable[[Tensor, int], Tensor]


def check_prompts(prompt_ids: list[list[int]]) -> None:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> Tensor:
    """Every id that ends a response: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return torch.tensor(sorted(i for i in ids if i is not None), dtype=torch.long)


def stop_string_hits(tokenizer: PreTrainedTokenizerBase, responses: Tensor, active: Tensor, stop_strings: list[str]) -> Tensor:
    """[batch] bool: the active rows whose decoded tail now contains one of ``stop_strings``."""
    hit = torch.zeros_like(active)
    # Every token carries at least one character, so the last len(s) + 2 tokens hold any stop
    # string that the newest token completed (the +2 covers characters split over byte tokens).
    window = max(len(s) for s in stop_strings) + 2
    for row in active.nonzero().flatten().tolist():
        tail = tokenizer.decode(responses[row, -window:].tolist(), skip_special_tokens=True)
        hit[row] = any(s in tail for s in stop_strings)
    return hit


def sample_responses(
    first_logits: Tensor,
    step: StepFunction,
    params: SamplingParams,
    generator: torch.Generator | None,
    tokenizer: PreTrainedTokenizerBase,
    eos_ids: Tensor,
    check_every: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sample up to ``params.max_new_tokens`` tokens per row.

    A row stops after an EOS token or once its text contains a stop string; later slots are
    padding (masked out). Looking for "every row has stopped" costs a host synchronisation, so it
    happens every ``check_every`` steps (every step when stop strings are checked, which decode on
    the host anyway); the steps taken past the last stop are cut from the result, so any
    ``check_every`` returns the same tensors.

    Returns (tokens, log-probs, mask, finished): [batch, width] response tokens (pad where masked),
    the sampler's log-prob of each, the response mask, and [batch] "ended at EOS or a stop string".
    """
    batch, device = first_logits.shape[0], first_logits.device
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_ids.to(device)
    tokens_out = torch.full((batch, params.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprob_dtype = torch.promote_types(first_logits.dtype, torch.float32)  # the sampler's
    logprobs_out = torch.zeros(batch, params.max_new_tokens, dtype=logprob_dtype, device=device)
    mask_out = torch.zeros(batch, params.max_new_tokens, dtype=torch.bool, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = first_logits
    for index in range(params.max_new_tokens):
        tokens, logprobs = sample_next_token(logits, params, generator)
        tokens = torch.where(active, tokens, pad_id)
        tokens_out[:, index] = tokens
        logprobs_out[:, index] = torch.where(active, logprobs, 0.0)
        mask_out[:, index] = active

        stopped = active & torch.isin(tokens, eos_ids)
        if params.stop_strings:
            stopped |= stop_string_hits(tokenizer, tokens_out[:, : index + 1], active & ~stopped, params.stop_strings)
        finished |= stopped
        active &= ~stopped
        if index == params.max_new_tokens - 1:
            break
        if (params.stop_strings or (index + 1) % check_every == 0) and not active.any():
            break
        logits = step(tokens, index)
    width = int(mask_out.any(0).nonzero().max()) + 1  # the first step is always taken by every row
    return tokens_out[:, :width], logprobs_out[:, :width], mask_out[:, :width], finished


def assemble_generation(
    prompt_ids: Tensor, prompt_mask: Tensor, tokens: Tensor, logprobs: Tensor, mask: Tensor, finished: Tensor
) -> Generation:
    """Left-padded prompts and right-padded responses in one :class:`Generation` layout."""
    batch, prompt_width = prompt_ids.shape
    return Generation(
        input_ids=torch.cat([prompt_ids, tokens], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), mask.long()], dim=1),
        response_mask=torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), mask], dim=1),
        logprobs=torch.cat([logprobs.new_zeros(batch, prompt_width), logprobs], dim=1),
        prompt_width=prompt_width,
        finished=finished,
    )
