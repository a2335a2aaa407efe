"""The sampler/trainer mismatch correction against float64 loops with ``math`` scalars: the weights
of every mode, the logged statistics, and the weighted policy terms of GRPO, GSPO, CISPO and
REINFORCE (loss values and hand-derived gradients with respect to the log-probs)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grape_lightning.losses import cispo_loss, grpo_loss, gspo_loss, reinforce_loss
from grape_lightning.losses.mismatch import MismatchCorrection, correction_weights, mismatch_statistics
from tests.losses.test_rl_losses import loop_aggregate, ragged_mask, t

TOL = dict(rtol=0.0, atol=1e-12)
MODES = ["none", "tis", "token_mask", "sequence_mask"]


def inputs(seed: int, batch: int = 8, time: int = 7):
    """pi_old's and the sampler's log-probs, far enough apart (a shift per row up to 0.9 and per token
    up to 0.6) that token and sequence ratios leave [1/2, 2] at both ends; row 2 has no sampler log-probs (NaN: an off-policy member); padding
    holds garbage (-inf, NaN) that must not leak in."""
    rng = random.Random(seed)
    mask = ragged_mask(rng, batch, time)
    old = [[rng.uniform(-3.0, -0.1) if m else -math.inf for m in row] for row in mask]
    shifts = [rng.uniform(-0.9, 0.9) for _ in mask]
    sampling = [
        [o - shift - rng.uniform(-0.6, 0.6) if m else math.nan for o, m in zip(orow, mrow)] for orow, mrow, shift in zip(old, mask, shifts)
    ]
    sampling[2] = [math.nan] * time
    return old, sampling, mask


def loop_weights(old, sampling, mask, mode, cap, cap_low):
    """w_t per the module docstring, 1 where not corrected (padding, no sampler log-prob)."""
    low = 1.0 / (cap if cap_low is None else cap_low)
    weights = []
    for orow, srow, mrow in zip(old, sampling, mask):
        sampled = [bool(m) and not math.isnan(s) for s, m in zip(srow, mrow)]
        deltas = [o - s for o, s, on in zip(orow, srow, sampled) if on]
        sequence_ratio = math.exp(math.fsum(deltas) / len(deltas)) if deltas else 1.0
        row = []
        for o, s, on in zip(orow, srow, sampled):
            if not on or mode == "none":
                row.append(1.0)
            elif mode == "tis":
                row.append(min(math.exp(o - s), cap))
            elif mode == "token_mask":
                row.append(1.0 if low <= math.exp(o - s) <= cap else 0.0)
            else:
                row.append(1.0 if low <= sequence_ratio <= cap else 0.0)
        weights.append(row)
    return weights


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cap, cap_low", [(2.0, None), (1.5, 3.0)])
def test_weights_match_loops(seed, mode, cap, cap_low):
    old, sampling, mask = inputs(seed)
    config = MismatchCorrection(mode=mode, cap=cap, cap_low=cap_low)
    weights = correction_weights(t(old), t(sampling), t(mask).bool(), config)
    expected = loop_weights(old, sampling, mask, mode, cap, cap_low)
    torch.testing.assert_close(weights, t(expected), **TOL)
    assert not weights.requires_grad and weights.dtype == torch.float64
    if mode != "none":  # the band or the cap acts on these inputs: the test is not between ones
        assert (weights != 1).any()
    assert (weights[2] == 1).all()  # no sampler log-probs: not corrected


def test_sequence_mask_drops_whole_sequences_and_token_mask_single_tokens():
    old = torch.full((2, 3), -1.0, dtype=torch.float64)
    # row 0: one far token (ratio e^1.5 = 4.5), geometric mean e^0.5 = 1.65;
    # row 1: every token a little off (ratio e^0.6 = 1.82 each), geometric mean 1.82
    sampling = old - t([[1.5, 0.0, 0.0], [0.6, 0.6, 0.6]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    token = correction_weights(old, sampling, mask, MismatchCorrection("token_mask", cap=2.0))
    assert token.tolist() == [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    sequence = correction_weights(old, sampling, mask, MismatchCorrection("sequence_mask", cap=1.7))
    assert sequence.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    tis = correction_weights(old, sampling, mask, MismatchCorrection("tis", cap=2.0))
    torch.testing.assert_close(tis, t([[2.0, 1.0, 1.0], [math.exp(0.6)] * 3]), **TOL)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
def test_statistics_match_loops(seed, mode):
    old, sampling, mask = inputs(seed)
    config = MismatchCorrection(mode=mode)
    sums, maxima = mismatch_statistics(t(old), t(sampling), t(mask).bool(), config)
    weights = loop_weights(old, sampling, mask, mode, 2.0, None)
    k3, ratios, deltas, corrected = [], [], [], 0
    for orow, srow, mrow, wrow in zip(old, sampling, mask, weights):
        for o, s, m, w in zip(orow, srow, mrow, wrow):
            if m and not math.isnan(s):
                delta = o - s
                k3.append(math.exp(delta) - 1.0 - delta)
                ratios.append(math.exp(delta))
                deltas.append(abs(delta))
                corrected += w != 1.0
    torch.testing.assert_close(sums, t([float(len(k3)), math.fsum(k3), float(corrected)]), **TOL)
    torch.testing.assert_close(maxima, t([max(ratios), max(deltas)]), **TOL)
    assert (corrected > 0) == (mode != "none")


def test_statistics_of_identical_log_probs_are_zero_and_of_no_token_empty():
    old, _, mask = inputs(0)
    sums, maxima = mismatch_statistics(t(old), t(old), t(mask).bool(), MismatchCorrection("tis"))
    assert sums[1] == 0 and sums[2] == 0 and maxima.tolist() == [1.0, 0.0]
    sums, maxima = mismatch_statistics(t(old), t(old), torch.zeros(len(old), len(old[0]), dtype=torch.bool), MismatchCorrection())
    assert sums.tolist() == [0.0, 0.0, 0.0] and maxima.tolist() == [0.0, 0.0]


def test_bad_configuration_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="mismatch.mode"):
        MismatchCorrection(mode="truncate")
    with pytest.raises(ValueError, match="mismatch.cap must be >= 1"):
        MismatchCorrection(mode="tis", cap=0.5)
    with pytest.raises(ValueError, match="mismatch.cap_low"):
        MismatchCorrection(mode="token_mask", cap_low=0.9)


# ----------------------------------------------------------------------------------------------
# The weighted losses
# ----------------------------------------------------------------------------------------------


def policy_inputs(seed: int):
    """Current log-probs (log-ratios to pi_old in [-0.4, 0.4]: clips active for eps 0.2), pi_old's,
    per-sequence advantages, per-token weights in [0, 2], the mask, and a reference."""
    old, _, mask = inputs(seed)
    rng = random.Random(seed + 100)
    new = [[o + rng.uniform(-0.4, 0.4) if m else -math.inf for o, m in zip(orow, mrow)] for orow, mrow in zip(old, mask)]
    old = [[o if m else 0.0 for o, m in zip(orow, mrow)] for orow, mrow in zip(old, mask)]
    advantages = [rng.uniform(-2.0, 2.0) for _ in mask]
    weights = [[rng.choice([0.0, rng.uniform(0.0, 2.0)]) for _ in row] for row in mask]
    ref = [[o + rng.uniform(-0.5, 0.5) for o in orow] for orow in old]
    return new, old, advantages, weights, mask, ref


def clipped_term(l, o, a, eps_low, eps_high):
    """(-min(rho A, clip(rho) A), its derivative in l)."""
    rho = math.exp(l - o)
    unclipped, clipped = rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a
    return (-unclipped, -rho * a) if unclipped <= clipped else (-clipped, 0.0)


def grad_of(loss_fn, new):
    logprobs = t(new).requires_grad_()
    loss, metrics = loss_fn(logprobs)
    loss.backward()
    return loss.detach(), logprobs.grad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_weights_the_policy_term_and_not_the_kl(seed, aggregation):
    """L = agg[-w min(rho A, clip(rho) A)] + beta agg[k3]; dL/dl_it of the policy part = w_it times
    the unweighted one; the KL part is the same with and without weights."""
    new, old, advantages, weights, mask, ref = policy_inputs(seed)
    terms = [[clipped_term(l, o, a, 0.2, 0.2) for l, o in zip(nrow, orow)] for nrow, orow, a in zip(new, old, advantages)]
    weighted = [[w * term[0] for w, term in zip(wrow, trow)] for wrow, trow in zip(weights, terms)]
    expected = loop_aggregate(weighted, mask, aggregation)
    tokens = sum(map(sum, mask))
    expected_grad = [
        [w * term[1] * (1.0 / (len(mask) * sum(mrow)) if aggregation == "sequence" else 1.0 / tokens) if m else 0.0
         for w, term, m in zip(wrow, trow, mrow)]
        for wrow, trow, mrow in zip(weights, terms, mask)
    ]

    def loss_fn(logprobs, weights=t(weights), beta=0.0, ref=None):
        return grpo_loss(logprobs, t(old), t(advantages), t(mask).bool(), aggregation=aggregation, token_weights=weights, beta=beta, ref_logprobs=ref)

    loss, grad = grad_of(loss_fn, new)
    torch.testing.assert_close(loss, t(expected), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)
    with_kl, _ = grad_of(lambda lp: loss_fn(lp, beta=0.1, ref=t(ref)), new)
    without_weights, _ = grad_of(lambda lp: loss_fn(lp, weights=None), new)
    with_kl_without_weights, _ = grad_of(lambda lp: loss_fn(lp, weights=None, beta=0.1, ref=t(ref)), new)
    torch.testing.assert_close(with_kl - loss, with_kl_without_weights - without_weights, **TOL)
    assert abs(float((loss - without_weights).detach())) > 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_cispo_weights_multiply_the_clipped_weight(seed):
    new, old, advantages, weights, mask, _ = policy_inputs(seed)
    tokens = sum(map(sum, mask))
    terms, expected_grad = [], [[0.0] * len(row) for row in new]
    for i, (nrow, orow, wrow, mrow) in enumerate(zip(new, old, weights, mask)):
        for j, (l, o, w, m) in enumerate(zip(nrow, orow, wrow, mrow)):
            if m:
                clipped = min(max(math.exp(l - o), 0.0), 1.28)
                terms.append(w * clipped * advantages[i] * l)
                expected_grad[i][j] = -w * clipped * advantages[i] / tokens
    loss, grad = grad_of(lambda lp: cispo_loss(lp, t(old), t(advantages), t(mask).bool(), token_weights=t(weights)), new)
    torch.testing.assert_close(loss, t(-math.fsum(terms) / tokens), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("token_level", [False, True])
def test_gspo_weights_the_per_token_terms(seed, token_level):
    """L = -(1/B) sum_i (1/|y_i|) sum_t w_it min(s_i A_i, clip(s_i) A_i); dL/dl_it = -w_it s_i A_i / (B |y_i|)
    where the sequence's clip is not active, 0 where it is."""
    new, old, advantages, weights, mask, _ = policy_inputs(seed)
    eps_low, eps_high = 0.05, 0.08
    batch = sum(1 for mrow in mask if any(mrow))
    per_sequence, expected_grad = [], [[0.0] * len(row) for row in new]
    for i, (nrow, orow, wrow, mrow) in enumerate(zip(new, old, weights, mask)):
        n = sum(mrow)
        deltas = [l - o for l, o, m in zip(nrow, orow, mrow) if m]
        s = math.exp(math.fsum(deltas) / n)
        a = advantages[i]
        unclipped, clipped = s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a
        mean_weight = math.fsum(w for w, m in zip(wrow, mrow) if m) / n
        per_sequence.append(min(unclipped, clipped) * mean_weight)
        for j, (w, m) in enumerate(zip(wrow, mrow)):
            if m and unclipped <= clipped:
                expected_grad[i][j] = -w * s * a / (batch * n)
    loss, grad = grad_of(lambda lp: gspo_loss(
        lp, t(old), t(advantages), t(mask).bool(), eps_low=eps_low, eps_high=eps_high, token_level=token_level, token_weights=t(weights),
    ), new)
    torch.testing.assert_close(loss, t(-math.fsum(per_sequence) / batch), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)
    # unit weights: GSPO's loss and gradient
    ones = [[1.0] * len(row) for row in new]
    unit, unit_grad = grad_of(lambda lp: gspo_loss(lp, t(old), t(advantages), t(mask).bool(), eps_low=eps_low, eps_high=eps_high, token_weights=t(ones)), new)
    plain, plain_grad = grad_of(lambda lp: gspo_loss(lp, t(old), t(advantages), t(mask).bool(), eps_low=eps_low, eps_high=eps_high), new)
    torch.testing.assert_close(unit, plain, **TOL)
    torch.testing.assert_close(unit_grad, plain_grad, **TOL)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("per_token", [False, True])
def test_reinforce_with_per_token_advantages_and_weights(seed, per_token):
    """L = -(1/B) sum_{i,t} w_it A_it l_it; dL/dl_it = -w_it A_it / B."""
    new, _, advantages, weights, mask, _ = policy_inputs(seed)
    rng = random.Random(seed)
    token_advantages = [[rng.uniform(-2, 2) for _ in row] for row in mask] if per_token else [[a] * len(mask[0]) for a in advantages]
    batch = len(mask)
    terms, expected_grad = [], [[0.0] * len(row) for row in new]
    for i, (nrow, arow, wrow, mrow) in enumerate(zip(new, token_advantages, weights, mask)):
        for j, (l, a, w, m) in enumerate(zip(nrow, arow, wrow, mrow)):
            if m:
                terms.append(w * a * l)
                expected_grad[i][j] = -w * a / batch
    given = t(token_advantages) if per_token else t(advantages)
    loss, grad = grad_of(lambda lp: reinforce_loss(lp, given, t(mask).bool(), token_weights=t(weights)), new)
    torch.testing.assert_close(loss, t(-math.fsum(terms) / batch), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)
