"""How far a judged rubric item can be trusted, measured against the verifiable items of its
category: agreement per (response, item), the calibration of the critic's confidence against it,
and the running estimate GRAPE's ``reliability`` weighting uses.

Agreement. For a response i and an item k that is not verifiable (judged by a critic, or scored by
a reward model) and was scored on i, with V_i the verifiable items of i's category that were
scored on i (none: no agreement is measured for i),

    v_i  = sum_{j in V_i} w_j s_ij / sum_{j in V_i} w_j     (the plain mean where those w_j are all 0)
    a_ik = 1 - |s_ik - v_i|                                  in [0, 1]

With binary scores on both sides a_ik is the yes/no agreement (1 when they agree, 0 when not); a
graded score (a local critic's P(yes) / (P(yes) + P(no))) keeps its information instead of being
cut at 0.5, and a_ik moves continuously with it. A verifiable item of weight 0 can thus serve as
a pure reference for the judged items of its category. What agreement measures is how a judged
item goes along with what the verifiers check: reliability where the item asks what they check (a
critic asked "is the answer correct?"), a correlation with correctness where it asks something
else.

Calibration. The critic's confidence c_ik should be the agreement it can expect. With B equal bins
of [0, 1] (bin b = min(floor(c B), B - 1); B = :data:`CALIBRATION_BINS`) and n pairs (i, k) of the
item with a measured agreement, the expected calibration error

    ECE_k = sum_b (n_b / n) |mean_{b} a_ik - mean_{b} c_ik| = sum_b |sum_{b} a_ik - sum_{b} c_ik| / n

is 0 for a critic whose confidence is the agreement it reaches, and up to 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CALIBRATION_BINS = 10
"""Equal-width confidence bins of the expected calibration error."""


def verifiable_reference(scores: Tensor, weights: Tensor, scored: Tensor, verifiable: Tensor) -> tuple[Tensor, Tensor]:
    """([N] v_i, [N] bool: whether response i has a scored verifiable item) as the module
    docstring defines v_i. ``scores``, ``scored`` [N, K]; ``weights``, ``verifiable`` [K]."""
    dtype = torch.promote_types(scores.dtype, torch.float64)
    reference = scored & verifiable
    has_reference = reference.any(-1)
    weighted = torch.where(reference, weights.to(dtype), 0.0)
    plain = reference.to(dtype)
    use = torch.where((weighted.sum(-1) > 0)[:, None], weighted, plain)
    values = torch.where(reference, scores.to(dtype), 0.0)
    v = (use * values).sum(-1) / use.sum(-1).clamp(min=torch.finfo(dtype).tiny)
    return torch.where(has_reference, v, 0.0), has_reference


def agreement(scores: Tensor, weights: Tensor, scored: Tensor, verifiable: Tensor) -> tuple[Tensor, Tensor]:
    """([N, K] a_ik = 1 - |s_ik - v_i|, [N, K] bool: measured) for the scored non-verifiable
    items of responses with a scored verifiable item (0 elsewhere). The items' categories need no
    mention: only the items of response i's own category apply to it (``scored``)."""
    v, has_reference = verifiable_reference(scores, weights, scored, verifiable)
    measured = scored & ~verifiable & has_reference[:, None]
    values = 1.0 - (scores.to(v.dtype) - v[:, None]).abs()
    return torch.where(measured, values, 0.0), measured


def calibration_sums(confidences: Tensor, agreements: Tensor, measured: Tensor, bins: int = CALIBRATION_BINS) -> Tensor:
    """[K, bins, 3]: per item and confidence bin, (n_b, sum_b a, sum_b c) over the measured pairs;
    sums, so the processes of a run add theirs up before :func:`expected_calibration_error`."""
    dtype = torch.promote_types(agreements.dtype, torch.float64)
    c = confidences.to(dtype)
    index = (c * bins).floor().clamp(0, bins - 1).long()
    one_hot = torch.nn.functional.one_hot(index, bins).to(dtype) * measured.to(dtype)[..., None]  # [N, K, B]
    counts = one_hot.sum(0)
    agreement_sums = (one_hot * agreements.to(dtype)[..., None]).sum(0)
    confidence_sums = (one_hot * c[..., None]).sum(0)
    return torch.stack([counts, agreement_sums, confidence_sums], dim=-1)


def expected_calibration_error(sums: Tensor) -> Tensor:
    """[K] ECE_k = sum_b |sum_b a - sum_b c| / n from :func:`calibration_sums`' [K, B, 3] (NaN for
    an item with no measured pair)."""
    count = sums[..., 0].sum(-1)
    gap = (sums[..., 1] - sums[..., 2]).abs().sum(-1)
    return torch.where(count > 0, gap / count.clamp(min=1.0), float("nan"))


class ReliabilityEstimate(nn.Module):
    """R_k, the running agreement of each rubric item with the verifiable items of its category:
    an exponential moving average over training steps of the step's mean agreement abar_k (over
    every process's responses),

        R_k <- abar_k                                  at the first step that measures k
        R_k <- momentum R_k + (1 - momentum) abar_k    at each later one

    and unchanged by a step that does not measure k. Buffers, so checkpoints carry it and a resumed
    run weights as the uninterrupted one would; a checkpoint written before the estimate existed
    loads as unmeasured.

    Args:
        num_items: K, the rubric's items (its columns).
    """

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(num_items, dtype=torch.float64))
        self.register_buffer("measured", torch.zeros(num_items, dtype=torch.bool))

    def update(self, step_agreement: Tensor, momentum: float) -> None:
        """Fold in one step's [K] mean agreement (NaN: not measured at this step)."""
        step_agreement = step_agreement.to(self.value)
        now = ~torch.isnan(step_agreement)
        moved = torch.where(self.measured, momentum * self.value + (1 - momentum) * step_agreement, step_agreement)
        self.value.copy_(torch.where(now, moved, self.value))
        self.measured.copy_(self.measured | now)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A module cast to a low precision (bf16-true, DeepSpeed's bf16) keeps the estimate in float64.
        super()._apply(fn, recurse)
        if self.value.dtype != torch.float64:
            self.value = self.value.double()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name, tensor in self.named_buffers(recurse=False):
            state_dict.setdefault(prefix + name, torch.zeros_like(tensor))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
