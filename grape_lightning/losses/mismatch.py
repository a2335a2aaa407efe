"""The sampler/trainer mismatch: truncated importance sampling and its masked variants.

The engine that samples and the trainer's forward pass compute the same policy with different
kernels and rounding (bf16, fused decode kernels), so the tokens are drawn from pi_sampler while
the loss assumes pi_old, the trainer's log-probs of the same weights. With l_old_t and l_samp_t
their log-probs of the sampled token y_t,

    delta_t = l_old_t - l_samp_t,        rho_t = exp(delta_t) = pi_old(y_t) / pi_sampler(y_t)

the correction is a per-token weight w_t, a constant of the gradient (stop-gradient), that
multiplies each token's term of the policy loss (never its KL term):

    none:           w_t = 1
    tis:            w_t = min(rho_t, C)                                  (truncated importance sampling)
    token_mask:     w_t = 1[1/C_low <= rho_t <= C]                       (drop the token)
    sequence_mask:  w_t = 1[1/C_low <= rho_i <= C],  rho_i = exp((1/|y_i|) sum_t delta_t)
                                                     (the geometric mean: drop the whole sequence)

A dropped token keeps its place in the loss's normaliser (weight 0, not absent), so the scale of
the loss does not move with the share dropped. Tokens with no sampler log-prob (NaN: GRAPE's
off-policy members, which no sampler of the run produced) are not corrected: w_t = 1.

The mismatch itself is measured on the same tokens by the k3 estimate of KL(pi_sampler || pi_old)
with samples of pi_sampler, unbiased and non-negative:

    k3_t = rho_t - 1 - delta_t
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MismatchMode = Literal["none", "tis", "token_mask", "sequence_mask"]


@dataclass
class MismatchCorrection:
    """Correction of the sampler/trainer mismatch (see the module docstring for the equations).

    Args:
        mode: ``none`` (no correction; the mismatch is still logged when both log-prob sets
            exist), ``tis`` (w_t = min(rho_t, C)), ``token_mask`` (drop tokens whose ratio leaves
            [1/C_low, C]) or ``sequence_mask`` (drop sequences whose geometric-mean ratio leaves it).
            Any mode but ``none`` has pi_old's log-probs recomputed by the trainer.
        cap: C, the truncation of ``tis`` and the upper bound of the masks' band (>= 1).
        cap_low: C_low, the masks drop ratios below 1 / C_low (>= 1; None: C).
    """

    mode: MismatchMode = "none"
    cap: float = 2.0
    cap_low: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MismatchMode.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"mismatch.mode must be one of {MismatchMode.__args__}, got {self.mode!r}")  # type: ignore[attr-defined]
        if not self.cap >= 1.0:
            raise ValueError(f"mismatch.cap must be >= 1 (the band holds ratio 1), got {self.cap}")
        if self.cap_low is not None and not self.cap_low >= 1.0:
            raise ValueError(f"mismatch.cap_low must be >= 1 (the band holds ratio 1), got {self.cap_low}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def low(self) -> float:
        """1 / C_low, the lower bound of the masks' band."""
        return 1.0 / (self.cap if self.cap_low is None else self.cap_low)


def sampled_tokens(sampling_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The tokens of ``mask`` that have a sampler log-prob (not NaN)."""
    return mask.bool() & ~torch.isnan(sampling_logprobs)


def mismatch_log_ratio(old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor) -> Tensor:
    """delta_t = l_old_t - l_samp_t on the sampled tokens of ``mask``, 0 elsewhere (float64)."""
    return torch.where(sampled_tokens(sampling_logprobs, mask), old_logprobs.double() - sampling_logprobs.double(), 0.0)


@torch.no_grad()
def correction_weights(old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, config: MismatchCorrection) -> Tensor:
    """w_t [batch, time] of ``config.mode`` in ``old_logprobs``' dtype, without gradient; 1 on the
    tokens it does not correct (outside ``mask``, no sampler log-prob)."""
    sampled = sampled_tokens(sampling_logprobs, mask)
    delta = mismatch_log_ratio(old_logprobs, sampling_logprobs, mask)
    ratio = delta.exp()
    if config.mode == "none":
        weights = torch.ones_like(ratio)
    elif config.mode == "tis":
        weights = ratio.clamp(max=config.cap)
    elif config.mode == "token_mask":
        weights = ((ratio >= config.low) & (ratio <= config.cap)).double()
    else:  # sequence_mask
        lengths = sampled.sum(-1).clamp(min=1)
        sequence_ratio = (delta.sum(-1) / lengths).exp()
        weights = ((sequence_ratio >= config.low) & (sequence_ratio <= config.cap)).double()[:, None].expand_as(ratio)
    return torch.where(sampled, weights, 1.0).to(old_logprobs.dtype)


@torch.no_grad()
def mismatch_statistics(
    old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor, config: MismatchCorrection
) -> tuple[Tensor, Tensor]:
    """The mismatch over the sampled tokens of ``mask``, as quantities that reduce over processes:

        sums   = [n, sum_t k3_t, corrected]      (float64; corrected: tokens with w_t != 1, i.e.
                                                  truncated by ``tis`` or dropped by a mask)
        maxima = [max_t rho_t, max_t |delta_t|]  (0 for no token)

    so ``mismatch_kl`` = sum k3 / n and the share corrected = corrected / n.
    """
    sampled = sampled_tokens(sampling_logprobs, mask)
    delta = mismatch_log_ratio(old_logprobs, sampling_logprobs, mask)
    ratio = delta.exp()
    k3 = torch.where(sampled, ratio - 1.0 - delta, 0.0)
    corrected = (correction_weights(old_logprobs.double(), sampling_logprobs, mask, config) != 1.0) & sampled
    sums = torch.stack([sampled.sum().double(), k3.sum(), corrected.sum().double()])
    if not ratio.numel():
        return sums, torch.zeros(2, dtype=torch.float64, device=ratio.device)
    maxima = torch.stack([torch.where(sampled, ratio, 0.0).amax(), torch.where(sampled, delta.abs(), 0.0).amax()])
    return sums, maxima
