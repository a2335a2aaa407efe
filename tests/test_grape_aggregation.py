"""GRAPE's confidence-weighted aggregation against a float64 hand computation."""

import math
import random

import torch

from grape_lightning.rewards.confidence_weighting import confidence_weighted_rewards


def _reference(scores, confidences, weights, groups, applicable, failed):
    """Plain loops: impute failed scores with the set's judged mean, omega_gk = w_k mean_i c_ik."""
    n, k = len(scores), len(weights)
    rewards = [math.nan] * n
    for g in set(groups):
        members = [i for i in range(n) if groups[i] == g]
        omega, imputed = [], []
        for item in range(k):
            rows = [i for i in members if applicable[i][item]]
            judged = [i for i in rows if not failed[i][item]]
            imputed.append(math.fsum(scores[i][item] for i in judged) / len(judged) if judged else 0.0)
            conf = [0.0 if failed[i][item] else confidences[i][item] for i in rows]
            omega.append(weights[item] * math.fsum(conf) / len(conf) if rows else 0.0)
        total = math.fsum(omega)
        for i in members:
            if total > 0:
                s = [imputed[item] if failed[i][item] else scores[i][item] for item in range(k)]
                rewards[i] = math.fsum(omega[item] * s[item] for item in range(k)) / total
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
    failed = [[applicable[i][j] and rng.random() < 0.2 for j in range(k)] for i in range(n)]
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


def test_failed_judgement_adds_no_relative_signal():
    """A failed (response, item) takes the set's mean score for that item: the other responses'
    ordering by that item is kept and the failed one sits in the middle."""
    scores = [[1.0, 0.2], [0.0, 0.8], [1.0, 123.0]]
    failed = [[False, False], [False, False], [False, True]]
    rewards, omega = _run(scores, [[1.0, 1.0]] * 3, [1.0, 1.0], [0, 0, 0], [[True, True]] * 3, failed)
    assert abs(omega[0, 1].item() - 2 / 3) < 1e-15  # the failed confidence counts as 0 in the mean
    expected_third = (1.0 * 1.0 + (2 / 3) * 0.5) / (1 + 2 / 3)
    assert abs(rewards[2].item() - expected_third) < 1e-12


def test_single_verifiable_item_reward_is_its_score():
    scores = [[0.0], [1.0], [1.0], [0.0]]
    rewards, _ = _run(scores, [[1.0]] * 4, [1.0], [0, 0, 1, 1], [[True]] * 4, [[False]] * 4)
    assert rewards.tolist() == [0.0, 1.0, 1.0, 0.0]
