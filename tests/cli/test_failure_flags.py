"""A run whose reward is constant (a user's reward class beside the config) ties every group: the
real ``grape fit`` prints the tied-groups flag after its before -> after line."""

from __future__ import annotations

import textwrap

from tests.cli_runner import ROOT, run_grape

REWARD = """
from grape_lightning.rewards.base import RewardFunction


class ConstantReward(RewardFunction):
    def __call__(self, prompts, responses, metadata):
        return [1.0 for _ in responses]
"""

OVERRIDE = """
trainer:
  max_steps: 4
  val_check_interval: 2
  log_every_n_steps: 1
model:
  init_args:
    accuracy: null
    rewards:
      - class_path: constant_reward.ConstantReward
data:
  init_args:
    task:
      init_args:
        num_train: 64
        num_val: 8
    group_size: 4
    batch_size: 4
    val_batch_size: 8
"""


def test_constant_reward_run_prints_the_tied_groups_flag(tmp_path):
    (tmp_path / "constant_reward.py").write_text(textwrap.dedent(REWARD))
    (tmp_path / "override.yaml").write_text(OVERRIDE)
    result = run_grape("fit", "--config", str(ROOT / "configs/grpo.yaml"), "--config", "override.yaml", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert "WARNING tied_groups: most groups tied" in output, output[-3000:]
    assert "WARNING kl_runaway" not in output
