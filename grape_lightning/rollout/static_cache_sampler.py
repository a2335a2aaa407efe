"""A whole generation step on the device, for :class:`~grape_lightning.rollout.static_cache_engine.StaticCacheEngine`:
the decoder's forward pass, the Gumbel-max draw of the next token, and the bookkeeping of stopped
rows, over fixed tensors. On a GPU one CUDA graph replay does all of it; the host only replays, and
every ``check_every`` steps looks whether every row has stopped (its one synchronisation).

The loop is :func:`~grape_lightning.rollout.decoding.sample_responses`'s, moved onto the device:
the token of response column j is drawn from the logits after column j - 1 (the prompt's for
j = 0); a row stops after an EOS token, and its later columns are padding (pad token, log-prob 0,
masked out), fed to the model as the reference loop feeds them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from grape_lightning.rollout.sampling import SamplingParams, gumbel_max_next_token, gumbel_max_pick
from grape_lightning.rollout.static_cache_decoder import StaticCacheDecoder


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A seed for the sampler's own generator, drawn from the caller's (the device's default one
    if None), so that a seeded call repeats and successive calls differ."""
    if generator is not None:
        device = generator.device
    return int(torch.randint(2**62, (1,), generator=generator, device=device))


class StaticCacheSampler:
    """Generation over a :class:`StaticCacheDecoder` for one sampling structure.

    What a recorded graph fixes is part of :meth:`key`: greedy or not, top-k, top-p, the EOS ids
    and the pad id. The temperature lives in a tensor (a new one is seen by the next replay), and
    the Gumbel noise comes from :attr:`generator`, registered with the graph (each replay draws at
    the generator's current offset and advances it) and seeded at each call from the caller's
    generator.

    Response column j is kept in column ``padded_width + j`` of the [batch, length] buffers, i.e.
    the token drawn after feeding cache slot s is written to column s + 1, the slot it is fed to.
    """

    def __init__(self, decoder: StaticCacheDecoder, params: SamplingParams, eos_ids: Tensor, pad_id: int) -> None:
        self.decoder = decoder
        self.params = params  # only its structure is used (see key); the temperature is read from self.temperature
        device, batch, length = decoder.device, decoder.batch, decoder.length
        self.logprob_dtype = torch.promote_types(decoder.dtype, torch.float32)
        self.eos_ids = eos_ids.to(device)
        self.pad_id = pad_id
        self.temperature = torch.ones(1, dtype=self.logprob_dtype, device=device)  # T_lp
        self.generator = torch.Generator(device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)  # not stopped yet; finished = ~active at the end
        self.tokens = torch.full((batch, length), pad_id, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch, length, dtype=self.logprob_dtype, device=device)
        self.mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pick = gumbel_max_pick

    def compile(self) -> None:
        """Compile the draw (scaling, log-softmax, truncation, Gumbel argmax: one pass or two over
        the [batch, vocab] logits instead of one a kernel); the draws of E stay eager."""
        self.pick = torch.compile(gumbel_max_pick, dynamic=False)

    @staticmethod
    def key(params: SamplingParams, eos_ids: Tensor, pad_id: int) -> tuple:
        """What a recorded step depends on besides the temperature."""
        return params.greedy, params.top_k, params.top_p, tuple(eos_ids.tolist()), pad_id

    def _take(self, logits: Tensor) -> None:
        """Draw the token after cache slot s from ``logits``, record it in column s + 1, stop the
        rows it ends, and set it as the next step's input (at the next slot and position)."""
        decoder = self.decoder
        tokens, logprobs = gumbel_max_next_token(logits, self.params, self.generator, self.temperature, self.pick)
        tokens = torch.where(self.active, tokens, self.pad_id)
        decoder.slot.add_(1)  # column s + 1 is the next step's slot
        self.tokens.index_copy_(1, decoder.slot, tokens[:, None])
        self.logprobs.index_copy_(1, decoder.slot, torch.where(self.active, logprobs, 0.0)[:, None])
        self.mask.index_copy_(1, decoder.slot, self.active[:, None])
        # a row is finished exactly when it is no longer active: it stops only at an EOS token here
        self.active &= torch.isin(tokens, self.eos_ids, invert=True)
        decoder.tokens.copy_(tokens)
        decoder.positions.add_(1)

    def _step(self) -> None:
        self._take(self.decoder.step())

    def capture(self, pool: object | None = None) -> None:
        """Record :meth:`_step` as a CUDA graph (before the decoder's prefill: warming up writes a slot)."""
        self.decoder.slot.fill_(0)  # the warm-up steps write columns 1 and 2 (the buffers are reset by run)
        self.graph, _ = self.decoder.record(self._step, pool, self.generator)

    def run(
        self,
        first_logits: Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        next_position: Tensor,
        padded_width: int,
        check_every: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:func:`~grape_lightning.rollout.decoding.sample_responses`'s result for prompts whose
        prefill (``padded_width`` slots) gave ``first_logits``; ``next_position``: [batch] each
        row's first response position."""
        if self.key(params, self.eos_ids, self.pad_id) != self.key(self.params, self.eos_ids, self.pad_id):
            raise ValueError("these sampling settings need a sampler of their own (StaticCacheSampler.key)")
        decoder = self.decoder
        if not params.greedy:
            self.generator.manual_seed(draw_seed(generator, decoder.device))
        self.temperature.fill_(params.logprob_temperature)
        self.active.fill_(True)
        self.tokens.fill_(self.pad_id)
        self.logprobs.zero_()
        self.mask.zero_()
        decoder.slot.fill_(padded_width - 1)  # the first token comes from the prompt's last slot
        decoder.positions.copy_(next_position - 1)
        self._take(first_logits)
        for index in range(params.max_new_tokens - 1):
            if (index + 1) % check_every == 0 and not bool(self.active.any()):  # the loop's one host synchronisation
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        columns = slice(padded_width, padded_width + params.max_new_tokens)
        mask = self.mask[:, columns]
        width = int(mask.any(0).nonzero().max()) + 1  # the first token is taken by every row
        return (self.tokens[:, columns][:, :width].clone(), self.logprobs[:, columns][:, :width].clone(),
                mask[:, :width].clone(), ~self.active)
