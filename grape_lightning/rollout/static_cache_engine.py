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
from grape_lightning.rollout.static_cache_sampler import StaticCacheSampler


class StaticCacheEngine:
    """A :class:`~grape_lightning.rollout.engine.GenerationEngine` for Llama-family models
    (Llama, Mistral, Qwen2, Qwen3; see :mod:`~grape_lightning.rollout.static_cache_decoder`).

    - Prompts are left-padded to a multiple of ``width_multiple`` columns, so batches of similar
      prompts share one cache shape and one captured graph (the extra padding is masked out).
    - ``cuda_graphs``: on a CUDA device, each decode step is a replay of one recorded graph.
      Graphs and caches of the last ``keep`` shapes are kept (:meth:`release` frees them).
    - ``compile``: also compile the decode step with ``torch.compile`` (fewer, fused kernels;
      each new cache shape compiles once, which takes tens of seconds), and the Gumbel-max draw.
    - ``sampler``: how tokens are drawn. ``"gumbel"``: by the Gumbel-max trick, on the device, in
      the same graph as the decode step, together with the stop bookkeeping
      (:class:`~grape_lightning.rollout.static_cache_sampler.StaticCacheSampler`); the host only
      replays. ``"multinomial"``: :func:`~grape_lightning.rollout.sampling.sample_next_token`
      after each step, on the host's side of the graph (the reference engine's draws: with the
      same generator, the same tokens). ``"auto"``: ``"gumbel"`` on a CUDA device, else
      ``"multinomial"``. Both draw from the same distribution; stop strings (decoded on the host)
      always take ``"multinomial"``.
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
        sampler: Literal["auto", "gumbel", "multinomial"] = "auto",
    ) -> None:
        if off_gpu not in ("static", "reference"):
            raise ValueError(f"off_gpu must be 'static' or 'reference', got {off_gpu!r}")
        if sampler not in ("auto", "gumbel", "multinomial"):
            raise ValueError(f"sampler must be 'auto', 'gumbel' or 'multinomial', got {sampler!r}")
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.width_multiple = width_multiple
        self.check_every = check_every
        self.keep = keep
        self.off_gpu = off_gpu
        self.compile = compile
        self.sampler = sampler
        self.fallback = KVCacheEngine(tokenizer)
        self._decoders: OrderedDict[tuple, StaticCacheDecoder] = OrderedDict()
        self._samplers: dict[tuple, StaticCacheSampler] = {}  # (decoder key, sampler key) -> its sampler
        self._logits_graph_tried: set[tuple] = set()  # decoder keys whose plain decode step was recorded (or failed to)
        self._graph_pool: object | None = None
        self._warned = False
        self.capture_failures = 0  # batch shapes decoded without a graph because their capture failed

    def release(self) -> None:
        """Free the caches and graphs (they are rebuilt on the next call)."""
        self._decoders.clear()
        self._samplers.clear()
        self._logits_graph_tried.clear()
        self._graph_pool = None

    def _forget(self, key: tuple) -> None:
        """Drop a decoder and what was recorded over it."""
        self._decoders.pop(key, None)
        self._logits_graph_tried.discard(key)
        for sampler_key in [k for k in self._samplers if k[0] == key]:
            del self._samplers[sampler_key]

    def _decoder(self, model: nn.Module, batch: int, length: int, graphs: bool) -> tuple[tuple, StaticCacheDecoder]:
        key = (id(model), batch, length, graphs)
        decoder = self._decoders.get(key)
        if decoder is not None and decoder.weights_fingerprint != weights_fingerprint(model):
            self._forget(key)  # the weights moved: a recorded graph would read stale memory
            decoder = None
        if decoder is None:
            while len(self._decoders) >= self.keep:
                self._forget(next(iter(self._decoders)))
            decoder = StaticCacheDecoder(model, batch, length)
            if self.compile:
                decoder.compile()
            self._decoders[key] = decoder
        else:
            decoder.refresh_weights()  # an optimizer step changed the weights in place since the last call
        self._decoders.move_to_end(key)
        return key, decoder

    def _logits_graph(self, key: tuple, decoder: StaticCacheDecoder) -> None:
        """Record the plain decode step (for the multinomial sampler), once per decoder."""
        if key not in self._logits_graph_tried:
            self._logits_graph_tried.add(key)
            self._capture(decoder.capture, decoder)

    def _sampler(self, key: tuple, decoder: StaticCacheDecoder, params: SamplingParams, eos_ids: torch.Tensor,
                 graphs: bool) -> StaticCacheSampler:
        """The sampler of this decoder and sampling structure, its step recorded on first use."""
        pad_id = self.tokenizer.pad_token_id
        sampler_key = (key, StaticCacheSampler.key(params, eos_ids, pad_id))
        sampler = self._samplers.get(sampler_key)
        if sampler is None:
            sampler = StaticCacheSampler(decoder, params, eos_ids, pad_id)
            if self.compile:
                sampler.compile()
            if graphs:
                self._capture(sampler.capture, sampler)
            self._samplers[sampler_key] = sampler
        return sampler

    def _capture(self, capture, holder) -> None:
        """Record a step as a graph (``capture(pool)`` sets ``holder.graph``); if the capture fails
        (it is invalidated by work that may not run during one, e.g. on the legacy default stream
        from another thread of the process), run that step without a graph: slower, the same tokens."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        try:
            capture(self._graph_pool)
        except RuntimeError as error:  # torch.AcceleratorError: cudaErrorStreamCaptureInvalidated
            holder.graph = None
            if isinstance(holder, StaticCacheDecoder):
                holder.graph_logits = None
            self._graph_pool = None  # the failed capture's pool is not reused
            self.capture_failures += 1
            warnings.warn(f"StaticCacheEngine: CUDA graph capture failed ({str(error).splitlines()[0]}); "
                          "decoding this batch shape without a graph", stacklevel=3)

    def _uses_gumbel(self, params: SamplingParams, device: torch.device) -> bool:
        if params.stop_strings:
            return False
        return self.sampler == "gumbel" or (self.sampler == "auto" and device.type == "cuda")

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

        eos_ids = eos_token_ids(self.tokenizer, model)
        with torch.autocast(device.type, enabled=False):  # the model's own dtype; graphs and autocast's cache do not mix
            key, decoder = self._decoder(model, len(prompt_ids), length, graphs)
            if self._uses_gumbel(params, device):
                sampler = self._sampler(key, decoder, params, eos_ids, graphs)  # recorded before the prefill writes the cache
                first = decoder.prefill(input_ids, prompt_mask)
                tokens, logprobs, mask, finished = sampler.run(
                    first, params, generator, prompt_mask.sum(-1), padded_width, self.check_every
                )
            else:
                if graphs:
                    self._logits_graph(key, decoder)
                first = decoder.prefill(input_ids, prompt_mask)
                next_position = prompt_mask.sum(-1)

                def step(tokens: torch.Tensor, index: int) -> torch.Tensor:
                    return decoder.decode(tokens, next_position + index, padded_width + index)

                tokens, logprobs, mask, finished = sample_responses(
                    first, step, params, generator, self.tokenizer, eos_ids, self.check_every
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
