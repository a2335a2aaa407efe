"""Sampling parameters and the next-token samplers (temperature, top-k, top-p): by
``torch.multinomial`` over the probabilities, or by the Gumbel-max trick (no host synchronisation,
nothing data-dependent: it can be recorded in a CUDA graph)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How responses are sampled.

    ``temperature=0`` is greedy decoding. The log-prob returned for a sampled token is
    ``log softmax(logits / temperature)`` (``temperature=1`` for greedy), *before* top-k / top-p
    truncation, which is the distribution the training loss evaluates.

    ``engine`` picks the generation backend (see
    :func:`~grape_lightning.rollout.static_cache_engine.build_engine`): ``"auto"`` replays CUDA
    graphs over a static KV cache on a GPU and uses the reference engine on CPU; ``"static"``
    and ``"reference"`` force one of them.

    Args:
        max_new_tokens: most tokens generated per response.
        temperature: softmax temperature (0: greedy decoding).
        top_p: nucleus sampling: keep the smallest set of tokens with this much probability (1: off).
        top_k: keep only the k most likely tokens (0: off).
        stop_strings: a response ends after any of these strings (besides the EOS token).
        engine: generation backend: ``auto``, ``static`` (CUDA-graph static KV cache) or ``reference``.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] = field(default_factory=list)
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "static", "reference"):
            raise ValueError(f"engine must be 'auto', 'static' or 'reference', got {self.engine!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else self.temperature


def _truncate(scaled_logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf (at least one token always survives)."""
    if top_k > 0 and top_k < scaled_logits.shape[-1]:
        kth = torch.topk(scaled_logits, top_k, dim=-1).values[..., -1:]
        scaled_logits = scaled_logits.masked_fill(scaled_logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled_logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled_logits = scaled_logits.masked_fill(drop, float("-inf"))
    return scaled_logits


def sample_next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw one token per row from [batch, vocab] logits; returns (tokens [batch], log-probs [batch])."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logprobs = torch.log_softmax(logits / params.logprob_temperature, dim=-1)
    if params.greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = _truncate(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def gumbel_max_next_token(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None, temperature: Tensor | None = None,
    pick=None,
) -> tuple[Tensor, Tensor]:
    """:func:`sample_next_token`'s distribution drawn by the Gumbel-max trick.

    With ``f = truncate(z / T)`` (top-k / top-p logits set to -inf) and ``E_i ~ Exp(1)`` i.i.d.,

        argmax_i (f_i - log E_i) = argmax_i (log softmax(f)_i + G_i),   G_i = -log E_i ~ Gumbel(0, 1),

    is an exact sample of softmax(f): token i wins with probability exp(f_i) / sum_j exp(f_j).
    Greedy decoding is argmax_i z_i. The log-prob returned is log softmax(z / T_lp)_token, with
    T_lp = :attr:`SamplingParams.logprob_temperature`, as :func:`sample_next_token` returns it.

    ``temperature``: T_lp as a tensor of shape [1], read when the kernels run rather than when
    they are launched, so that a recorded graph follows a new temperature (it must hold
    ``params.logprob_temperature``); by default it is made from ``params``. ``pick``:
    :func:`gumbel_max_pick` or a compiled version of it (the draw of E stays outside, from
    ``generator``).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if temperature is None:
        temperature = torch.full((1,), params.logprob_temperature, dtype=dtype, device=logits.device)
    noise = None
    if not params.greedy:
        noise = torch.empty(logits.shape, dtype=dtype, device=logits.device).exponential_(generator=generator)
        if noise.device.type != "cuda":  # the CPU draw can be exactly 0 (log 0 = -inf); CUDA's never is
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (pick or gumbel_max_pick)(logits, noise, temperature, params.top_k, params.top_p)


def gumbel_max_pick(logits: Tensor, noise: Tensor | None, temperature: Tensor, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """(argmax_i (truncate(z / T)_i - log E_i), log softmax(z / T)_token) for [batch, vocab] logits
    ``z`` and draws ``E`` (None: greedy, argmax_i z_i); elementwise work and row reductions only,
    which ``torch.compile`` fuses into a few kernels."""
    scaled = logits / temperature  # a [1] tensor takes part in type promotion: one kernel to float32
    # log softmax(z / T)_token = (z / T)_token - logsumexp(z / T): a row reduction, no [batch, vocab] output
    log_normaliser = torch.logsumexp(scaled, dim=-1)
    if noise is None:
        tokens = scaled.argmax(dim=-1)
    else:
        tokens = (_truncate(scaled, top_k, top_p) - noise.log_()).argmax(dim=-1)  # E is drawn per call: its log in place
    return tokens, scaled.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normaliser
