"""On-policy distillation against float64 references: the loss and its gradient with respect to
the log-probs as loops with ``math`` scalars, and the estimator's expected gradient, enumerated over
every response of a two-token tabular policy, against autograd through the exact reverse KL."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from grape_lightning.losses import distillation_loss
from tests.losses.test_rl_losses import ragged_mask, t

TOL = dict(rtol=0.0, atol=1e-12)


def inputs(seed: int, batch: int = 7, time: int = 6):
    """Student and teacher log-probs, -inf under the student's padding; masks ragged, with holes."""
    rng = random.Random(seed)
    mask = ragged_mask(rng, batch, time)
    student = [[rng.uniform(-3.0, -0.05) if m else -math.inf for m in row] for row in mask]
    teacher = [[rng.uniform(-4.0, -0.05) for _ in row] for row in mask]
    task = [rng.uniform(-1.5, 1.5) for _ in range(batch)]
    return student, teacher, task, mask


def loop_distillation(student, teacher, task, mask, gamma, alpha, num_tokens):
    """A_t = -sum_{t' >= t, masked} gamma^(number of masked tokens between) k_t' + alpha A_i,
    L = -sum A_t l_t / N; dL/dl_t = -A_t / N (A is held fixed)."""
    terms, kls, grad = [], [], [[0.0] * len(row) for row in student]
    for i, (srow, trow, mrow) in enumerate(zip(student, teacher, mask)):
        positions = [j for j, m in enumerate(mrow) if m]
        for n, j in enumerate(positions):
            later = positions[n:]
            rtg = math.fsum(gamma**k * (srow[p] - trow[p]) for k, p in enumerate(later))  # 0.0**0 == 1
            advantage = -rtg + alpha * task[i]
            terms.append(advantage * srow[j])
            kls.append(srow[j] - trow[j])
            grad[i][j] = -advantage / num_tokens
    return -math.fsum(terms) / num_tokens, math.fsum(kls) / num_tokens, grad


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_loss_metrics_and_gradient_match_loops(seed, gamma, alpha):
    student, teacher, task, mask = inputs(seed)
    tokens = sum(map(sum, mask))
    for num_tokens in (None, tokens + 5):  # this batch's count, or a larger mini-batch's
        logprobs = t(student).requires_grad_()
        loss, metrics = distillation_loss(
            logprobs, t(teacher), t(mask).bool(), discount=gamma, task_advantages=t(task), reward_coef=alpha, num_tokens=num_tokens,
        )
        loss.backward()
        expected, kl, expected_grad = loop_distillation(student, teacher, task, mask, gamma, alpha, num_tokens or tokens)
        torch.testing.assert_close(loss, t(expected), **TOL)
        torch.testing.assert_close(metrics["policy_loss"], t(expected), **TOL)
        torch.testing.assert_close(metrics["reverse_kl"], t(kl), **TOL)
        torch.testing.assert_close(logprobs.grad, t(expected_grad), **TOL)


def test_micro_batches_add_up_to_the_batch():
    student, teacher, task, mask = inputs(11, batch=8)
    tokens = sum(map(sum, mask))
    whole, _ = distillation_loss(t(student), t(teacher), t(mask).bool(), discount=0.5, task_advantages=t(task), reward_coef=0.3)
    parts = [
        distillation_loss(t(student)[rows], t(teacher)[rows], t(mask).bool()[rows], discount=0.5, task_advantages=t(task)[rows],
                          reward_coef=0.3, num_tokens=tokens)[0]
        for rows in (slice(0, 3), slice(3, 8))
    ]
    torch.testing.assert_close(parts[0] + parts[1], whole, **TOL)


# -- the estimator, in expectation ------------------------------------------------------------------

V = 4  # vocabulary of the tabular policy: y = (y_1, y_2), pi(y_2 | y_1) its own table per y_1


def tabular(seed: int):
    generator = torch.Generator().manual_seed(seed)
    theta = (torch.randn(1 + V, V, generator=generator, dtype=torch.float64)).requires_grad_()  # row 0: y_1; row 1 + a: y_2 | a
    teacher = torch.log_softmax(torch.randn(1 + V, V, generator=generator, dtype=torch.float64) * 1.5, dim=-1)
    return theta, teacher


def expected_gradient(theta, teacher, gamma):
    """sum over every response y of pi(y) grad L(y), L the loss of the one sampled sequence y."""
    total = torch.zeros_like(theta)
    log_pi = torch.log_softmax(theta, dim=-1)
    for a, b in itertools.product(range(V), repeat=2):
        logprobs = torch.stack([log_pi[0, a], log_pi[1 + a, b]])[None]
        teacher_logprobs = torch.stack([teacher[0, a], teacher[1 + a, b]])[None]
        loss, _ = distillation_loss(logprobs, teacher_logprobs, torch.ones(1, 2, dtype=torch.bool), discount=gamma, num_tokens=1)
        (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)
        total += math.exp(float((log_pi[0, a] + log_pi[1 + a, b]).detach())) * grad  # pi(y) = pi(a) pi(b | a)
    return total


def kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("seed", range(3))
def test_discount_one_follows_the_exact_gradient_of_the_sequence_reverse_kl(seed):
    """E_pi[grad L] = grad KL(pi(y) || pi_T(y)), the KL of whole responses, through both tokens."""
    theta, teacher = tabular(seed)
    log_pi = torch.log_softmax(theta, dim=-1)
    sequence_kl = kl(log_pi[0], teacher[0]) + (log_pi[0].exp() * kl(log_pi[1:], teacher[1:])).sum()
    (exact,) = torch.autograd.grad(sequence_kl, theta)
    torch.testing.assert_close(expected_gradient(theta, teacher, 1.0), exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_discount_zero_follows_the_per_token_reverse_kl_at_the_visited_states(seed):
    """E_pi[grad L] = grad KL_1 + sum_a sg[pi(a)] grad KL(pi(.|a) || pi_T(.|a)): each position's
    reverse KL over the whole vocabulary, the states weighted by how often the student visits them."""
    theta, teacher = tabular(seed)
    log_pi = torch.log_softmax(theta, dim=-1)
    per_token = kl(log_pi[0], teacher[0]) + (log_pi[0].exp().detach() * kl(log_pi[1:], teacher[1:])).sum()
    sequence_kl = kl(log_pi[0], teacher[0]) + (log_pi[0].exp() * kl(log_pi[1:], teacher[1:])).sum()
    exact, sequence = torch.autograd.grad(per_token, theta, retain_graph=True)[0], torch.autograd.grad(sequence_kl, theta)[0]
    torch.testing.assert_close(expected_gradient(theta, teacher, 0.0), exact, rtol=0, atol=1e-12)
    assert (sequence - exact).abs().max() > 1e-3  # the two estimators differ: the test tells them apart


def test_discount_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="discount must be in"):
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), discount=1.5)
