"""GRAPE's confidence-weighted aggregation against a float64 hand computation."""

import math
import random

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
