"""DAPO's soft overlong punishment: the equation by hand, in float64 against exact fractions, and
the response lengths in tokens that the rollout collector hands it."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from grape_lightning.rewards import OverlongPunishment, overlong_punishment


@pytest.mark.parametrize(
    "length, expected",
    [(0, 0.0), (5, 0.0), (12, 0.0), (13, -0.125), (16, -0.5), (19, -0.875), (20, -1.0), (21, -1.0), (400, -1.0)],
)
def test_overlong_punishment_by_hand(length, expected):
    # L_max = 20, L_cache = 8: no penalty up to 12 tokens, -1/8 per token from 13 to 20, -1 beyond
    assert overlong_punishment(length, max_length=20, cache_length=8) == expected


def test_overlong_punishment_float64_against_exact_fractions():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        max_length = int(torch.randint(2, 4096, (1,), generator=generator))
        cache_length = int(torch.randint(1, max_length + 1, (1,), generator=generator))
        length = int(torch.randint(0, 2 * max_length, (1,), generator=generator))
        if length <= max_length - cache_length:
            exact = Fraction(0)
        elif length <= max_length:
            exact = Fraction((max_length - cache_length) - length, cache_length)
        else:
            exact = Fraction(-1)
        value = overlong_punishment(length, max_length, cache_length)
        assert abs(Fraction(value) - exact) <= Fraction(1, 2**52), (length, max_length, cache_length)
        assert -1.0 <= value <= 0.0


def test_the_reward_reads_the_token_count_and_refuses_rows_without_it():
    reward = OverlongPunishment(max_length=6, cache_length=2, weight=0.5)
    assert reward.name == "overlong_punishment" and reward.weight == 0.5
    metadata = [{"response_tokens": n, "answer": "1"} for n in (3, 4, 5, 6, 7)]
    assert reward(["p"] * 5, ["x"] * 5, metadata) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match=r"row 1 has no metadata\['response_tokens'\]"):
        reward(["p", "p"], ["a", "b"], [{"response_tokens": 1}, {"answer": "2"}])
    for bad in ({"max_length": 4, "cache_length": 0}, {"max_length": 4, "cache_length": 5}):
        with pytest.raises(ValueError, match="cache_length"):
            OverlongPunishment(**bad)


def test_the_collector_passes_each_response_its_generated_token_count():
    from grape_lightning.algorithms import GRPOModule, SurrogateConfig
    from grape_lightning.data.tasks import ArithmeticTask
    from grape_lightning.rewards import NumericMatch
    from grape_lightning.rollout import RolloutDataModule, SamplingParams
    from tests.conftest import tiny_spec

    module = GRPOModule(
        tiny_spec(), rewards=[NumericMatch(), OverlongPunishment(max_length=6, cache_length=3)],
        sampling=SamplingParams(max_new_tokens=6), loss=SurrogateConfig(beta=0.0),
    )
    data = RolloutDataModule(task=ArithmeticTask(num_train=16, num_val=2), group_size=4, batch_size=4)
    data.set_tokenizer(module.tokenizer)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    rollout = module.collect_rollout(batch)
    lengths = rollout.response_lengths.tolist()
    assert [meta["response_tokens"] for meta in rollout.metadata] == lengths
    assert len(set(lengths)) > 1  # the random tiny model's responses differ in length
    expected = [0.0 if n <= 3 else (3 - n) / 3 for n in lengths]
    assert rollout.reward_terms["overlong_punishment"].tolist() == expected
    assert all("response_tokens" not in meta for meta in batch["metadata"])  # the batch's rows are left as they are
    assert rollout.metadata[0]["answer"] == batch["metadata"][0]["answer"]
