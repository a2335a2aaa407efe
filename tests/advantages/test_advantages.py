"""Advantages and baselines against float64 references written as plain Python loops.

The references below never call the vectorised code's formulas: they collect each group's members
in a dict and use ``math.fsum`` / ``math.sqrt`` on scalars.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from grape_lightning.advantages import (
    AdvantageConfig,
    compute_advantages,
    batch_mean_baseline,
    group_statistics,
    leave_one_out_baseline,
    reward_to_go,
    whiten,
)

TOL = dict(rtol=0.0, atol=1e-12)
NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Random inputs and loop references
# ----------------------------------------------------------------------------------------------


def random_batch(seed: int, num_groups: int = 6):
    """Ragged, shuffled groups; some rewards NaN, some flagged invalid, one group with a single
    valid member and one with none, one group of equal rewards."""
    rng = random.Random(seed)
    rewards, groups, valid = [], [], []
    for g in range(num_groups):
        size = rng.randint(2, 6)
        for k in range(size):
            r = rng.uniform(-3.0, 3.0)
            ok = True
            if g == 0:  # only its first member is valid
                ok = k == 0
                r = r if k == 0 else NAN if k % 2 else r
            elif g == 1:  # no valid member at all
                r = NAN if k % 2 else r
                ok = False if k % 2 == 0 else True  # the valid-flagged ones are NaN
            elif g == 2:  # tied group with a non-dyadic value, plus an invalid outlier
                r = 0.1 if k < size - 1 else 7.0
                ok = k < size - 1
            else:
                u = rng.random()
                if u < 0.15:
                    r = NAN
                elif u < 0.3:
                    ok = False
            rewards.append(r)
            groups.append(g)
            valid.append(ok)
    order = list(range(len(rewards)))
    rng.shuffle(order)
    rewards = [rewards[i] for i in order]
    groups = [groups[i] for i in order]
    valid = [valid[i] for i in order]
    return rewards, groups, valid


def tensors(rewards, groups, valid):
    return (
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(groups, dtype=torch.long),
        torch.tensor(valid, dtype=torch.bool),
    )


def is_usable(r: float, ok: bool) -> bool:
    return ok and not math.isnan(r)


def members_by_group(rewards, groups, valid) -> dict[int, list[float]]:
    members: dict[int, list[float]] = {g: [] for g in groups}
    for r, g, ok in zip(rewards, groups, valid):
        if is_usable(r, ok):
            members[g].append(r)
    return members


def loop_mean(xs: list[float]) -> float:
    return math.fsum(xs) / len(xs)


def loop_unbiased_std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = loop_mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------------------------
# group_statistics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_group_statistics_match_loops_and_skip_invalid_members(seed):
    rewards, groups, valid = random_batch(seed)
    stats = group_statistics(*tensors(rewards, groups, valid))
    members = members_by_group(rewards, groups, valid)
    for g, xs in members.items():
        assert stats.count[g].item() == len(xs)
        if xs:
            assert stats.mean[g].item() == pytest.approx(loop_mean(xs), abs=1e-12)
        assert stats.std[g].item() == pytest.approx(loop_unbiased_std(xs), abs=1e-12)
        assert bool(stats.tied[g]) == (len(set(xs)) <= 1)


def test_group_statistics_without_valid_mask_excludes_nan():
    rewards = torch.tensor([1.0, NAN, 3.0, 5.0, NAN], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1])
    stats = group_statistics(rewards, groups)
    assert stats.count.tolist() == [2.0, 1.0]
    assert stats.mean.tolist() == [2.0, 5.0]
    assert stats.std[0].item() == pytest.approx(math.sqrt(2.0), abs=1e-15)
    assert stats.std[1].item() == 0.0  # one valid member: no spread


def test_invalid_members_values_do_not_matter():
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0])
    valid = torch.tensor([True, True, False, True])
    before = group_statistics(rewards, groups, valid)
    changed = rewards.clone()
    changed[2] = -1e6
    after = group_statistics(changed, groups, valid)
    assert torch.equal(before.mean, after.mean) and torch.equal(before.std, after.std)
    assert before.mean.item() == pytest.approx(11.0 / 3.0, abs=1e-15)


def test_std_is_unbiased():
    stats = group_statistics(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert stats.std.item() == pytest.approx(math.sqrt(5.0 / 3.0), abs=1e-15)  # n - 1, not n (sqrt(1.25))


@pytest.mark.parametrize("seed", range(4))
def test_group_scaling_and_whitening_use_the_same_unbiased_std(seed):
    """One std convention: on one group, with eps = 0, group scaling and whitening both divide by
    sqrt(M2 / (n - 1)), so they agree."""
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    xs = [rng.uniform(-3.0, 3.0) for _ in range(n)]
    mean = math.fsum(xs) / n
    m2 = math.fsum((x - mean) ** 2 for x in xs)
    rewards = torch.tensor(xs, dtype=torch.float64)
    grouped = compute_advantages(AdvantageConfig("mean", "group", eps=0.0), rewards, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool)).advantages
    whitened = whiten(rewards, torch.ones(n, dtype=torch.bool), eps=0.0)
    for x, g, w in zip(xs, grouped.tolist(), whitened.tolist()):
        assert g == pytest.approx((x - mean) / math.sqrt(m2 / (n - 1)), abs=1e-12)
        assert w == pytest.approx((x - mean) / math.sqrt(m2 / (n - 1)), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.1, 0.7, 1.0 / 3.0, -2.9])
@pytest.mark.parametrize("size", [2, 3, 7, 16])
def test_tied_group_has_std_zero_and_zero_advantages(dtype, value, size):
    # Non-dyadic values (0.1, 0.7, 1/3) used to round to a mean off by one ulp and a std of ~1e-17
    # (float64) or ~1e-8 (float32), so the group was not `tied` and every member got the same
    # nonzero advantage (up to 6e-4 in float32 after dividing by std + eps).
    rewards = torch.cat([torch.full((size,), value, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)])
    groups = torch.tensor([0] * size + [1, 1])
    stats = group_statistics(rewards, groups)
    assert stats.tied.tolist() == [True, False]
    assert stats.std[0].item() == 0.0
    assert stats.mean[0].item() == rewards[0].item()
    for scaling in ("group", "batch", "none", "whiten"):
        advantages = compute_advantages(AdvantageConfig("mean", scaling), rewards, groups, torch.ones_like(groups, dtype=torch.bool)).advantages
        assert torch.all(advantages[:size] == 0), scaling
    assert torch.all(rewards[:size] - leave_one_out_baseline(rewards, groups)[:size] == 0)


# ----------------------------------------------------------------------------------------------
# leave-one-out and batch-mean baselines
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_leave_one_out_baseline_matches_loops(seed):
    rewards, groups, valid = random_batch(seed)
    baseline = leave_one_out_baseline(*tensors(rewards, groups, valid))
    checked_single = checked_multi = 0
    for i, (r, g, ok) in enumerate(zip(rewards, groups, valid)):
        if not is_usable(r, ok):
            continue
        others = [x for j, (x, h, o) in enumerate(zip(rewards, groups, valid)) if j != i and h == g and is_usable(x, o)]
        if others:
            expected = math.fsum(others) / len(others)
            checked_multi += 1
        else:
            expected = r  # alone in its group: baseline = own reward, advantage 0
            checked_single += 1
        assert baseline[i].item() == pytest.approx(expected, abs=1e-12)
    assert checked_single >= 1 and checked_multi >= 5


def test_leave_one_out_single_valid_member_gets_zero_advantage():
    rewards = torch.tensor([0.75, NAN, 0.25, 1.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    valid = torch.tensor([True, True, True, False])
    advantage = rewards - leave_one_out_baseline(rewards, groups, valid)
    assert advantage[0].item() == 0.0 and advantage[2].item() == 0.0


def test_leave_one_out_small_example():
    rewards = torch.tensor([1.0, 2.0, 6.0], dtype=torch.float64)
    baseline = leave_one_out_baseline(rewards, torch.zeros(3, dtype=torch.long))
    assert baseline.tolist() == [4.0, 3.5, 1.5]


@pytest.mark.parametrize("seed", range(3))
def test_batch_mean_baseline_matches_loop(seed):
    rewards, groups, valid = random_batch(seed)
    r, _, v = tensors(rewards, groups, valid)
    baseline = batch_mean_baseline(r, v)
    expected = loop_mean([x for x, ok in zip(rewards, valid) if is_usable(x, ok)])
    assert baseline.shape == r.shape
    torch.testing.assert_close(baseline, torch.full_like(r, expected), **TOL)
    # without a mask, NaN rewards are skipped
    nan_only = batch_mean_baseline(torch.tensor([1.0, NAN, 4.0], dtype=torch.float64))
    assert nan_only.tolist() == [2.5, 2.5, 2.5]


# ----------------------------------------------------------------------------------------------
# whiten
# ----------------------------------------------------------------------------------------------


def random_values_and_mask(seed: int, batch: int = 5, time: int = 9):
    rng = random.Random(seed)
    values = [[rng.gauss(1.5, 3.0) for _ in range(time)] for _ in range(batch)]
    mask = []
    for _ in range(batch):
        start = rng.randint(0, 3)
        length = rng.randint(1, time - start)
        mask.append([1 if start <= t < start + length else 0 for t in range(time)])
    return values, mask


def loop_unbiased_moments(values, mask):
    selected = [v for row, mrow in zip(values, mask) for v, m in zip(row, mrow) if m]
    return selected, loop_mean(selected), loop_unbiased_std(selected)


@pytest.mark.parametrize("seed", range(4))
def test_whiten_matches_loop_and_normalises_masked_entries(seed):
    values, mask = random_values_and_mask(seed)
    _, mean, std = loop_unbiased_moments(values, mask)
    got = whiten(torch.tensor(values, dtype=torch.float64), torch.tensor(mask), eps=0.0)
    for b, (row, mrow) in enumerate(zip(values, mask)):
        for t, (v, m) in enumerate(zip(row, mrow)):
            expected = (v - mean) / std if m else 0.0
            assert got[b, t].item() == pytest.approx(expected, abs=1e-12)
    whitened = [got[b, t].item() for b in range(len(mask)) for t in range(len(mask[0])) if mask[b][t]]
    _, m2, s2 = loop_unbiased_moments([whitened], [[1] * len(whitened)])
    assert abs(m2) < 1e-12 and abs(s2 - 1.0) < 1e-12


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_ignores_padding(shift_mean):
    values, mask = random_values_and_mask(7)
    v = torch.tensor(values, dtype=torch.float64)
    m = torch.tensor(mask)
    reference = whiten(v, m, shift_mean=shift_mean)
    garbage = torch.where(m.bool(), v, torch.tensor(1e9, dtype=torch.float64))
    garbage[0, ~m[0].bool()] = NAN
    garbage[1, ~m[1].bool()] = -float("inf")
    assert (~m.bool()).any()
    again = whiten(garbage, m, shift_mean=shift_mean)
    assert torch.equal(again, reference)
    assert torch.all(again[~m.bool()] == 0)


def test_whiten_without_mean_shift_only_rescales():
    values, mask = random_values_and_mask(11)
    values = [[v + 4.0 for v in row] for row in values]
    _, mean, std = loop_unbiased_moments(values, mask)
    assert abs(mean) > 1.0  # the shift would be visible
    got = whiten(torch.tensor(values, dtype=torch.float64), torch.tensor(mask), shift_mean=False, eps=0.0)
    for b, (row, mrow) in enumerate(zip(values, mask)):
        for t, (v, m) in enumerate(zip(row, mrow)):
            expected = v / std if m else 0.0
            assert got[b, t].item() == pytest.approx(expected, abs=1e-12)
            if m and v != 0:
                assert math.copysign(1.0, got[b, t].item()) == math.copysign(1.0, v)


# ----------------------------------------------------------------------------------------------
# compute_advantages: the entry point, every baseline and scaling
# ----------------------------------------------------------------------------------------------

BASELINES = ["none", "mean", "batch_mean", "leave_one_out", "moving_average"]
SCALINGS = ["none", "group", "batch", "whiten"]


def loop_advantages(rewards, groups, valid, baseline, scaling, eps, moving=None, momentum=0.9):
    """A = scale(r - b) by loops over the usable rewards; ``moving`` is the moving average before
    this batch (None: the first batch). Returns (advantages, the moving average after)."""
    usable = [is_usable(r, ok) for r, ok in zip(rewards, valid)]
    members = members_by_group(rewards, groups, valid)
    everyone = [r for r, u in zip(rewards, usable) if u]
    batch_mean = loop_mean(everyone) if everyone else 0.0
    after = moving
    if baseline == "moving_average" and everyone:
        b_moving = batch_mean if moving is None else moving
        after = momentum * b_moving + (1 - momentum) * batch_mean
    centred = []
    for r, g, u in zip(rewards, groups, usable):
        if not u:
            centred.append(0.0)
            continue
        others = list(members[g])
        others.remove(r)
        b = {
            "none": 0.0,
            "mean": loop_mean(members[g]),
            "batch_mean": batch_mean,
            "leave_one_out": loop_mean(others) if others else r,
            "moving_average": (batch_mean if moving is None else moving) if everyone else (moving or 0.0),
        }[baseline]
        centred.append(r - b)
    out = []
    kept = [c for c, u in zip(centred, usable) if u]
    for c, g, u in zip(centred, groups, usable):
        if not u:
            out.append(0.0)
        elif scaling == "none":
            out.append(c)
        elif scaling == "group":
            out.append(c / (loop_unbiased_std(members[g]) + eps))
        elif scaling == "batch":
            out.append(c / ((loop_unbiased_std(everyone) if len(everyone) >= 2 else 1.0) + eps))
        else:
            std = loop_unbiased_std(kept) if len(kept) >= 2 else 1.0
            out.append((c - loop_mean(kept)) / (std + eps))
    return out, after


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_compute_advantages_matches_loops_for_every_baseline_and_scaling(seed, baseline, scaling):
    from grape_lightning.advantages import MovingAverageBaseline

    rewards, groups, valid = random_batch(seed)
    config = AdvantageConfig(baseline, scaling, eps=1e-3)
    moving = MovingAverageBaseline()
    expected, after = None, None
    for step in range(2):  # twice: the moving average's first batch, then its average
        shifted = [r + step for r in rewards]
        got = compute_advantages(config, *tensors(shifted, groups, valid), moving_average=moving).advantages
        expected, after = loop_advantages(shifted, groups, valid, baseline, scaling, 1e-3, after)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), **TOL)
    assert any(abs(a) > 1e-3 for a in expected)  # not a comparison of zeros
    if baseline == "moving_average":
        assert float(moving.value) == pytest.approx(after, abs=1e-12)


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_two_processes_compute_the_advantages_of_their_global_batch(baseline, scaling):
    """Whole groups split over two ranks (one with more rows than the other): each rank's
    advantages are the single-process advantages of the global batch at its rows."""
    from grape_lightning.advantages import MovingAverageBaseline
    from tests.thread_processes import run_ranks

    rewards, groups, valid = random_batch(5, num_groups=7)
    config = AdvantageConfig(baseline, scaling)
    whole = compute_advantages(config, *tensors(rewards, groups, valid), moving_average=MovingAverageBaseline()).advantages
    rows = [[i for i, g in enumerate(groups) if (g % 3 == 0) == (rank == 0)] for rank in range(2)]
    assert len(rows[0]) != len(rows[1])

    def advantages_on(rank, sum_across):
        mine = rows[rank]
        local = tensors([rewards[i] for i in mine], [groups[i] for i in mine], [valid[i] for i in mine])
        return compute_advantages(config, *local, sum_across=sum_across, moving_average=MovingAverageBaseline()).advantages

    for rank, advantages in enumerate(run_ranks(2, advantages_on)):  # sums in another order: relative rounding
        torch.testing.assert_close(advantages, whole[rows[rank]], rtol=1e-12, atol=1e-12)


def test_advantage_config_refuses_unknown_names_and_value_with_group_scaling():
    from grape_lightning.advantages import AdvantageConfig

    with pytest.raises(ValueError, match="advantage.baseline must be one of"):
        AdvantageConfig("median")
    with pytest.raises(ValueError, match="advantage.scaling must be one of"):
        AdvantageConfig("mean", "std")
    with pytest.raises(ValueError, match="with baseline 'value' use 'none' or 'whiten'"):
        AdvantageConfig("value", "group")


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_loops(seed, gamma):
    """G_t = sum_{s >= t} gamma^(k) r_s, k counting the masked tokens from t; padding and holes skipped."""
    rng = random.Random(seed)
    batch, time = 5, 7
    mask = [[int(rng.random() < 0.75) for _ in range(time)] for _ in range(batch)]
    rewards = [[rng.uniform(-1, 1) for _ in range(time)] for _ in range(batch)]
    expected = []
    for rrow, mrow in zip(rewards, mask):
        row = []
        for t in range(time):
            later = [r for r, m in zip(rrow[t:], mrow[t:]) if m]
            row.append(math.fsum(r * gamma**k for k, r in enumerate(later)) if mrow[t] else 0.0)
        expected.append(row)
    got = reward_to_go(torch.tensor(rewards, dtype=torch.float64), torch.tensor(mask, dtype=torch.bool), gamma)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), **TOL)
