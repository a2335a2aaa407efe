"""RL losses (aggregation, KL estimators, clipped surrogate, GRPO, REINFORCE) against float64
references written as loops over elements with ``math`` scalars, plus hand-derived gradients."""

from __future__ import annotations

import math
import random

import pytest
import torch

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.losses import aggregate, clipped_surrogate, grpo_loss, kl_penalty, reinforce_loss

F64 = torch.float64
TOL = dict(rtol=0.0, atol=1e-12)
MODES = ["sequence", "token", "constant"]


# ----------------------------------------------------------------------------------------------
# Inputs and loop references
# ----------------------------------------------------------------------------------------------


def ragged_mask(rng: random.Random, batch: int, time: int, left_pad: bool = False) -> list[list[int]]:
    """Each row has 1..time tokens; some rows are left-padded, some have holes."""
    mask = []
    for b in range(batch):
        length = rng.randint(1, time)
        start = rng.randint(0, time - length) if left_pad or b % 3 == 1 else 0
        row = [1 if start <= t < start + length else 0 for t in range(time)]
        if b % 4 == 3 and length > 2:
            row[start + 1] = 0  # a hole: masks need not be contiguous
        mask.append(row)
    return mask


def random_matrix(rng: random.Random, batch: int, time: int, low: float = -2.0, high: float = 2.0):
    return [[rng.uniform(low, high) for _ in range(time)] for _ in range(batch)]


def loop_aggregate(values, mask, mode, *, constant_length=None, num_sequences=None, num_tokens=None) -> float:
    batch = len(values) if num_sequences is None else num_sequences
    if mode == "sequence":
        total = 0.0
        for row, mrow in zip(values, mask):
            n = sum(mrow)
            if n:
                total += math.fsum(v for v, m in zip(row, mrow) if m) / n
        return total / batch
    masked_sum = math.fsum(v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m)
    if mode == "token":
        tokens = sum(sum(mrow) for mrow in mask) if num_tokens is None else num_tokens
        return masked_sum / tokens
    assert mode == "constant"
    return masked_sum / (batch * constant_length)


def t(x, dtype=F64):
    return torch.tensor(x, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# aggregate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", MODES)
def test_aggregate_matches_loops(seed, mode):
    rng = random.Random(seed)
    batch, time = rng.randint(2, 7), rng.randint(3, 10)
    values, mask = random_matrix(rng, batch, time), ragged_mask(rng, batch, time)
    length = time + 3
    got = aggregate(t(values), torch.tensor(mask), mode, constant_length=length)
    assert got.item() == pytest.approx(loop_aggregate(values, mask, mode, constant_length=length), abs=1e-12)


def test_aggregate_modes_differ_on_ragged_lengths():
    values = [[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]
    mask = [[1, 1, 1, 1], [1, 0, 0, 0]]
    v, m = t(values), torch.tensor(mask)
    assert aggregate(v, m, "sequence").item() == pytest.approx((1.0 + 4.0) / 2, abs=1e-15)
    assert aggregate(v, m, "token").item() == pytest.approx(8.0 / 5, abs=1e-15)
    assert aggregate(v, m, "constant", constant_length=8).item() == pytest.approx(8.0 / 16, abs=1e-15)


@pytest.mark.parametrize("mode", MODES)
def test_aggregate_ignores_values_under_padding(mode):
    rng = random.Random(5)
    values, mask = random_matrix(rng, 4, 6), ragged_mask(rng, 4, 6, left_pad=True)
    clean = aggregate(t(values), torch.tensor(mask), mode, constant_length=6)
    garbage = [float("nan"), float("inf"), -1e30] * 2
    dirty_values = [[v if m else bad for v, m, bad in zip(row, mrow, garbage)] for row, mrow in zip(values, mask)]
    dirty = aggregate(t(dirty_values), torch.tensor(mask), mode, constant_length=6)
    assert torch.isfinite(dirty) and dirty.item() == clean.item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
def test_micro_batch_losses_add_up_to_the_batch_loss(seed, mode):
    rng = random.Random(100 + seed)
    batch, time = 7, 8
    values, mask = random_matrix(rng, batch, time), ragged_mask(rng, batch, time)
    v, m = t(values), torch.tensor(mask)
    whole = aggregate(v, m, mode, constant_length=time)
    totals = dict(num_sequences=batch, num_tokens=int(m.sum()), constant_length=time)
    split = 3
    parts = aggregate(v[:split], m[:split], mode, **totals) + aggregate(v[split:], m[split:], mode, **totals)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
    assert whole.item() == pytest.approx(loop_aggregate(values, mask, mode, constant_length=time), abs=1e-12)


def test_micro_batches_without_batch_totals_do_not_add_up():
    # the property above is not automatic: each micro-batch normalises by its own size otherwise
    values = t([[1.0, 2.0], [3.0, 0.0], [5.0, 6.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    whole = aggregate(values, mask, "token")
    naive = aggregate(values[:1], mask[:1], "token") + aggregate(values[1:], mask[1:], "token")
    assert abs(naive.item() - whole.item()) > 0.1


def test_constant_aggregation_needs_constant_length_and_unknown_mode_raises():
    values, mask = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="constant_length"):
        aggregate(values, mask, "constant")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(values, mask, "mean")


# ----------------------------------------------------------------------------------------------
# kl_penalty
# ----------------------------------------------------------------------------------------------


def loop_kl(l: float, ref: float, estimator: str) -> float:
    d = ref - l
    if estimator == "k1":
        return l - ref
    if estimator == "k2":
        return d * d / 2.0
    return math.exp(d) - d - 1.0


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_scalar_math(estimator):
    rng = random.Random(3)
    logprobs, ref = random_matrix(rng, 4, 7, -6.0, -0.01), random_matrix(rng, 4, 7, -6.0, -0.01)
    got = kl_penalty(t(logprobs), t(ref), estimator)
    for b in range(4):
        for s in range(7):
            assert got[b, s].item() == pytest.approx(loop_kl(logprobs[b][s], ref[b][s], estimator), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_is_non_negative_and_zero_at_equality(dtype):
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(2000, generator=gen, dtype=F64) * 8
    scale = 10.0 ** torch.randint(-9, 1, (2000,), generator=gen).to(F64)  # deltas from 1e-9 to ~1
    ref = logprobs + scale * torch.randn(2000, generator=gen, dtype=F64)
    k3 = kl_penalty(logprobs.to(dtype), ref.to(dtype), "k3")
    assert torch.all(k3 >= 0)
    assert torch.all(kl_penalty(logprobs.to(dtype), logprobs.to(dtype), "k3") == 0)
    k1 = kl_penalty(logprobs, ref, "k1")
    assert (k1 < 0).any()  # k1 is the one that can be negative


def test_unknown_kl_estimator_raises():
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


def _expected_estimator_gradient(logits: torch.Tensor, ref: torch.Tensor, estimator: str) -> list[float]:
    """E_{y ~ pi}[grad_theta k(y)] for pi = softmax(theta), exactly: the sum over the support of
    pi(y) times the gradient of the loss term with y held fixed (as GRPO's loss differentiates it)."""
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    loss = (logp.exp().detach() * kl_penalty(logp, ref, estimator)).sum()
    return torch.autograd.grad(loss, theta)[0].tolist()


@pytest.mark.parametrize("seed", range(5))
def test_kl_estimator_gradients_in_a_loss(seed):
    """On a categorical policy, exactly: k1's term has zero expected gradient (why it is refused in
    a loss), k2's follows KL(pi || ref) and k3's KL(ref || pi). The KL gradients by hand:
    d log pi_y / d theta_j = [y = j] - pi_j, so with a = log pi - log ref
        grad_j KL(pi || ref) = pi_j (a_j - sum_y pi_y a_y),    grad_j KL(ref || pi) = pi_j - ref_j."""
    rng = random.Random(seed)
    size = rng.randint(3, 9)
    logits = [rng.gauss(0.0, 1.5) for _ in range(size)]
    ref_logits = [rng.gauss(0.0, 1.5) for _ in range(size)]

    def log_softmax(values):
        top = max(values)
        log_total = top + math.log(math.fsum(math.exp(v - top) for v in values))
        return [v - log_total for v in values]

    logp, logref = log_softmax(logits), log_softmax(ref_logits)
    pi, ref = [math.exp(v) for v in logp], [math.exp(v) for v in logref]
    a = [lp - lr for lp, lr in zip(logp, logref)]
    mean_a = math.fsum(p * v for p, v in zip(pi, a))
    grad_forward = [p * (v - mean_a) for p, v in zip(pi, a)]
    grad_reverse = [p - r for p, r in zip(pi, ref)]
    assert max(abs(g) for g in grad_forward) > 1e-3 and max(abs(g) for g in grad_reverse) > 1e-3

    theta, reference = torch.tensor(logits, dtype=F64), torch.log_softmax(torch.tensor(ref_logits, dtype=F64), -1)
    k1 = _expected_estimator_gradient(theta, reference, "k1")
    assert max(abs(g) for g in k1) < 1e-15
    with torch.no_grad():  # while its value, what train/kl shows, is the KL
        value = (torch.softmax(theta, -1) * kl_penalty(torch.log_softmax(theta, -1), reference, "k1")).sum().item()
    assert value == pytest.approx(math.fsum(p * v for p, v in zip(pi, a)), abs=1e-12) and value > 1e-3
    assert _expected_estimator_gradient(theta, reference, "k2") == pytest.approx(grad_forward, abs=1e-14)
    assert _expected_estimator_gradient(theta, reference, "k3") == pytest.approx(grad_reverse, abs=1e-14)


def test_k1_is_refused_as_a_loss_term_and_allowed_as_a_metric():
    logprobs, ref, advantages, mask = -torch.rand(2, 3, dtype=F64), -torch.rand(2, 3, dtype=F64), torch.ones(2, dtype=F64), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"'k1' cannot be a loss term: its expected gradient .* = 0.*Use 'k3'"):
        grpo_loss(logprobs, logprobs, advantages, mask, ref_logprobs=ref, beta=0.1, kl_estimator="k1")
    _, metrics = grpo_loss(logprobs, logprobs, advantages, mask, ref_logprobs=ref, beta=0.0, kl_estimator="k1")
    assert metrics["kl"].item() == pytest.approx((logprobs - ref).mean().item(), abs=1e-15)
    for estimator in ("k2", "k3"):
        grpo_loss(logprobs, logprobs, advantages, mask, ref_logprobs=ref, beta=0.1, kl_estimator=estimator)


# ----------------------------------------------------------------------------------------------
# clipped_surrogate
# ----------------------------------------------------------------------------------------------

EPS_LOW, EPS_HIGH = 0.2, 0.28


def surrogate_case(seed: int, batch: int = 6, time: int = 10, per_token: bool = True):
    """Ratios drawn from three bands (well below 1 - eps_low, inside, well above 1 + eps_high) and
    advantages of both signs; returns python lists."""
    rng = random.Random(seed)
    old = random_matrix(rng, batch, time, -4.0, -0.05)
    logprobs = []
    for b in range(batch):
        row = []
        for s in range(time):
            band = (b * time + s) % 3
            rho = rng.uniform(0.3, 0.7) if band == 0 else rng.uniform(0.85, 1.2) if band == 1 else rng.uniform(1.5, 2.5)
            row.append(old[b][s] + math.log(rho))
        logprobs.append(row)
    sign = lambda: rng.choice([-1.0, 1.0])  # noqa: E731
    if per_token:
        advantages = [[sign() * rng.uniform(0.1, 2.0) for _ in range(time)] for _ in range(batch)]
    else:
        advantages = [sign() * rng.uniform(0.1, 2.0) for _ in range(batch)]
    mask = ragged_mask(rng, batch, time)
    return logprobs, old, advantages, mask


def adv_at(advantages, b, s):
    return advantages[b][s] if isinstance(advantages[b], list) else advantages[b]


def loop_surrogate(logprobs, old, advantages, mask):
    """Per-token loss, d loss / d logprob (hand-derived), clip counts and ratio sum over masked tokens."""
    loss, grad = [], []
    low = high = masked = 0
    ratio_sum = 0.0
    cases = set()
    for b, row in enumerate(logprobs):
        loss_row, grad_row = [], []
        for s, l in enumerate(row):
            if not mask[b][s]:
                loss_row.append(0.0)
                grad_row.append(0.0)
                continue
            a = adv_at(advantages, b, s)
            rho = math.exp(l - old[b][s])
            clipped_rho = min(max(rho, 1.0 - EPS_LOW), 1.0 + EPS_HIGH)
            loss_row.append(-min(rho * a, clipped_rho * a))
            below, above = rho < 1.0 - EPS_LOW, rho > 1.0 + EPS_HIGH
            cases.add((below, above, a > 0))
            # the clipped term is the minimum and constant in l: below the band with A < 0, or above
            # it with A > 0; everywhere else the loss is -rho * A, and d rho / d l = rho
            binding = (below and a < 0) or (above and a > 0)
            grad_row.append(0.0 if binding else -rho * a)
            low += below and a < 0
            high += above and a > 0
            masked += 1
            ratio_sum += rho
        loss.append(loss_row)
        grad.append(grad_row)
    return loss, grad, low / masked, high / masked, ratio_sum / masked, cases


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("per_token", [True, False])
def test_clipped_surrogate_loss_gradient_and_clip_fractions_match_loops(seed, per_token):
    logprobs, old, advantages, mask = surrogate_case(seed, per_token=per_token)
    # garbage under the mask must not leak into the loss or the gradient
    for b, mrow in enumerate(mask):
        for s, m in enumerate(mrow):
            if not m:
                logprobs[b][s] = old[b][s] + 60.0  # exp would overflow float32 and be huge in float64
    expected_loss, expected_grad, low, high, ratio_mean, cases = loop_surrogate(logprobs, old, advantages, mask)
    # all four off-band cases are exercised: below/above the band with either sign of A
    assert {(True, False, False), (True, False, True), (False, True, True), (False, True, False)} <= cases

    leaf = t(logprobs).requires_grad_(True)
    loss, metrics = clipped_surrogate(leaf, t(old), t(advantages), torch.tensor(mask), EPS_LOW, EPS_HIGH)
    assert loss.shape == leaf.shape
    torch.testing.assert_close(loss.detach(), t(expected_loss), **TOL)
    assert torch.all(loss.detach()[~torch.tensor(mask).bool()] == 0)
    loss.sum().backward()  # per-token terms are independent: d sum / d l_bt = d L_bt / d l_bt
    torch.testing.assert_close(leaf.grad, t(expected_grad), **TOL)
    assert torch.all(leaf.grad[~torch.tensor(mask).bool()] == 0)
    # clip fractions come back in the default float dtype; a miscounted token moves them by >= 1/60
    assert metrics["clip_fraction_low"].item() == pytest.approx(low, abs=1e-6)
    assert metrics["clip_fraction_high"].item() == pytest.approx(high, abs=1e-6)
    assert metrics["ratio_mean"].item() == pytest.approx(ratio_mean, abs=1e-12)
    assert low > 0 and high > 0


def test_clipped_surrogate_uses_eps_low_and_eps_high_separately():
    # rho = 0.75 is clipped (A < 0) with eps_low = 0.2 but not with eps_low = 0.3; rho = 1.25 with
    # A > 0 is clipped with eps_high = 0.2 but not with eps_high = 0.28
    old = t([[0.0, 0.0]])
    logprobs = t([[math.log(0.75), math.log(1.25)]])
    advantages = t([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, _ = clipped_surrogate(logprobs, old, advantages, mask, 0.2, 0.2)
    torch.testing.assert_close(loss, t([[0.8, -1.2]]), **TOL)
    loss, _ = clipped_surrogate(logprobs, old, advantages, mask, 0.3, 0.28)
    torch.testing.assert_close(loss, t([[0.75, -1.25]]), **TOL)


# ----------------------------------------------------------------------------------------------
# grpo_loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("aggregation", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_loops(seed, aggregation, beta):
    logprobs, old, advantages, mask = surrogate_case(seed, batch=5, time=7, per_token=False)
    rng = random.Random(seed + 50)
    ref = [[l + rng.uniform(-1.0, 1.0) for l in row] for row in logprobs]
    length = 9
    surrogate, _, low, high, _, _ = loop_surrogate(logprobs, old, advantages, mask)
    kl = [[loop_kl(l, r, "k3") for l, r in zip(lrow, rrow)] for lrow, rrow in zip(logprobs, ref)]
    policy = loop_aggregate(surrogate, mask, aggregation, constant_length=length)
    kl_agg = loop_aggregate(kl, mask, aggregation, constant_length=length)

    loss, metrics = grpo_loss(
        t(logprobs), t(old), t(advantages), torch.tensor(mask), ref_logprobs=t(ref), beta=beta,
        eps_low=EPS_LOW, eps_high=EPS_HIGH, aggregation=aggregation, constant_length=length,
    )
    assert loss.item() == pytest.approx(policy + beta * kl_agg, abs=1e-12)
    assert metrics["policy_loss"].item() == pytest.approx(policy, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(kl_agg, abs=1e-12)
    assert metrics["clip_fraction_low"].item() == pytest.approx(low, abs=1e-6)
    assert metrics["clip_fraction_high"].item() == pytest.approx(high, abs=1e-6)


@pytest.mark.parametrize("aggregation", MODES)
def test_grpo_micro_batches_add_up(aggregation):
    logprobs, old, advantages, mask = surrogate_case(9, batch=6, time=7, per_token=False)
    ref = [[l - 0.3 for l in row] for row in logprobs]
    args = [t(logprobs), t(old), t(advantages), torch.tensor(mask), t(ref)]
    common = dict(beta=0.1, aggregation=aggregation, constant_length=7)
    whole, _ = grpo_loss(*args[:4], ref_logprobs=args[4], **common)
    totals = dict(num_sequences=6, num_tokens=int(torch.tensor(mask).sum()))
    first, _ = grpo_loss(*(a[:2] for a in args[:4]), ref_logprobs=args[4][:2], **common, **totals)
    second, _ = grpo_loss(*(a[2:] for a in args[:4]), ref_logprobs=args[4][2:], **common, **totals)
    assert (first + second).item() == pytest.approx(whole.item(), abs=1e-12)


def test_grpo_beta_without_reference_raises_and_beta_zero_needs_none():
    logprobs, old, advantages, mask = surrogate_case(0, batch=2, time=3, per_token=False)
    args = (t(logprobs), t(old), t(advantages), torch.tensor(mask))
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(*args, beta=0.1)
    loss, metrics = grpo_loss(*args)
    assert "kl" not in metrics and torch.isfinite(loss)
    with_ref, ref_metrics = grpo_loss(*args, ref_logprobs=t(logprobs) - 1.0, beta=0.0)
    assert with_ref.item() == loss.item() and ref_metrics["kl"].item() > 0


def test_grpo_kl_ignores_garbage_reference_under_padding():
    logprobs, old, advantages, mask = surrogate_case(4, batch=4, time=6, per_token=False)
    # exp(200 - l) overflows float32 and float64 alike under the padding
    ref = [[l - 0.2 if m else 200.0 for l, m in zip(row, mrow)] for row, mrow in zip(logprobs, mask)]
    clean = [[l - 0.2 for l in row] for row in logprobs]
    for dtype in (torch.float32, F64):
        args = (t(logprobs, dtype), t(old, dtype), t(advantages, dtype), torch.tensor(mask))
        dirty_loss, _ = grpo_loss(*args, ref_logprobs=t(ref, dtype), beta=0.1)
        clean_loss, _ = grpo_loss(*args, ref_logprobs=t(clean, dtype), beta=0.1)
        assert torch.isfinite(dirty_loss) and dirty_loss.item() == clean_loss.item()


def test_grpo_constant_aggregation_gradient_equals_reinforce_with_group_advantages():
    """On-policy (one iteration: rho = 1), beta = 0, Dr. GRPO's constant normaliser L:
    L * grad(GRPO) = grad(REINFORCE with A_i = (r_i - mean_group) / (std_group + eps))."""
    rng = random.Random(21)
    groups_of, size, time, length = 3, 4, 6, 6
    batch = groups_of * size
    rewards = [rng.choice([0.0, 0.25, 1.0]) + rng.uniform(0, 0.1) for _ in range(batch)]
    groups = [i // size for i in range(batch)]
    eps = 1e-4
    advantages = compute_advantages(AdvantageConfig("mean", "group", eps=eps), t(rewards), torch.tensor(groups), torch.ones(batch, dtype=torch.bool)).advantages
    # the advantages themselves, by hand
    for i in range(batch):
        members = [rewards[j] for j in range(batch) if groups[j] == groups[i]]
        mean = math.fsum(members) / size
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in members) / (size - 1))
        assert advantages[i].item() == pytest.approx((rewards[i] - mean) / (std + eps), abs=1e-12)

    mask = torch.tensor(ragged_mask(rng, batch, time))
    values = t(random_matrix(rng, batch, time, -3.0, -0.1))
    grpo_leaf = values.clone().requires_grad_(True)
    loss, metrics = grpo_loss(grpo_leaf, grpo_leaf.detach(), advantages, mask, aggregation="constant", constant_length=length)
    assert metrics["ratio_mean"].item() == 1.0
    loss.backward()
    reinforce_leaf = values.clone().requires_grad_(True)
    reinforce_loss(reinforce_leaf, advantages, mask)[0].backward()
    torch.testing.assert_close(grpo_leaf.grad * length, reinforce_leaf.grad, **TOL)
    # and the hand-derived gradient of both: -A_i * m_it / B
    expected = [[-advantages[i].item() * float(mask[i, s]) / batch for s in range(time)] for i in range(batch)]
    torch.testing.assert_close(reinforce_leaf.grad, t(expected), **TOL)
    # the identity is specific to the constant normaliser: per-sequence means weight rows by 1/|y_i|
    sequence_leaf = values.clone().requires_grad_(True)
    grpo_loss(sequence_leaf, sequence_leaf.detach(), advantages, mask, aggregation="sequence")[0].backward()
    assert not torch.allclose(sequence_leaf.grad * length, reinforce_leaf.grad)


# ----------------------------------------------------------------------------------------------
# reinforce_loss
# ----------------------------------------------------------------------------------------------


def loop_reinforce(logprobs, advantages, mask, num_sequences=None) -> float:
    batch = len(logprobs) if num_sequences is None else num_sequences
    total = 0.0
    for row, a, mrow in zip(logprobs, advantages, mask):
        total += a * math.fsum(l for l, m in zip(row, mrow) if m)
    return -total / batch


@pytest.mark.parametrize("seed", range(3))
def test_reinforce_loss_matches_loop(seed):
    rng = random.Random(seed)
    batch, time = 6, 9
    logprobs, mask = random_matrix(rng, batch, time, -5.0, -0.01), ragged_mask(rng, batch, time, left_pad=True)
    advantages = [rng.uniform(-2.0, 2.0) for _ in range(batch)]
    dirty = [[l if m else float("nan") for l, m in zip(row, mrow)] for row, mrow in zip(logprobs, mask)]
    leaf = t(dirty).requires_grad_(True)
    loss, metrics = reinforce_loss(leaf, t(advantages), torch.tensor(mask))
    assert loss.item() == pytest.approx(loop_reinforce(logprobs, advantages, mask), abs=1e-12)
    assert metrics["policy_loss"].item() == loss.item()
    sums = [math.fsum(l for l, m in zip(row, mrow) if m) for row, mrow in zip(logprobs, mask)]
    assert metrics["sequence_logprob_mean"].item() == pytest.approx(math.fsum(sums) / batch, abs=1e-12)
    loss.backward()
    expected = [[-advantages[b] * mask[b][s] / batch for s in range(time)] for b in range(batch)]
    torch.testing.assert_close(leaf.grad, t(expected), **TOL)


def test_reinforce_num_sequences_override_and_micro_batches():
    rng = random.Random(8)
    batch, time = 6, 5
    logprobs, mask = random_matrix(rng, batch, time, -5.0, -0.01), ragged_mask(rng, batch, time)
    advantages = [rng.uniform(-2.0, 2.0) for _ in range(batch)]
    lp, a, m = t(logprobs), t(advantages), torch.tensor(mask)
    overridden, _ = reinforce_loss(lp, a, m, num_sequences=20)
    assert overridden.item() == pytest.approx(loop_reinforce(logprobs, advantages, mask, num_sequences=20), abs=1e-12)
    whole, _ = reinforce_loss(lp, a, m)
    first, _ = reinforce_loss(lp[:2], a[:2], m[:2], num_sequences=batch)
    second, _ = reinforce_loss(lp[2:], a[2:], m[2:], num_sequences=batch)
    parts = first + second
    assert parts.item() == pytest.approx(whole.item(), abs=1e-12)
