"""GRAPE's confidence-weighted aggregation against a float64 hand computation."""

import math
import random

import pytest
import torch

from grape_lightning.rewards.confidence_weighting import confidence_weighted_rewards


def _reference(scores, confidences, weights, groups, applicable, failed):
    """Plain loops: a set's members are its responses with a scored item; omega_gk = w_k mean c_ik
    over the members (a failure counts as c = 0); r_i = the omega-weighted mean of i's scored items."""
    n, k = len(scores), len(weights)
    scored = [[applicable[i][item] and not failed[i][item] for item in range(k)] for i in range(n)]
    rewards = [math.nan] * n
    for g in set(groups):
        members = [i for i in range(n) if groups[i] == g and any(scored[i])]
        omega = []
        for item in range(k):
            conf = [confidences[i][item] if scored[i][item] else 0.0 for i in members if applicable[i][item]]
            omega.append(weights[item] * math.fsum(conf) / len(conf) if conf else 0.0)
        for i in members:
            total = math.fsum(omega[item] for item in range(k) if scored[i][item])
            if total > 0:
                rewards[i] = math.fsum(omega[item] * scores[i][item] for item in range(k) if scored[i][item]) / total
    return rewards


def _random_case(seed):
    rng = random.Random(seed)
    n, k = 14, 4
    groups = [i // 4 for i in range(n)]  # sets of 4, 4, 4, 2
    category_of_group = {g: rng.choice(["a", "b"]) for g in set(groups)}
    item_category = ["a", "a", "b", "b"]
    applicable = [[item_category[j] == category_of_group[groups[i]] for j in range(k)] for i in range(n)]
    scores = [[rng.random() for _ in range(k)] for _ in range(n)]
    confidences = [[rng.choice([0.0, rng.random(), 1.0]) for _ in range(k)] for _ in range(n)]
    failed = [[applicable[i][j] and rng.random() < 0.3 for j in range(k)] for i in range(n)]  # some rows fail every item
    weights = [1.0, 0.5, 2.0, 0.25]
    return scores, confidences, weights, groups, applicable, failed


def _run(scores, confidences, weights, groups, applicable, failed):
    return confidence_weighted_rewards(
        torch.tensor(scores, dtype=torch.float64), torch.tensor(confidences, dtype=torch.float64),
        torch.tensor(weights, dtype=torch.float64), torch.tensor(groups), torch.tensor(applicable), torch.tensor(failed),
    )


def test_matches_hand_computation_on_random_sets():
    for seed in range(20):
        case = _random_case(seed)
        rewards, _ = _run(*case)
        expected = _reference(*case)
        for got, want in zip(rewards.tolist(), expected):
            assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-12


def test_zero_confidence_item_has_no_influence():
    scores = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    confidences = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
    rewards, omega = _run(scores, confidences, [1.0, 5.0], [0, 0, 0], [[True, True]] * 3, [[False, False]] * 3)
    assert rewards.tolist() == [1.0, 0.0, 1.0]
    assert omega.tolist() == [[1.0, 0.0]]


def test_all_zero_confidence_gives_no_reward():
    rewards, omega = _run([[0.3, 0.9]] * 2, [[0.0, 0.0]] * 2, [1.0, 1.0], [0, 0], [[True, True]] * 2, [[False, False]] * 2)
    assert torch.isnan(rewards).all() and (omega == 0).all()


def test_partially_scored_response_aggregates_over_its_scored_items():
    """A failed (response, item) gives no score: the response's reward is the omega-weighted mean
    of its other items, and the failure counts as confidence 0 in the item's set weight."""
    scores = [[1.0, 0.2], [0.0, 0.8], [1.0, 123.0]]
    failed = [[False, False], [False, False], [False, True]]
    rewards, omega = _run(scores, [[1.0, 1.0]] * 3, [1.0, 1.0], [0, 0, 0], [[True, True]] * 3, failed)
    assert abs(omega[0, 1].item() - 2 / 3) < 1e-15  # the failed confidence counts as 0 in the mean
    assert rewards[2].item() == 1.0  # its only scored item
    assert abs(rewards[0].item() - (1.0 * 1.0 + (2 / 3) * 0.2) / (1 + 2 / 3)) < 1e-15


def test_response_with_no_scored_item_leaves_the_set():
    """Every item of response 2 failed: no reward (NaN), and its failures do not lower omega, as
    if it had not been sampled."""
    scores = [[1.0, 0.2], [0.0, 0.8], [0.5, 0.5]]
    confidences = [[1.0, 0.6], [1.0, 0.2], [1.0, 1.0]]
    failed = [[False, False], [False, False], [True, True]]
    rewards, omega = _run(scores, confidences, [1.0, 0.5], [0, 0, 0], [[True, True]] * 3, failed)
    without, omega_without = _run(scores[:2], confidences[:2], [1.0, 0.5], [0, 0], [[True, True]] * 2, failed[:2])
    assert math.isnan(rewards[2].item())
    assert rewards[:2].tolist() == without.tolist() and omega.tolist() == omega_without.tolist()
    assert abs(omega[0, 1].item() - 0.5 * 0.4) < 1e-15


def test_single_verifiable_item_reward_is_its_score():
    scores = [[0.0], [1.0], [1.0], [0.0]]
    rewards, _ = _run(scores, [[1.0]] * 4, [1.0], [0, 0, 1, 1], [[True]] * 4, [[False]] * 4)
    assert rewards.tolist() == [0.0, 1.0, 1.0, 0.0]


# -- weighting modes ---------------------------------------------------------------------------------
def _reference_omega(mode, confidences, weights, groups, applicable, failed, reliability=None, measured=None):
    """Plain loops: omega_gk per set and item, as item_weights' docstring states it."""
    n, k = len(confidences), len(weights)
    scored = [[applicable[i][item] and not failed[i][item] for item in range(k)] for i in range(n)]
    omega = {}
    for g in set(groups):
        members = [i for i in range(n) if groups[i] == g and any(scored[i])]
        for item in range(k):
            m_gk = [i for i in members if applicable[i][item]]
            if not m_gk:
                omega[g, item] = 0.0
            elif mode == "fixed":
                omega[g, item] = weights[item]
            elif mode == "reliability" and measured[item]:
                omega[g, item] = weights[item] * reliability[item] * sum(1.0 for i in m_gk if scored[i][item]) / len(m_gk)
            else:
                omega[g, item] = weights[item] * math.fsum(confidences[i][item] if scored[i][item] else 0.0 for i in m_gk) / len(m_gk)
    return omega


def _reference_rewards_from(omega, scores, groups, applicable, failed):
    rewards = []
    for i in range(len(scores)):
        items = [k for k in range(len(scores[i])) if applicable[i][k] and not failed[i][k]]
        total = math.fsum(omega[groups[i], k] for k in items)
        rewards.append(math.fsum(omega[groups[i], k] * scores[i][k] for k in items) / total if total > 0 else math.nan)
    return rewards


@pytest.mark.parametrize("mode", ["confidence", "reliability", "fixed"])
def test_weighting_modes_match_hand_computation_on_random_sets(mode):
    for seed in range(20):
        scores, confidences, weights, groups, applicable, failed = _random_case(seed)
        rng = random.Random(100 + seed)
        reliability = [rng.random() for _ in weights]
        measured = [rng.random() < 0.6 for _ in weights]
        rewards, omega = confidence_weighted_rewards(
            torch.tensor(scores, dtype=torch.float64), torch.tensor(confidences, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64), torch.tensor(groups), torch.tensor(applicable), torch.tensor(failed),
            mode=mode, reliability=torch.tensor(reliability, dtype=torch.float64), measured=torch.tensor(measured),
        )
        expected_omega = _reference_omega(mode, confidences, weights, groups, applicable, failed, reliability, measured)
        for (g, item), want in expected_omega.items():
            assert abs(omega[g, item].item() - want) < 1e-12, (seed, g, item)
        expected = _reference_rewards_from(expected_omega, scores, groups, applicable, failed)
        for got, want in zip(rewards.tolist(), expected):
            assert (math.isnan(got) and math.isnan(want)) or abs(got - want) < 1e-12
        if mode == "confidence":  # the default is the aggregation GRAPE always had
            assert rewards.tolist() == pytest.approx(_reference(scores, confidences, weights, groups, applicable, failed), nan_ok=True, abs=1e-12)


def test_fixed_weighting_ignores_confidence_and_failures_only_leave_the_response_mean():
    scores = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.5]]
    confidences = [[1.0, 0.0], [1.0, 0.0], [1.0, 0.1]]
    failed = [[False, False], [False, False], [False, True]]
    rewards, omega = _run_mode("fixed", scores, confidences, [1.0, 3.0], [0, 0, 0], [[True, True]] * 3, failed)
    assert omega.tolist() == [[1.0, 3.0]]
    assert rewards.tolist() == [0.25, 0.75, 1.0]


def test_reliability_weighting_keeps_the_failure_share_and_falls_back_to_confidence_where_unmeasured():
    """A verifiable item (never measured: it is the reference) weighs as under confidence; a measured
    judged item weighs w R f; an unmeasured one w mean c."""
    scores = [[1.0, 0.0, 0.2], [0.0, 1.0, 0.4], [1.0, 0.5, 0.6], [0.0, 0.5, 0.8]]
    confidences = [[1.0, 0.9, 0.3], [1.0, 0.1, 0.3], [1.0, 0.0, 0.3], [0.0, 0.7, 0.3]]
    failed = [[False, False, False], [False, False, False], [False, True, False], [True, False, False]]
    reliability, measured = [0.0, 0.8, 0.9], [False, True, False]
    _, omega = _run_mode("reliability", scores, confidences, [1.0, 0.5, 2.0], [0] * 4, [[True] * 3] * 4, failed,
                         reliability, measured)
    _, by_confidence = _run_mode("confidence", scores, confidences, [1.0, 0.5, 2.0], [0] * 4, [[True] * 3] * 4, failed)
    assert omega[0, 0].item() == by_confidence[0, 0].item() == 0.75
    assert abs(omega[0, 1].item() - 0.5 * 0.8 * 3 / 4) < 1e-15
    assert omega[0, 2].item() == by_confidence[0, 2].item()


def _run_mode(mode, scores, confidences, weights, groups, applicable, failed, reliability=None, measured=None):
    return confidence_weighted_rewards(
        torch.tensor(scores, dtype=torch.float64), torch.tensor(confidences, dtype=torch.float64),
        torch.tensor(weights, dtype=torch.float64), torch.tensor(groups), torch.tensor(applicable), torch.tensor(failed), mode=mode,
        reliability=None if reliability is None else torch.tensor(reliability, dtype=torch.float64),
        measured=None if measured is None else torch.tensor(measured),
    )


def test_weighting_config_refuses_unknown_modes_and_momenta():
    from grape_lightning.rewards.confidence_weighting import WeightingConfig

    with pytest.raises(ValueError, match="weighting.mode must be one of"):
        WeightingConfig(mode="votes")
    with pytest.raises(ValueError, match=r"weighting.momentum must be in \[0, 1\)"):
        WeightingConfig(momentum=1.0)
