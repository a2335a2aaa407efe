"""CISPO against a float64 reference written as loops with ``math`` scalars: loss values,
hand-derived gradients with respect to the log-probs, and no token dropped by the clip."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grape_lightning.losses import cispo_loss
from tests.losses.test_rl_losses import ragged_mask, t

TOL = dict(rtol=0.0, atol=1e-12)


def inputs(seed: int, batch: int = 7, time: int = 6):
    """Log-ratios in [-0.6, 0.6] (weights clipped at both ends for eps 0.2 / 0.28), -inf under padding."""
    rng = random.Random(seed)
    mask = ragged_mask(rng, batch, time)
    old = [[rng.uniform(-3.0, -0.1) for _ in range(time)] for _ in range(batch)]
    new = [[o + rng.uniform(-0.6, 0.6) if m else -math.inf for o, m in zip(orow, mrow)] for orow, mrow in zip(old, mask)]
    advantages = [rng.uniform(-2.0, 2.0) for _ in range(batch)]
    return new, old, advantages, mask


def loop_cispo(new, old, advantages, mask, eps_low, eps_high, num_tokens):
    """L = -sum_{i,t} w_it A_i l_it / N, w_it = clip(exp(l_it - l_old_it)); dL/dl_it = -w_it A_i / N."""
    terms, grad = [], [[0.0] * len(row) for row in new]
    for i, (nrow, orow, mrow, a) in enumerate(zip(new, old, mask, advantages)):
        for j, (l, o, m) in enumerate(zip(nrow, orow, mrow)):
            if m:
                w = min(max(math.exp(l - o), 1 - eps_low), 1 + eps_high)
                terms.append(w * a * l)
                grad[i][j] = -w * a / num_tokens
    return -math.fsum(terms) / num_tokens, grad


def run(new, old, advantages, mask, **kwargs):
    logprobs = t(new).requires_grad_()
    loss, metrics = cispo_loss(logprobs, t(old), t(advantages), t(mask).bool(), **kwargs)
    loss.backward()
    return loss, metrics, logprobs.grad


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("eps_low, eps_high", [(1.0, 0.28), (0.2, 0.28)])
def test_cispo_loss_and_gradient_match_loops(seed, eps_low, eps_high):
    new, old, advantages, mask = inputs(seed)
    loss, metrics, grad = run(new, old, advantages, mask, eps_low=eps_low, eps_high=eps_high)
    tokens = sum(map(sum, mask))
    expected, expected_grad = loop_cispo(new, old, advantages, mask, eps_low, eps_high, tokens)
    torch.testing.assert_close(loss, t(expected), **TOL)
    torch.testing.assert_close(grad, t(expected_grad), **TOL)
    ratios = [math.exp(l - o) for nrow, orow, mrow in zip(new, old, mask) for l, o, m in zip(nrow, orow, mrow) if m]
    torch.testing.assert_close(metrics["ratio_mean"], t(math.fsum(ratios) / tokens), **TOL)
    torch.testing.assert_close(metrics["clip_fraction_high"], t(sum(r > 1 + eps_high for r in ratios) / tokens), **TOL)
    torch.testing.assert_close(metrics["clip_fraction_low"], t(sum(r < 1 - eps_low for r in ratios) / tokens), **TOL)


def test_clipped_tokens_keep_their_gradient():
    """Where the clipped surrogate would drop a token (ratio out of range, advantage pushing it
    further), CISPO's gradient is the bounded weight times the advantage, never 0."""
    new, old, advantages, mask = inputs(0)
    _, metrics, grad = run(new, old, advantages, mask, eps_low=0.2, eps_high=0.28)
    assert metrics["clip_fraction_high"] > 0 and metrics["clip_fraction_low"] > 0
    real = t(mask).bool()
    assert (grad[real] != 0).all() and (grad[~real] == 0).all()


def test_default_has_no_lower_clip():
    new, old, advantages, mask = inputs(1)
    _, metrics, grad = run(new, old, advantages, mask)
    assert metrics["clip_fraction_low"] == 0 and metrics["clip_fraction_high"] > 0
    _, _, unbounded_below = run(new, old, advantages, mask, eps_low=1e9)
    torch.testing.assert_close(grad, unbounded_below, **TOL)


def test_micro_batch_losses_and_gradients_add_up():
    new, old, advantages, mask = inputs(5, batch=8)
    whole, _, whole_grad = run(new, old, advantages, mask)
    tokens = sum(map(sum, mask))
    parts = [run(new[s], old[s], advantages[s], mask[s], num_tokens=tokens) for s in (slice(0, 3), slice(3, 8))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole, **TOL)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]]), whole_grad, **TOL)
