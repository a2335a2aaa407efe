"""Agreement of judged rubric items with the verifiable ones, the calibration error of their
confidence, and the running reliability estimate, against float64 hand computations."""

import math
import random

import pytest
import torch

from grape_lightning.rewards.judge_reliability import (
    ReliabilityEstimate, agreement, calibration_sums, expected_calibration_error, verifiable_reference,
)


def _random_items(seed, n=24):
    """Two categories: items 0-2 of "a" (0 and 1 verifiable, 1 of weight 0 in some seeds), items 3-4 of "b"
    (4 verifiable); responses of either category, some (response, item) failed."""
    rng = random.Random(seed)
    category = ["a", "a", "a", "b", "b"]
    verifiable = [True, True, False, False, True]
    weights = [rng.choice([0.0, 0.5, 1.0]), rng.choice([0.0, 2.0]), 0.7, 1.3, 0.4]
    rows = [rng.choice("ab") for _ in range(n)]
    applicable = [[category[k] == rows[i] for k in range(5)] for i in range(n)]
    scored = [[applicable[i][k] and rng.random() > 0.25 for k in range(5)] for i in range(n)]
    scores = [[rng.choice([0.0, 1.0, rng.random()]) for _ in range(5)] for _ in range(n)]
    confidences = [[rng.random() if scored[i][k] else 0.0 for k in range(5)] for i in range(n)]
    return scores, confidences, weights, scored, verifiable


def _hand_agreement(scores, weights, scored, verifiable):
    out = {}
    for i, row in enumerate(scores):
        reference = [k for k in range(len(row)) if scored[i][k] and verifiable[k]]
        if not reference:
            continue
        total = math.fsum(weights[k] for k in reference)
        if total > 0:
            v = math.fsum(weights[k] * row[k] for k in reference) / total
        else:
            v = math.fsum(row[k] for k in reference) / len(reference)
        for k in range(len(row)):
            if scored[i][k] and not verifiable[k]:
                out[i, k] = 1.0 - abs(row[k] - v)
    return out


def _tensors(scores, confidences, weights, scored, verifiable):
    return (torch.tensor(scores, dtype=torch.float64), torch.tensor(confidences, dtype=torch.float64),
            torch.tensor(weights, dtype=torch.float64), torch.tensor(scored), torch.tensor(verifiable))


def test_agreement_matches_hand_computation_on_random_inputs():
    seen_zero_weight_reference = False
    for seed in range(30):
        scores, confidences, weights, scored, verifiable = _random_items(seed)
        s, _, w, m, v = _tensors(scores, confidences, weights, scored, verifiable)
        values, measured = agreement(s, w, m, v)
        expected = _hand_agreement(scores, weights, scored, verifiable)
        assert {(i, k) for i, k in measured.nonzero().tolist()} == set(expected)
        for (i, k), want in expected.items():
            assert abs(values[i, k].item() - want) < 1e-12
        assert (values[~measured] == 0).all()
        seen_zero_weight_reference |= weights[0] == weights[1] == 0.0
    assert seen_zero_weight_reference  # the plain-mean fallback was exercised


def test_verifiable_reference_is_the_weighted_mean_of_the_scored_verifiable_items():
    scores = torch.tensor([[1.0, 0.0, 0.3], [1.0, 0.0, 0.3], [0.2, 0.6, 0.9]], dtype=torch.float64)
    scored = torch.tensor([[True, True, True], [True, False, True], [False, False, True]])
    v, has = verifiable_reference(scores, torch.tensor([3.0, 1.0, 5.0]), scored, torch.tensor([True, True, False]))
    assert v.tolist()[:2] == [0.75, 1.0] and has.tolist() == [True, True, False]


def _hand_ece(confidences, agreements, bins):
    """Per bin b = min(floor(c B), B - 1): sum_b (n_b / n) |mean a - mean c|."""
    by_bin = {}
    for c, a in zip(confidences, agreements):
        by_bin.setdefault(min(int(math.floor(c * bins)), bins - 1), []).append((c, a))
    n = len(confidences)
    return math.fsum(
        len(pairs) / n * abs(math.fsum(a for _, a in pairs) / len(pairs) - math.fsum(c for c, _ in pairs) / len(pairs))
        for pairs in by_bin.values()
    )


@pytest.mark.parametrize("bins", [10, 3])
def test_expected_calibration_error_matches_hand_computation_on_random_inputs(bins):
    for seed in range(20):
        scores, confidences, weights, scored, verifiable = _random_items(seed)
        confidences = [[1.0 if k == 2 and i % 7 == 0 else c for k, c in enumerate(row)] for i, row in enumerate(confidences)]  # c = 1: the last bin
        s, c, w, m, v = _tensors(scores, confidences, weights, scored, verifiable)
        values, measured = agreement(s, w, m, v)
        ece = expected_calibration_error(calibration_sums(c, values, measured, bins))
        expected = _hand_agreement(scores, weights, scored, verifiable)
        for k in range(5):
            pairs = [(confidences[i][item], a) for (i, item), a in expected.items() if item == k]
            if not pairs:
                assert math.isnan(ece[k].item())
                continue
            want = _hand_ece([p[0] for p in pairs], [p[1] for p in pairs], bins)
            assert abs(ece[k].item() - want) < 1e-12, (seed, k)


def test_a_calibrated_critic_has_no_calibration_error_and_an_overconfident_one_has():
    agreements = torch.tensor([[1.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    measured = torch.ones(4, 1, dtype=torch.bool)
    calibrated = calibration_sums(torch.full((4, 1), 0.75, dtype=torch.float64), agreements, measured)
    assert expected_calibration_error(calibrated).item() == 0.0
    sure = calibration_sums(torch.ones(4, 1, dtype=torch.float64), agreements, measured)
    assert expected_calibration_error(sure).item() == 0.25


def test_reliability_estimate_is_an_exponential_moving_average_of_measured_steps():
    estimate = ReliabilityEstimate(3)
    steps = [[0.5, math.nan, math.nan], [0.9, 0.2, math.nan], [math.nan, 0.6, math.nan], [0.1, 1.0, math.nan]]
    momentum = 0.8
    expected = [None, None, None]
    for step in steps:
        estimate.update(torch.tensor(step, dtype=torch.float64), momentum)
        for k, value in enumerate(step):
            if not math.isnan(value):
                expected[k] = value if expected[k] is None else momentum * expected[k] + (1 - momentum) * value
    assert estimate.measured.tolist() == [True, True, False]
    assert estimate.value[:2].tolist() == pytest.approx(expected[:2], abs=1e-15) and estimate.value[2].item() == 0.0


def test_reliability_estimate_round_trips_through_a_state_dict_and_loads_from_one_without_it():
    estimate = ReliabilityEstimate(2)
    estimate.update(torch.tensor([0.3, math.nan], dtype=torch.float64), 0.9)
    holder = torch.nn.Module()
    holder.reliability = estimate
    state = holder.state_dict()
    assert set(state) == {"reliability.value", "reliability.measured"}
    fresh = torch.nn.Module()
    fresh.reliability = ReliabilityEstimate(2)
    fresh.load_state_dict(state)
    assert fresh.reliability.value.tolist() == [0.3, 0.0] and fresh.reliability.measured.tolist() == [True, False]
    older = torch.nn.Module()
    older.reliability = ReliabilityEstimate(2)
    older.load_state_dict({})  # a checkpoint from before the estimate: unmeasured, strict loading still passes
    assert not older.reliability.measured.any()


def test_reliability_estimate_stays_float64_when_its_module_is_cast():
    holder = torch.nn.Module()
    holder.reliability = ReliabilityEstimate(2)
    holder.bfloat16()
    holder.reliability.update(torch.tensor([0.123456789, math.nan], dtype=torch.float64), 0.9)
    assert holder.reliability.value.dtype == torch.float64 and holder.reliability.value[0].item() == 0.123456789
    assert set(holder.state_dict()) == {"reliability.value", "reliability.measured"}
