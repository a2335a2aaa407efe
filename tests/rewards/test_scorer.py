"""The Scorer interface: reward functions and GRAPE's rubric return rewards, terms, accuracy and
(the rubric) the confidences from which the per-item statistics are computed."""

from __future__ import annotations

import math

import pytest
import torch

from grape_lightning.rewards import NumericMatch, RewardFunction
from grape_lightning.rewards.rubric import load_rubric
from grape_lightning.rewards.rubric_scorer import ConfidenceWeightedRubric
from grape_lightning.rewards.rubric_statistics import item_statistics
from grape_lightning.rewards.scorer import RewardScorer

PROMPTS = ["1+1=", "1+1=", "2+2=", "2+2="]
RESPONSES = ["2", "3", "4", "four"]
METADATA = [{"answer": "2"}, {"answer": "2"}, {"answer": "4"}, {"answer": "4"}]
GROUPS = torch.tensor([0, 0, 1, 1])


class Half(RewardFunction):
    def __call__(self, prompts, responses, metadata):
        return [0.5] * len(responses)


def test_reward_scorer_sums_weighted_terms_and_counts_the_named_check_as_accuracy():
    scores = RewardScorer([NumericMatch(), Half(weight=2.0)], accuracy="numeric_match")(PROMPTS, RESPONSES, METADATA, GROUPS)
    assert scores.rewards.tolist() == [2.0, 1.0, 2.0, 1.0]
    assert scores.correct.tolist() == [True, False, True, False]
    assert set(scores.terms) == {"numeric_match", "half"}
    assert RewardScorer([NumericMatch()])(PROMPTS, RESPONSES, METADATA, GROUPS).correct is None  # no accuracy unless named


def test_an_accuracy_that_names_no_reward_function_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"no reward function is named 'numeric'; the functions are \['numeric_match', 'half'\]"):
        RewardScorer([NumericMatch(), Half()], accuracy="numeric")


RUBRIC = """\
default_category: math
categories:
  math:
    - {name: correct, weight: 1.0, kind: verifiable, check: numeric_match}
    - {name: short, weight: 0.5, kind: verifiable, check: python, function: "tests.rewards.test_scorer:short_unless_four"}
"""


def short_unless_four(prompt, response, metadata):
    return None if response == "four" else float(len(response) == 1)


def test_rubric_scorer_returns_confidence_weighted_rewards_item_terms_and_statistics(tmp_path):
    path = tmp_path / "rubric.yaml"
    path.write_text(RUBRIC)
    scorer = ConfidenceWeightedRubric(load_rubric(str(path)), accuracy="math/correct")
    scores = scorer(PROMPTS, RESPONSES, METADATA, GROUPS)
    # set 0: both items scored, omega = (1, 0.5); set 1: "four" fails "short", omega_short = 0.5 * 1/2
    expected = [(1 + 0.5) / 1.5, (0 + 0.5) / 1.5, (1 + 0.25) / 1.25, 0.0]
    assert scores.rewards.tolist() == pytest.approx(expected, abs=1e-15)
    assert scores.correct.tolist() == [True, False, True, False]
    assert math.isnan(float(scores.terms["math/short"][3])) and scores.terms["math/correct"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.equal(scores.confidences["math/short"], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    items = scorer.scored_items(scores.terms, scores.confidences)  # the matrices back, as the module reads them from a rollout
    assert items.failed[:, 1].tolist() == [False, False, False, True] and items.applicable.all()
    omega = scorer.omega(items, GROUPS)
    assert omega.tolist() == [[1.0, 0.5], [1.0, 0.25]]
    statistics = item_statistics(
        items.keys, items.scores, items.confidences, items.weights, items.applicable, items.failed, scorer.items.verifiable, GROUPS, omega,
    ).metrics()
    assert statistics["critic_failures"] == 1.0 and statistics["rubric/math/short/failures"] == 1.0
    assert statistics["rubric/math/correct/score"] == 0.5 and statistics["rubric/math/short/score"] == 1.0
    assert statistics["rubric/math/correct/spread"] == pytest.approx(math.sqrt(0.5))  # std of {1, 0} in each set
    with pytest.raises(ValueError, match="has no item 'math/right'"):
        ConfidenceWeightedRubric(load_rubric(str(path)), accuracy="math/right")
