"""Algorithms with cross-process statistics under two-process CPU DDP (gloo), through the real
``grape`` command. Each rank samples its own prompts, yet the ranks must take the same steps and
end with bit-identical state: TRPO sums every rank's share of gradients, Fisher-vector products and line-search
measurements; PPO whitens advantages, scales rewards, adapts its KL coefficient and stops an
epoch early on statistics summed over the ranks."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


class SaveRankWeights(L.Callback):
    """Writes each rank's trained state (policy, value model, buffers) at the start and end of
    training, and its last prompts."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _save(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}
        prompts = [sample["prompt"] for sample in module.last_samples]
        rollouts = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        torch.save({"state": state, "prompts": prompts, "rollouts": rollouts}, self.directory / f"{stage}-rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "start")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "end")


SETTINGS = {
    "trpo": {},
    # a separate critic, mini-batches, running reward scaling, adaptive KL and an early stop that
    # triggers on some rollouts: every branch that depends on summed statistics
    "ppo": {"init_args": {
        "value_model": "separate", "update": {"mini_batch_size": 16, "epochs": 3}, "reward_scaling": "running",
        "kl_target": 0.5, "kl_horizon": 100.0, "target_kl": 0.002, "optimizer": {"lr": 1e-3},
    }},
}


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_two_ddp_ranks_end_with_identical_state(algorithm, tmp_path):
    override = {
        "model": SETTINGS[algorithm],
        "trainer": {
            "max_steps": 6 if algorithm == "ppo" else 3,
            "val_check_interval": 3,
            "logger": False,
            "callbacks": [
                {"class_path": "tests.distributed.test_ddp.SaveRankWeights", "init_args": {"directory": str(tmp_path / "weights")}},
            ],
        },
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 16}}, "batch_size": 4}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "grape_lightning.cli", "fit",
        "--config", str(ROOT / f"configs/{algorithm}.yaml"), "--config", "override.yaml",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    start = [torch.load(tmp_path / "weights" / f"start-rank{rank}.pt") for rank in (0, 1)]
    end = [torch.load(tmp_path / "weights" / f"end-rank{rank}.pt") for rank in (0, 1)]
    assert end[0]["prompts"] != end[1]["prompts"]  # the ranks trained on different rollouts
    assert any(name.startswith("policy.") for name in end[0]["state"])
    for name, initial in start[0]["state"].items():
        assert torch.equal(initial, start[1]["state"][name])
        assert torch.equal(end[0]["state"][name], end[1]["state"][name]), name
    assert any(not torch.equal(start[0]["state"][name], end[0]["state"][name]) for name in start[0]["state"])
    if algorithm == "ppo":
        changed = [name for name in start[0]["state"] if not torch.equal(start[0]["state"][name], end[0]["state"][name])]
        assert any(name.startswith("value_model.") for name in changed)
        assert {"kl_coef", "reward_scale.moments"} <= set(changed)
        assert end[0]["rollouts"] == end[1]["rollouts"] > 1  # the early stop cut the first rollout's 6 steps short
