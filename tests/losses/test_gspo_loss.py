"""GSPO and GSPO-token against float64 references written as loops with ``math`` scalars: loss
values and hand-derived gradients with respect to the log-probs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grape_lightning.losses import gspo_loss
from tests.losses.test_rl_losses import ragged_mask, t

TOL = dict(rtol=0.0, atol=1e-12)
EPS_LOW, EPS_HIGH = 3e-4, 4e-4


def inputs(seed: int, batch: int = 7, time: int = 6, spread: float = 2e-3):
    """Log-probs a little off pi_old's (sequence ratios on both sides of GSPO's narrow clip range),
    -inf under padding, advantages of both signs, one row without a response token."""
    rng = random.Random(seed)
    mask = ragged_mask(rng, batch, time)
    mask[2] = [0] * time
    old = [[rng.uniform(-3.0, -0.1) for _ in range(time)] for _ in range(batch)]
    new = [[o + rng.uniform(-spread, spread) if m else -math.inf for o, m in zip(orow, mrow)] for orow, mrow in zip(old, mask)]
    advantages = [rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 2.0) for _ in range(batch)]
    token_advantages = [[rng.uniform(-2.0, 2.0) for _ in range(time)] for _ in range(batch)]
    return new, old, advantages, token_advantages, mask


def sequence_ratio(new_row, old_row, mask_row) -> float:
    n = sum(mask_row)
    return math.exp(math.fsum(l - o for l, o, m in zip(new_row, old_row, mask_row) if m) / n)


def clip_active(ratio: float, advantage: float) -> bool:
    """min(s A, clip(s) A) takes the constant clipped branch."""
    return (advantage > 0 and ratio > 1 + EPS_HIGH) or (advantage < 0 and ratio < 1 - EPS_LOW)


def loop_gspo(new, old, advantages, mask, num_sequences):
    """L = -(1/B) sum_i min(s_i A_i, clip(s_i) A_i); dL/dl_it = -(1/B) A_i s_i / |y_i| where the clip is off."""
    total, grad = 0.0, [[0.0] * len(row) for row in new]
    for i, (nrow, orow, mrow, a) in enumerate(zip(new, old, mask, advantages)):
        n = sum(mrow)
        if not n:
            continue
        s = sequence_ratio(nrow, orow, mrow)
        total += min(s * a, min(max(s, 1 - EPS_LOW), 1 + EPS_HIGH) * a)
        if not clip_active(s, a):
            for j, m in enumerate(mrow):
                if m:
                    grad[i][j] = -a * s / n / num_sequences
    return -total / num_sequences, grad


def loop_gspo_token(new, old, token_advantages, mask, num_sequences):
    """L = -(1/B) sum_i (1/|y_i|) sum_t min(s_it A_it, clip(s_it) A_it), s_it = s_i in value;
    dL/dl_it = -(1/B) A_it s_i / |y_i| where the clip is off (sg[.] stops every other path)."""
    total, grad = 0.0, [[0.0] * len(row) for row in new]
    for i, (nrow, orow, mrow, arow) in enumerate(zip(new, old, mask, token_advantages)):
        n = sum(mrow)
        if not n:
            continue
        s = sequence_ratio(nrow, orow, mrow)
        clipped = min(max(s, 1 - EPS_LOW), 1 + EPS_HIGH)
        total += math.fsum(min(s * a, clipped * a) for a, m in zip(arow, mrow) if m) / n
        for j, (a, m) in enumerate(zip(arow, mrow)):
            if m and not clip_active(s, a):
                grad[i][j] = -a * s / n / num_sequences
    return -total / num_sequences, grad


def run(new, advantages, old, mask, **kwargs):
    logprobs = t(new).requires_grad_()
    loss, metrics = gspo_loss(logprobs, t(old), t(advantages), t(mask).bool(), eps_low=EPS_LOW, eps_high=EPS_HIGH, **kwargs)
    loss.backward()
    return loss, metrics, logprobs.grad


@pytest.mark.parametrize("seed", range(5))
def test_gspo_loss_and_gradient_match_loops(seed):
    new, old, advantages, _, mask = inputs(seed)
    loss, metrics, grad = run(new, advantages, old, mask)
    present = sum(1 for row in mask if any(row))
    expected, expected_grad = loop_gspo(new, old, advantages, mask, present)
    torch.testing.assert_close(loss, t(expected), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)
    tokens = sum(map(sum, mask))
    ratio_sum = math.fsum(sequence_ratio(n, o, m) * sum(m) for n, o, m in zip(new, old, mask) if any(m))
    torch.testing.assert_close(metrics["ratio_mean"], t(ratio_sum / tokens), **TOL)
    clipped_high = sum(
        sum(m) for n, o, m, a in zip(new, old, mask, advantages) if any(m) and a > 0 and sequence_ratio(n, o, m) > 1 + EPS_HIGH
    )
    torch.testing.assert_close(metrics["clip_fraction_high"], t(clipped_high / tokens), **TOL)


def test_the_inputs_clip_some_sequences_and_not_others():
    """Both branches of the min are exercised: the checks above could not tell them apart otherwise."""
    states = set()
    for seed in range(5):
        new, old, advantages, _, mask = inputs(seed)
        states |= {clip_active(sequence_ratio(n, o, m), a) for n, o, m, a in zip(new, old, mask, advantages) if any(m)}
    assert states == {True, False}


@pytest.mark.parametrize("seed", range(5))
def test_gspo_token_with_per_token_advantages_matches_loops(seed):
    new, old, _, token_advantages, mask = inputs(seed)
    loss, _, grad = run(new, token_advantages, old, mask, token_level=True, num_sequences=9)
    expected, expected_grad = loop_gspo_token(new, old, token_advantages, mask, 9)
    torch.testing.assert_close(loss, t(expected), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_gspo_token_with_sequence_advantages_is_gspo(seed):
    new, old, advantages, _, mask = inputs(seed)
    sequence_loss, _, sequence_grad = run(new, advantages, old, mask)
    token_loss, _, token_grad = run(new, advantages, old, mask, token_level=True)
    broadcast_loss, _, broadcast_grad = run(new, [[a] * len(mask[0]) for a in advantages], old, mask, token_level=True)
    for loss, grad in ((token_loss, token_grad), (broadcast_loss, broadcast_grad)):
        torch.testing.assert_close(loss, sequence_loss, **TOL)
        torch.testing.assert_close(grad, sequence_grad, **TOL)


def test_micro_batch_losses_and_gradients_add_up():
    new, old, advantages, _, mask = inputs(11, batch=8)
    whole, _, whole_grad = run(new, advantages, old, mask)
    present = sum(1 for row in mask if any(row))
    parts = [run(new[s], advantages[s], old[s], mask[s], num_sequences=present) for s in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole, **TOL)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]]), whole_grad, **TOL)


def test_padding_gets_no_gradient_and_per_token_advantages_need_the_token_variant():
    new, old, advantages, token_advantages, mask = inputs(3)
    _, _, grad = run(new, advantages, old, mask)
    assert torch.isfinite(grad).all() and (grad[~t(mask).bool()] == 0).all()
    with pytest.raises(ValueError, match="token_level"):
        run(new, token_advantages, old, mask)
