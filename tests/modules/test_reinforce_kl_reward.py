"""REINFORCE's KL-to-reference reward: per sequence (RLOO) and per token with a reward-to-go
(REINFORCE++), the advantages against float64 loops on a hand-built rollout."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from grape_lightning.algorithms import AdvantageConfig, REINFORCEModule
from grape_lightning.rollout.batch import Rollout
from tests.conftest import tiny_spec

BETA = 0.1
EPS = 1e-4


def _rollout(seed: int) -> Rollout:
    """Three groups of four responses of 1..6 tokens, one unscored (NaN reward, not valid)."""
    rng = random.Random(seed)
    rows, time = 12, 6
    mask = torch.zeros(rows, time, dtype=torch.bool)
    for i in range(rows):
        start = rng.randint(0, 2)
        mask[i, start:start + rng.randint(1, time - start)] = True
    old = torch.tensor([[rng.uniform(-3, -0.1) for _ in range(time)] for _ in range(rows)], dtype=torch.float64)
    ref = old + torch.tensor([[rng.uniform(-0.5, 0.5) for _ in range(time)] for _ in range(rows)], dtype=torch.float64)
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(rows)], dtype=torch.float64)
    valid = torch.ones(rows, dtype=torch.bool)
    rewards[5], valid[5] = math.nan, False
    return Rollout(
        input_ids=torch.zeros(rows, time, dtype=torch.long), attention_mask=torch.ones(rows, time, dtype=torch.long), response_mask=mask,
        old_logprobs=old, ref_logprobs=ref, rewards=rewards, valid=valid, groups=torch.arange(rows) // 4,
        prompts=[""] * rows, responses=[""] * rows, metadata=[{}] * rows,
    )


def _module(**options) -> REINFORCEModule:
    module = REINFORCEModule(tiny_spec(dtype="float64"), kl_coef=BETA, **options)
    module.logged = {}
    module.log_metrics = lambda metrics, prefix="train/": module.logged.update(metrics)
    return module


def _baselines(rewards, groups, valid, baseline):
    out = []
    for i in range(len(rewards)):
        others = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and valid[j] and j != i]
        members = others + [rewards[i]]
        out.append({"none": 0.0, "mean": math.fsum(members) / len(members), "leave_one_out": math.fsum(others) / len(others)}[baseline])
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("baseline, scaling", [("none", "whiten"), ("mean", "whiten"), ("leave_one_out", "none")])
def test_per_token_kl_reward_matches_loops(seed, baseline, scaling):
    """A_it = scale(r_i - b_i - beta sum_{s >= t} (l_old_is - l_ref_is)), whitened over every response
    token of the valid rows (unbiased std), 0 on padding and on the unscored row."""
    rollout = _rollout(seed)
    module = _module(advantage=AdvantageConfig(baseline, scaling, eps=EPS), kl_reward="token")
    got = module.advantages(rollout)
    rewards, groups, valid = rollout.rewards.tolist(), rollout.groups.tolist(), rollout.valid.tolist()
    mask, old, ref = rollout.response_mask.tolist(), rollout.old_logprobs.tolist(), rollout.ref_logprobs.tolist()
    baselines = _baselines(rewards, groups, valid, baseline)
    returns = {}
    for i, mrow in enumerate(mask):
        if not valid[i]:
            continue
        for t, m in enumerate(mrow):
            if m:
                later_kl = math.fsum(old[i][s] - ref[i][s] for s in range(t, len(mrow)) if mrow[s])
                returns[i, t] = rewards[i] - baselines[i] - BETA * later_kl
    if scaling == "whiten":
        mean, std = statistics.fmean(returns.values()), statistics.stdev(returns.values())
        returns = {key: (value - mean) / (std + EPS) for key, value in returns.items()}
    expected = torch.zeros_like(rollout.old_logprobs)
    for (i, t), value in returns.items():
        expected[i, t] = value
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    sequence_kl = [math.fsum(o - r for o, r, m in zip(orow, rrow, mrow) if m) for orow, rrow, mrow, v in zip(old, ref, mask, valid) if v]
    assert module.logged["kl"] == pytest.approx(math.fsum(sequence_kl) / len(sequence_kl), rel=1e-12)
    # each token carries only the KL after it: two tokens of one row differ by the KL between them
    assert len({round(value, 9) for (i, _), value in returns.items() if i == 0}) == sum(mask[0])


def test_sequence_kl_reward_subtracts_the_summed_kl_from_the_reward():
    """RLOO: A_i = r_i - beta sum_t k1_it - (the same of the other members of i's group, averaged)."""
    rollout = _rollout(0)
    module = _module(advantage=AdvantageConfig("leave_one_out", "none"))
    got = module.advantages(rollout)
    mask, old, ref = rollout.response_mask.tolist(), rollout.old_logprobs.tolist(), rollout.ref_logprobs.tolist()
    shaped = [r - BETA * math.fsum(o - f for o, f, m in zip(orow, frow, mrow) if m)
              for r, orow, frow, mrow in zip(rollout.rewards.tolist(), old, ref, mask)]
    baselines = _baselines(shaped, rollout.groups.tolist(), rollout.valid.tolist(), "leave_one_out")
    expected = [s - b if v else 0.0 for s, b, v in zip(shaped, baselines, rollout.valid.tolist())]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_per_token_kl_reward_refuses_a_sequence_scaling_and_an_unknown_placement():
    with pytest.raises(ValueError, match="advantage.scaling must be 'none' or 'whiten'"):
        REINFORCEModule(tiny_spec(), kl_coef=BETA, kl_reward="token", advantage=AdvantageConfig("mean", "group"))
    with pytest.raises(ValueError, match="kl_reward must be one of"):
        REINFORCEModule(tiny_spec(), kl_coef=BETA, kl_reward="prefix")
