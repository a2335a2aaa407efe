"""Fast generation: one batched prefill, then decode steps over a preallocated KV cache, replayed
as CUDA graphs on a GPU. Same interface and same results as :class:`KVCacheEngine`, which it
falls back to for models it does not support."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from grape_lightning.data.collate import pad_left
from grape_lightning.rollout.decoding import (
    assemble_generation,
    check_prompts,
    eos_token_ids,
    sample_responses,
)
from grape_lightning.rollout.engine import Generation, GenerationEngine
from grape_lightning.rollout.kv_cache_engine import KVCacheEngine
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_decoder import (
    StaticCacheDecoder,
    unsupported_reason,
    weights_fingerprint,
)


class StaticCacheEngine:
    """A :class:`~grape_lightning.rollout.engine.GenerationEngine` for Llama-family models
    (Llama, Mistral, Qwen2, Qwen3; see :mod:`~grape_lightning.rollout.static_cache_decoder`).

    - Prompts are left-padded to a multiple of ``width_multiple`` columns, so batches of similar
      prompts share one cache shape and one captured graph (the extra padding is masked out).
    - ``cuda_graphs``: on a CUDA device, each decode step is a replay of one recorded graph.
      Graphs and caches of the last ``keep`` shapes are kept (:meth:`release` frees them).
    - ``compile``: also compile the decode step with ``torch.compile`` (fewer, fused kernels;
      each new cache shape compiles once, which takes tens of seconds).
    - Finished rows: whether every row has stopped is checked every ``check_every`` steps (each
      check is a host synchronisation); the result is the same for any value.

    ``off_gpu``: what runs where there are no CUDA graphs: ``"static"`` (this engine's eager
    path) or ``"reference"`` (:class:`KVCacheEngine`; what :func:`build_engine`'s ``"auto"`` picks).

    Greedy decoding gives the tokens of :class:`KVCacheEngine` and sampling the same log-probs
    up to the rounding of the model's dtype (the two compute attention in different kernels).
    Models outside its family go to :class:`KVCacheEngine`, with one warning.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        cuda_graphs: bool = True,
        width_multiple: int = 16,
        check_every: int = 8,
        keep: int = 2,
        off_gpu: Literal["static", "reference"] = "static",
        compile: bool = False,
    ) -> None:
        if off_gpu not in ("static", "reference"):
            raise ValueError(f"off_gpu must be 'static' or 'reference', got {off_gpu!r}")
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.width_multiple = width_multiple
        self.check_every = check_every
        self.keep = keep
        self.off_gpu = off_gpu
        self.compile = compile
        self.fallback = KVCacheEngine(tokenizer)
        self._decoders: OrderedDict[tuple, StaticCacheDecoder] = OrderedDict()
        self._graph_pool: object | None = None
        self._warned = False
        self.capture_failures = 0  # batch shapes decoded without a graph because their capture failed

    def release(self) -> None:
        """Free the caches and graphs (they are rebuilt on the next call)."""
        self._decoders.clear()
        self._graph_pool = None

    def _decoder(self, model: nn.Module, batch: int, length: int, graphs: bool) -> StaticCacheDecoder:
        key = (id(model), batch, length, graphs)
        decoder = self._decoders.get(key)
        if decoder is not None and decoder.weights_fingerprint != weights_fingerprint(model):
            del self._decoders[key]  # the weights moved: the recorded graph would read stale memory
            decoder = None
        if decoder is None:
            while len(self._decoders) >= self.keep:
                self._decoders.popitem(last=False)
            decoder = StaticCacheDecoder(model, batch, length)
            if self.compile:
                decoder.compile()
            if graphs:
                self._capture(decoder)
            self._decoders[key] = decoder
        else:
            decoder.refresh_weights()  # an optimizer step changed the weights in place since the last call
        self._decoders.move_to_end(key)
        return decoder

    def _capture(self, decoder: StaticCacheDecoder) -> None:
        """Record the decoder's step as a graph; if the capture fails (it is invalidated by work
        that may not run during one, e.g. on the legacy default stream from another thread of the
        process), decode this shape without a graph: slower, the same tokens."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        try:
            decoder.capture(self._graph_pool)
        except RuntimeError as error:  # torch.AcceleratorError: cudaErrorStreamCaptureInvalidated
            decoder.graph = decoder.graph_logits = None
            self._graph_pool = None  # the failed capture's pool is not reused
            self.capture_failures += 1
            warnings.warn(f"StaticCacheEngine: CUDA graph capture failed ({str(error).splitlines()[0]}); "
                          "decoding this batch shape without a graph", stacklevel=3)

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> Generation:
        check_prompts(prompt_ids)
        width = max(len(p) for p in prompt_ids)
        padded_width = -(-width // self.width_multiple) * self.width_multiple
        length = padded_width + params.max_new_tokens
        device = next(model.parameters()).device
        if device.type != "cuda" and self.off_gpu == "reference":
            return self.fallback.generate(model, prompt_ids, params, generator)
        reason = unsupported_reason(model, length)
        if reason is not None:
            if not self._warned:
                warnings.warn(f"StaticCacheEngine: {reason}; generating with KVCacheEngine", stacklevel=2)
                self._warned = True
            return self.fallback.generate(model, prompt_ids, params, generator)

        graphs = self.cuda_graphs and device.type == "cuda"
        pad_id = self.tokenizer.pad_token_id
        input_ids = pad_left([[pad_id] * (padded_width - len(p)) + list(p) for p in prompt_ids], pad_id).to(device)
        prompt_mask = pad_left([[0] * (padded_width - len(p)) + [1] * len(p) for p in prompt_ids], 0).to(device)

        with torch.autocast(device.type, enabled=False):  # the model's own dtype; graphs and autocast's cache do not mix
            decoder = self._decoder(model, len(prompt_ids), length, graphs)
            first = decoder.prefill(input_ids, prompt_mask)
            next_position = prompt_mask.sum(-1)

            def step(tokens: torch.Tensor, index: int) -> torch.Tensor:
                return decoder.decode(tokens, next_position + index, padded_width + index)

            tokens, logprobs, mask, finished = sample_responses(
                first, step, params, generator, self.tokenizer, eos_token_ids(self.tokenizer, model), self.check_every
            )
        extra = padded_width - width  # the columns added for the shared shape go again
        return assemble_generation(input_ids[:, extra:], prompt_mask[:, extra:], tokens, logprobs, mask, finished)


def build_engine(kind: str, tokenizer: PreTrainedTokenizerBase) -> GenerationEngine:
    """The engine named by :attr:`SamplingParams.engine`: ``"auto"`` (CUDA graphs over a static
    cache on a GPU, :class:`KVCacheEngine` elsewhere), ``"static"`` (the static cache everywhere)
    or ``"reference"`` (:class:`KVCacheEngine` everywhere)."""
    if kind == "reference":
        return KVCacheEngine(tokenizer)
    if kind in ("auto", "static"):
        return StaticCacheEngine(tokenizer, off_gpu="reference" if kind == "auto" else "static")
    raise ValueError(f"engine must be 'auto', 'static' or 'reference', got {kind!r}")
