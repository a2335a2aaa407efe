"""Built-in reward functions on handcrafted cases, and CombinedReward's bookkeeping."""

from __future__ import annotations

import math
import re

import pytest
import torch

from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.rewards import (
    CombinedReward,
    ExactMatch,
    FormatReward,
    LengthPenalty,
    NumericMatch,
    RegexMatch,
    RewardFunction,
    TaskVerifier,
)
from grape_lightning.rewards.combined import InvalidRewards


def score(function, responses, metadata=None, prompts=None):
    metadata = [{} for _ in responses] if metadata is None else metadata
    prompts = ["p"] * len(responses) if prompts is None else prompts
    return function(prompts, responses, metadata)


class Fixed(RewardFunction):
    """Returns preset values (None / NaN included), whatever the responses."""

    def __init__(self, values, weight=1.0, name=None):
        super().__init__(weight, name)
        self.values = values

    def __call__(self, prompts, responses, metadata):
        return list(self.values)


# ----------------------------------------------------------------------------------------------
# ExactMatch
# ----------------------------------------------------------------------------------------------


def test_exact_match_reads_the_first_non_blank_line_stripped():
    cases = [
        ("42", "42", 1.0),
        ("  42  \nbecause 6*7", "42", 1.0),
        ("\n\n   42\t\n", "42", 1.0),
        ("42", "  42 ", 1.0),  # reference stripped too
        ("The answer is 42", "42", 0.0),
        ("work\n42", "42", 0.0),  # the answer on a later line does not count
        ("42.", "42", 0.0),
        ("4 2", "42", 0.0),
        ("", "42", 0.0),
        ("   \n  ", "42", 0.0),
        ("Paris", "paris", 0.0),  # case-sensitive
    ]
    got = score(ExactMatch(), [c[0] for c in cases], [{"answer": c[1]} for c in cases])
    assert got == [c[2] for c in cases]


def test_exact_match_missing_answer_is_none_and_non_string_answers_compare_as_text():
    got = score(ExactMatch(), ["42", "42", "7"], [{}, {"answer": 42}, {"solution": "7"}])
    assert got == [None, 1.0, None]
    custom = ExactMatch(answer_key="solution")
    assert score(custom, ["7", "7"], [{"solution": "7"}, {"answer": "7"}]) == [1.0, None]


# ----------------------------------------------------------------------------------------------
# NumericMatch
# ----------------------------------------------------------------------------------------------


def test_numeric_match_cases():
    cases = [
        ("42", "42", 1.0),
        ("The answer is -7 apples", "-7", 1.0),
        ("x = 3.5\nthen 4", 3.5, 1.0),
        ("1e3", "1000", 1.0),
        (".5", 0.5, 1.0),
        ("+12", "12", 1.0),
        ("41.9999999", "42", 1.0),  # within the default tolerance 1e-6
        ("41.99", "42", 0.0),
        ("forty-two", "42", 0.0),  # no number
        ("", "42", 0.0),
        ("so\n42", "42", 0.0),  # the number must be on the first line
        ("7 then 42", "42", 0.0),  # the first number is the one read
    ]
    got = score(NumericMatch(), [c[0] for c in cases], [{"answer": c[1]} for c in cases])
    assert got == [c[2] for c in cases]


def test_numeric_match_tolerance():
    responses = ["3.1416", "3.1416", "1.5", "1.5000001"]
    metadata = [{"answer": "3.14159"}] * 2 + [{"answer": 1.0}] * 2
    assert score(NumericMatch(tolerance=1e-3), responses[:1], metadata[:1]) == [1.0]
    assert score(NumericMatch(), responses[1:2], metadata[1:2]) == [0.0]
    assert score(NumericMatch(tolerance=0.5), responses[2:], metadata[2:]) == [1.0, 0.0]  # |diff| <= tol


def test_numeric_match_missing_answer_is_none():
    assert score(NumericMatch(), ["5", "5"], [{}, {"answer": "5"}]) == [None, 1.0]


# ----------------------------------------------------------------------------------------------
# RegexMatch and FormatReward
# ----------------------------------------------------------------------------------------------


def test_regex_match_searches_anywhere():
    reward = RegexMatch(r"\\boxed\{-?\d+\}")
    responses = [r"so \boxed{12} is it", "line\n\\boxed{-3}", r"\boxed{x}", "12"]
    assert score(reward, responses) == [1.0, 1.0, 0.0, 0.0]
    assert score(RegexMatch("answer", flags=re.IGNORECASE), ["ANSWER: 1", "none"]) == [1.0, 0.0]
    assert score(RegexMatch("answer"), ["ANSWER: 1"]) == [0.0]


def test_format_reward_needs_a_full_match_of_the_stripped_response():
    reward = FormatReward(r"<think>.*</think>\s*<answer>.*</answer>")
    responses = [
        "<think>a\nb</think>\n<answer>4</answer>",  # . spans newlines
        "  \n<think>x</think><answer>4</answer>\n  ",  # surrounding whitespace stripped
        "<think>x</think><answer>4</answer> trailing text",
        "preamble <think>x</think><answer>4</answer>",
        "<answer>4</answer>",
    ]
    assert score(reward, responses) == [1.0, 1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# LengthPenalty
# ----------------------------------------------------------------------------------------------


def test_length_penalty_is_linear_beyond_the_budget_and_capped_at_minus_one():
    reward = LengthPenalty(max_chars=10, scale=100.0)
    lengths = [0, 5, 10, 11, 60, 110, 111, 5000]
    got = score(reward, ["x" * n for n in lengths])
    expected = [0.0, 0.0, 0.0, -0.01, -0.5, -1.0, -1.0, -1.0]
    assert got == pytest.approx(expected, abs=1e-15)
    assert all(v <= 0 for v in got)


# ----------------------------------------------------------------------------------------------
# TaskVerifier
# ----------------------------------------------------------------------------------------------


def test_task_verifier_uses_the_arithmetic_task():
    task = ArithmeticTask(seed=0, num_train=20, num_val=5)
    verifier = TaskVerifier(task)
    assert verifier.name == "arithmetic_verifier"
    responses = ["22", "+22", "022", " 22 \nmore", "22.0", "22 apples", "23", "", "-22"]
    got = score(verifier, responses, [{"answer": "22"}] * len(responses))
    assert got == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert score(verifier, ["22"], [{}]) == [None]
    # the task's own examples carry their answer in the metadata and verify against it
    examples = task.examples("train")[:5]
    rows = score(verifier, [e.answer for e in examples], [e.metadata for e in examples], [e.prompt for e in examples])
    assert rows == [1.0] * 5
    assert score(verifier, [str(int(e.answer) + 1) for e in examples], [e.metadata for e in examples]) == [0.0] * 5


# ----------------------------------------------------------------------------------------------
# CombinedReward
# ----------------------------------------------------------------------------------------------


def test_combined_reward_weighted_total_and_raw_per_function_values():
    exact = ExactMatch(weight=2.0)
    length = LengthPenalty(max_chars=3, scale=10.0, weight=0.5)
    extra = Fixed([0.25, -1.0, 3.0], weight=-1.5, name="extra")
    combined = CombinedReward([exact, length, extra])
    responses = ["42", "42 is it", "7"]
    metadata = [{"answer": "42"}, {"answer": "42"}, {"answer": "42"}]
    scores = combined(["p"] * 3, responses, metadata)

    raw_exact = [1.0, 0.0, 0.0]
    raw_length = [0.0, -0.5, 0.0]
    raw_extra = [0.25, -1.0, 3.0]
    expected = [2.0 * e + 0.5 * l - 1.5 * x for e, l, x in zip(raw_exact, raw_length, raw_extra)]
    assert scores.total.dtype == torch.float64
    assert scores.total.tolist() == pytest.approx(expected, abs=1e-15)
    assert scores.valid.tolist() == [True, True, True]
    assert set(scores.per_function) == {"exact_match", "length_penalty", "extra"}
    assert scores.per_function["exact_match"].tolist() == raw_exact  # unweighted
    assert scores.per_function["length_penalty"].tolist() == raw_length
    assert scores.per_function["extra"].tolist() == raw_extra


def test_combined_reward_missing_value_from_any_function_invalidates_the_response():
    first = Fixed([1.0, None, 0.5, 0.0], name="first")
    second = Fixed([0.5, 1.0, float("nan"), 0.0], weight=0.0, name="second")  # weight 0 does not hide NaN
    scores = CombinedReward([first, second])(["p"] * 4, ["a", "b", "c", "d"], [{}] * 4)
    assert scores.valid.tolist() == [True, False, False, True]
    assert scores.total[0].item() == 1.0 and scores.total[3].item() == 0.0
    assert math.isnan(scores.total[1].item()) and math.isnan(scores.total[2].item())
    assert math.isnan(scores.per_function["first"][1].item()) and scores.per_function["first"][2].item() == 0.5
    assert scores.per_function["second"][1].item() == 1.0 and math.isnan(scores.per_function["second"][2].item())


def test_combined_reward_missing_reference_from_a_verifier_is_invalid_not_zero():
    scores = CombinedReward([ExactMatch(), LengthPenalty(max_chars=100)])(["p", "p"], ["x", "x"], [{"answer": "y"}, {}])
    assert scores.valid.tolist() == [True, False]
    assert scores.total[0].item() == 0.0 and math.isnan(scores.total[1].item())


def test_combined_reward_rejects_duplicate_names_and_wrong_lengths():
    with pytest.raises(ValueError, match="unique"):
        CombinedReward([ExactMatch(), ExactMatch(answer_key="other")])
    CombinedReward([ExactMatch(), ExactMatch(answer_key="other", name="exact_other")])  # renamed: fine
    with pytest.raises(ValueError):
        CombinedReward([])
    short = CombinedReward([Fixed([1.0, 2.0], name="short")])
    with pytest.raises(ValueError, match="returned 2 values for 3 responses"):
        short(["p"] * 3, ["a", "b", "c"], [{}] * 3)


def test_an_infinite_reward_is_invalid_like_nan_and_the_summary_names_function_count_and_row():
    first = Fixed([float("inf"), 1.0, float("-inf"), 0.0], name="first")
    second = Fixed([0.5, None, 0.5, 0.5], name="second")
    prompts, responses = ["p0", "p1", "p2", "p3"], ["a", "b", "c", "d"]
    metadata = [{"row": i} for i in range(4)]
    scores = CombinedReward([first, second])(prompts, responses, metadata)
    assert scores.valid.tolist() == [False, False, False, True]
    assert math.isnan(scores.per_function["first"][0].item()) and math.isnan(scores.per_function["first"][2].item())
    summary = InvalidRewards.of(scores.per_function, scores.valid, prompts, responses, metadata)
    assert (summary.total, summary.invalid, summary.per_function) == (4, 3, {"first": 2, "second": 1})
    assert summary.example == {"prompt": "p0", "response": "a", "metadata": {"row": 0}, "first": summary.example["first"], "second": 0.5}
    assert math.isnan(summary.example["first"])
    assert "3 of 4 rewards were invalid (None/NaN/inf)" in summary.describe() and "'first' 2, 'second' 1" in summary.describe()
