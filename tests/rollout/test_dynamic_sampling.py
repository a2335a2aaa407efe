"""Dynamic sampling: the filter, the rounds, the batch it assembles, its statistics across processes,
the fresh prompts' determinism, and Rollout's select / concat it is built on."""

from __future__ import annotations

import math

import pytest
import torch

from grape_lightning.rollout.batch import Rollout
from grape_lightning.rollout.dynamic_sampling import DynamicSamplingConfig, dynamic_sample, informative_groups, select_groups
from tests.thread_processes import run_ranks

NAN = float("nan")


def fake_rollout(rewards: list[list[float]], width: int = 5, tag: str = "", seed: int = 0) -> Rollout:
    """A rollout of len(rewards) groups of len(row) responses each; NaN rewards are invalid.
    Response i of group g is named f"{tag}{g}.{i}"; every tensor holds distinct values."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.tensor([r for row in rewards for r in row], dtype=torch.float64)
    groups = torch.tensor([g for g, row in enumerate(rewards) for _ in row])
    n = len(flat)
    lengths = torch.randint(1, width - 1, (n,), generator=generator)
    columns = torch.arange(width)
    response_mask = (columns >= 1) & (columns < 1 + lengths[:, None])
    attention_mask = (columns < 1 + lengths[:, None]).long()
    return Rollout(
        input_ids=torch.randint(3, 90, (n, width), generator=generator) * attention_mask,
        attention_mask=attention_mask,
        response_mask=response_mask,
        old_logprobs=-torch.rand(n, width, generator=generator, dtype=torch.float64) * response_mask,
        sampling_logprobs=-torch.rand(n, width, generator=generator, dtype=torch.float64) * response_mask,
        rewards=flat,
        valid=~torch.isnan(flat),
        groups=groups,
        prompts=[f"{tag}{g}" for g in groups.tolist()],
        responses=[f"{tag}{g}.{i}" for g, row in enumerate(rewards) for i in range(len(row))],
        metadata=[{"group": f"{tag}{g}"} for g in groups.tolist()],
        reward_terms={"r": flat.clone()},
        reward_confidences={"r": torch.rand(n, generator=generator, dtype=torch.float64)},
        correct=flat == 1,
        off_policy=torch.zeros(n, dtype=torch.bool),
        statistics={"s": float(len(rewards))},
        generation_seconds=1.0,
    )


def prompt_batch(groups: int, group_size: int, tag: str = "") -> dict:
    rows = [g for g in range(groups) for _ in range(group_size)]
    return {
        "prompt_ids": [[g] for g in rows], "prompts": [f"{tag}{g}" for g in rows], "metadata": [{"group": f"{tag}{g}"} for g in rows],
        "groups": torch.tensor(rows),
    }


def hand_informative(rewards: list[list[float]]) -> list[bool]:
    """Independently: at least two valid rewards and not all equal."""
    result = []
    for row in rewards:
        values = [r for r in row if not math.isnan(r)]
        result.append(len(values) >= 2 and len(set(values)) > 1)
    return result


def test_informative_groups_are_those_with_two_valid_unequal_rewards_float64():
    generator = torch.Generator().manual_seed(1)
    rewards = [
        [1.0, 1.0, 1.0, 1.0],  # all right
        [0.0, 1.0, 0.0, 0.0],
        [0.1, 0.1, 0.1, 0.1],  # ties that a naive mean/std in float64 rounds to std 1e-17
        [0.3, NAN, NAN, NAN],  # one valid reward: no baseline to differ from
        [NAN, NAN, NAN, NAN],
        [0.5, NAN, 0.5, 0.5 + 1e-15],  # unequal by one ulp-scale step: a signal
        [NAN, 0.2, 0.7, NAN],
    ] + [torch.rand(4, generator=generator, dtype=torch.float64).round(decimals=1).tolist() for _ in range(20)]
    flat = torch.tensor([r for row in rewards for r in row], dtype=torch.float64)
    groups = torch.arange(len(rewards)).repeat_interleave(4)
    assert informative_groups(flat, groups, ~torch.isnan(flat)).tolist() == hand_informative(rewards)


def sampler(table: dict[int, list[list[float]]], calls: list):
    """sample(batch, round) -> the round's rollout from ``table``, recording what it was asked."""

    def sample(batch, round_number):
        calls.append((round_number, batch["prompts"][:: max(1, len(batch["prompts"]) // max(1, len(set(batch["groups"].tolist()))))]))
        return fake_rollout(table[round_number], width=4 + round_number, tag=f"r{round_number}g", seed=round_number)

    return sample


def test_rounds_keep_informative_groups_in_sampling_order_truncate_and_log():
    table = {
        0: [[1, 1, 1], [0, 1, 1], [0, 0, 0], [1, 0, NAN]],  # groups 1 and 3 informative: 2 of 4
        1: [[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 0]],  # 1 and 3 again: 4 kept, stop here
        2: [[0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]],  # never sampled
    }
    calls, draws = [], []

    def draw(count, round_number):
        draws.append((count, round_number))
        return prompt_batch(count, 3, tag=f"fresh{round_number}_")

    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=2), prompt_batch(4, 3), sampler(table, calls), draw)
    assert [c[0] for c in calls] == [0, 1]
    assert draws == [(4, 1)]
    assert rollout.responses == [f"r0g1.{i}" for i in range(3)] + [f"r0g3.{i}" for i in range(3)] + [
        f"r1g1.{i}" for i in range(3)] + [f"r1g3.{i}" for i in range(3)]
    assert rollout.groups.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    sampled = [r for rnd in (0, 1) for row in table[rnd] for r in row if not math.isnan(r)]
    assert stats == {
        "rounds": 2.0, "prompts_generated": 8.0, "kept_groups": 4 / 8, "filled_groups": 0.0,
        "sampled_reward": sum(sampled) / len(sampled), "sampled_accuracy": sampled.count(1) / 24,
    }
    assert informative_groups(rollout.rewards, rollout.groups, rollout.valid).all()

    # more informative groups than wanted: the first `target` in sampling order
    table[1] = [[0, 1, 0]] * 4
    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=2), prompt_batch(4, 3), sampler(table, []), draw)
    assert [r.split(".")[0] for r in rollout.responses[::3]] == ["r0g1", "r0g3", "r1g0", "r1g1"]
    assert stats["kept_groups"] == 6 / 8 and stats["rounds"] == 2.0


def test_when_rounds_run_out_tied_groups_fill_the_batch_first_sampled_first():
    table = {0: [[1, 1], [0, 1], [0, 0], [1, 1]], 1: [[0, 0], [1, 1], [1, 1], [0, 0]]}
    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=1), prompt_batch(4, 2), sampler(table, []), lambda c, r: prompt_batch(c, 2))
    assert [r.split(".")[0] for r in rollout.responses[::2]] == ["r0g1", "r0g0", "r0g2", "r0g3"]
    assert stats == {
        "rounds": 2.0, "prompts_generated": 8.0, "kept_groups": 1 / 8, "filled_groups": 3 / 4, "sampled_reward": 9 / 16, "sampled_accuracy": 9 / 16,
    }
    # the rows and every per-row field follow the selection
    assert rollout.rewards.tolist() == [0, 1, 1, 1, 0, 0, 1, 1]
    assert rollout.reward_terms["r"].tolist() == rollout.rewards.tolist()
    assert rollout.correct.tolist() == [False, True, True, True, False, False, True, True]


def test_no_extra_round_when_the_batch_is_informative_and_zero_rounds_only_filters():
    table = {0: [[1, 0], [0, 1]], 1: [[0, 1], [0, 1]]}
    calls = []
    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=3), prompt_batch(2, 2), sampler(table, calls), None)
    assert [c[0] for c in calls] == [0] and stats["rounds"] == 1.0 and stats["kept_groups"] == 1.0
    table = {0: [[1, 1], [0, 1]]}
    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=0), prompt_batch(2, 2), sampler(table, []), None)
    assert [r.split(".")[0] for r in rollout.responses[::2]] == ["r0g1", "r0g0"] and stats["filled_groups"] == 0.5


def test_repeat_samples_the_batch_tied_prompts_again():
    table = {0: [[1, 1], [0, 1], [0, 0]], 1: [[1, 0], [0, 0]]}
    seen = []

    def sample(batch, round_number):
        seen.append(batch)
        return fake_rollout(table[round_number], tag=f"r{round_number}g")

    batch = prompt_batch(3, 2, tag="p")
    rollout, stats = dynamic_sample(DynamicSamplingConfig(max_rounds=1, prompts="repeat"), batch, sample, None)
    assert seen[1]["prompts"] == ["p0", "p0", "p2", "p2"] and seen[1]["groups"].tolist() == [0, 0, 1, 1]
    assert seen[1]["metadata"] == [{"group": "p0"}] * 2 + [{"group": "p2"}] * 2
    assert [r.split(".")[0] for r in rollout.responses[::2]] == ["r0g1", "r1g0", "r0g0"]
    assert select_groups(batch, [2])["prompt_ids"] == [[2], [2]]


def test_processes_run_the_same_rounds_and_reduce_statistics_globally():
    """Rank 0's batch is informative; rank 1 needs two extra rounds: rank 0 takes part in them
    without sampling (``idle``), both make the same collective calls, and the statistics are
    those of both ranks together."""
    tables = {
        0: {0: [[0, 1], [1, 0]]},
        1: {0: [[1, 1], [0, 0]], 1: [[1, 1], [0, 1]], 2: [[1, 0], [1, 1]]},
    }
    idles = {0: 0, 1: 0}

    def work(rank, sum_across):
        def idle():
            idles[rank] += 1

        calls = []
        rollout, stats = dynamic_sample(
            DynamicSamplingConfig(max_rounds=3), prompt_batch(2, 2), sampler(tables[rank], calls), lambda c, r: prompt_batch(c, 2),
            idle, sum_across,
        )
        return rollout, stats, [c[0] for c in calls]

    (rollout0, stats0, calls0), (rollout1, stats1, calls1) = run_ranks(2, work)
    assert calls0 == [0] and calls1 == [0, 1, 2] and idles == {0: 2, 1: 0}
    assert stats0 == stats1 == {
        "rounds": 3.0, "prompts_generated": 8.0, "kept_groups": 4 / 8, "filled_groups": 0.0, "sampled_reward": 10 / 16, "sampled_accuracy": 10 / 16,
    }
    assert len(rollout0) == len(rollout1) == 4
    assert [r.split(".")[0] for r in rollout1.responses[::2]] == ["r1g1", "r2g0"]


def test_config_is_checked():
    for bad in ({"max_rounds": -1}, {"prompts": "new"}, {"prompts_per_round": 0}):
        with pytest.raises(ValueError, match="dynamic_sampling"):
            DynamicSamplingConfig(**bad)


def test_concat_pads_to_the_widest_offsets_groups_and_select_renumbers():
    a = fake_rollout([[1, 0], [0, 0, 1]], width=5, tag="a", seed=1)
    b = fake_rollout([[1, 1]], width=8, tag="b", seed=2)
    b.ref_logprobs, a.ref_logprobs = -torch.rand(2, 8, dtype=torch.float64), -torch.rand(5, 5, dtype=torch.float64)
    both = Rollout.concat([a, b], pad_id=7)
    assert both.input_ids.shape == (7, 8) and both.groups.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert torch.equal(both.input_ids[:5, :5], a.input_ids) and (both.input_ids[:5, 5:] == 7).all()
    assert torch.equal(both.input_ids[5:], b.input_ids)
    for name, fill in (("attention_mask", 0), ("response_mask", False), ("old_logprobs", 0.0), ("ref_logprobs", 0.0)):
        assert torch.equal(getattr(both, name)[:5, :5], getattr(a, name)) and (getattr(both, name)[:5, 5:] == fill).all()
        assert torch.equal(getattr(both, name)[5:], getattr(b, name))
    assert both.responses == a.responses + b.responses and both.metadata == a.metadata + b.metadata
    assert both.statistics == {"s": (2 * 5 + 1 * 2) / 7} and both.generation_seconds == 2.0
    # trimming to the rows' real width gives back the original model inputs
    for row in range(7):
        source, index = (a, row) if row < 5 else (b, row - 5)
        inputs = both.model_inputs(torch.tensor([row]))
        original = source.model_inputs(torch.tensor([index]))
        assert all(torch.equal(inputs[key], original[key]) for key in inputs)
    picked = both.select(torch.tensor([5, 6, 0, 1]), groups=torch.tensor([0, 0, 1, 1]))
    assert picked.responses == ["b0.0", "b0.1", "a0.0", "a0.1"] and picked.groups.tolist() == [0, 0, 1, 1]
    assert torch.equal(picked.ref_logprobs[2:], both.ref_logprobs[:2]) and picked.reward_terms["r"].tolist() == [1, 1, 1, 0]
    assert torch.equal(both.reward_confidences["r"], torch.cat([a.reward_confidences["r"], b.reward_confidences["r"]]))
    assert torch.equal(picked.reward_confidences["r"], both.reward_confidences["r"][[5, 6, 0, 1]])
    with pytest.raises(ValueError, match="ref_logprobs is set in some rollouts only"):
        Rollout.concat([a, fake_rollout([[1, 0]])])


def test_fresh_prompts_depend_on_the_generator_alone():
    from grape_lightning.data.char_tokenizer import build_char_tokenizer
    from grape_lightning.data.tasks import ArithmeticTask
    from grape_lightning.rollout import RolloutDataModule

    def datamodule():
        data = RolloutDataModule(task=ArithmeticTask(num_train=10, num_val=2), group_size=3, batch_size=4)
        data.set_tokenizer(build_char_tokenizer())
        data.setup()
        return data

    first, second = datamodule(), datamodule()
    next(iter(second.train_dataloader()))  # the loader's position does not matter
    a = first.draw_prompts(4, torch.Generator().manual_seed(5))
    b = second.draw_prompts(4, torch.Generator().manual_seed(5))
    assert a["prompts"] == b["prompts"] and a["groups"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(set(a["prompts"])) == 4  # no prompt twice within a round
    assert first.draw_prompts(4, torch.Generator().manual_seed(6))["prompts"] != a["prompts"]
    assert len(set(first.draw_prompts(25, torch.Generator().manual_seed(5))["prompts"])) == 10  # more than the set: every prompt
