"""``train/tied_groups`` and ``train/group_reward_std``, which every on-policy algorithm logs from
its rollout, against a float64 hand computation on random groups."""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import torch

from grape_lightning.algorithms.on_policy import OnPolicyModule


class _Recorder:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name, value, **_):
        self.logged[name] = float(value)

    def sum_across_processes(self, tensor):
        return tensor


def test_tied_share_and_within_group_std_match_a_hand_computation():
    rng = random.Random(0)
    rewards, groups, valid = [], [], []
    for group in range(40):
        size = rng.choice([1, 3, 4])  # a group of one valid response has no spread to read: left out
        tie = rng.random() < 0.3
        value = rng.choice([0.0, 1.0])
        for _ in range(size):
            rewards.append(value if tie else rng.choice([0.0, 0.5, 1.0]) + rng.random() * 0.1)
            groups.append(group)
            valid.append(rng.random() > 0.1)
    rollout = SimpleNamespace(rewards=torch.tensor(rewards), groups=torch.tensor(groups), valid=torch.tensor(valid))
    recorder = _Recorder()
    OnPolicyModule._log_group_spread(recorder, rollout, {})

    members: dict[int, list[float]] = {}
    for reward, group, ok in zip(rewards, groups, valid):
        if ok:
            members.setdefault(group, []).append(float(torch.tensor(reward, dtype=torch.float32)))
    scored = [values for values in members.values() if len(values) >= 2]
    tied = sum(max(values) == min(values) for values in scored)
    assert recorder.logged["train/tied_groups"] == tied / len(scored)
    expected_std = statistics.fmean(statistics.stdev(values) for values in scored)
    assert abs(recorder.logged["train/group_reward_std"] - expected_std) < 1e-6
    assert 0 < tied < len(scored)  # the draw holds both kinds of group


def test_nothing_is_logged_without_a_group_of_two():
    rollout = SimpleNamespace(rewards=torch.tensor([1.0, 0.0]), groups=torch.tensor([0, 1]), valid=torch.tensor([True, True]))
    recorder = _Recorder()
    OnPolicyModule._log_group_spread(recorder, rollout, {})
    assert recorder.logged == {}
