"""CorruptedCritic: the noisy and the confidently wrong judge of the GRAPE-vs-GRPO comparison."""

from __future__ import annotations

import pytest

from grape_lightning.rewards.critics import CallableCritic, CorruptedCritic, Judgement, JudgeRequest
from grape_lightning.rewards.critics.base import Critic


class Oracle(Critic):
    """Says yes (s = 1) to even responses and no to odd ones, with confidence 0.9; fails on "x"."""

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        return [None if r.response == "x" else Judgement(float(int(r.response) % 2 == 0), 0.9, "sure") for r in requests]


def _requests(count: int, item: str = "correct") -> list[JudgeRequest]:
    return [JudgeRequest(f"{i}+{i}=", str(i), item, "Is it right?", str(2 * i)) for i in range(count)]


def test_invert_flips_the_drawn_share_of_answers_and_keeps_their_confidence():
    requests = _requests(4000)
    truth = Oracle().judge(requests)
    corrupted = CorruptedCritic(Oracle(), "invert", rate=0.3, seed=1).judge(requests)
    flipped = [a.score != b.score for a, b in zip(truth, corrupted)]
    assert all(b.score == 1.0 - a.score for a, b, f in zip(truth, corrupted, flipped) if f)
    assert all(b.confidence == 0.9 for b in corrupted)
    assert sum(flipped) / len(flipped) == pytest.approx(0.3, abs=0.03)  # 4000 draws: sd 0.007
    assert CorruptedCritic(Oracle(), "invert", rate=1.0).judge(requests[:50]) == [
        Judgement(1.0 - a.score, 0.9, "inverted: sure") for a in truth[:50]
    ]


def test_noise_guesses_on_the_drawn_share_and_states_the_confidence_of_a_calibrated_judge():
    requests = _requests(4000)
    truth = Oracle().judge(requests)
    corrupted = CorruptedCritic(Oracle(), "noise", rate=0.6, seed=2).judge(requests)
    guessed = [b.critique.startswith("a guess") for b in corrupted]
    assert sum(guessed) / len(guessed) == pytest.approx(0.6, abs=0.03)
    assert all(b.confidence == pytest.approx(0.4 * 0.9) for b in corrupted)
    assert all(b.score == a.score for a, b, g in zip(truth, corrupted, guessed) if not g)
    guesses = [b.score for b, g in zip(corrupted, guessed) if g]
    assert set(guesses) == {0.0, 1.0} and sum(guesses) / len(guesses) == pytest.approx(0.5, abs=0.04)
    # agreement with the truth: right when not guessing, half the time when guessing
    agreement = sum(a.score == b.score for a, b in zip(truth, corrupted)) / len(truth)
    assert agreement == pytest.approx(1 - 0.6 / 2, abs=0.03)


def test_draws_are_fixed_by_the_request_not_the_batch_and_only_named_items_change():
    requests = _requests(300) + _requests(300, item="style")
    critic = CorruptedCritic(Oracle(), "invert", rate=0.5, items=["correct"], seed=3)
    whole = critic.judge(requests)
    one_by_one = [critic.judge([r])[0] for r in reversed(requests)][::-1]
    assert whole == one_by_one
    assert whole[300:] == Oracle().judge(requests[300:])  # "style" is not corrupted
    assert whole[:300] != Oracle().judge(requests[:300])
    assert CorruptedCritic(Oracle(), "invert", rate=0.5, items=["correct"], seed=4).judge(requests) != whole


def test_a_failed_judgement_stays_failed_and_bad_settings_are_refused():
    request = JudgeRequest("1+1=", "x", "correct", "Is it right?")
    assert CorruptedCritic(Oracle(), "noise", rate=1.0).judge([request]) == [None]
    with pytest.raises(ValueError, match="mode"):
        CorruptedCritic(Oracle(), "flip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        CorruptedCritic(Oracle(), "noise", rate=1.5)


def test_it_wraps_any_critic_a_config_names():
    inner = CallableCritic("tests.rewards.test_corrupted_critic:even_is_right")
    (judgement,) = CorruptedCritic(inner, "invert").judge([JudgeRequest("1+1=", "2", "correct", "Is it right?")])
    assert judgement == Judgement(0.0, 0.8, "inverted: ")


def even_is_right(request: JudgeRequest) -> tuple[float, float]:
    return float(int(request.response) % 2 == 0), 0.8
