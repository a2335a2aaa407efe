"""TRPO under two-process CPU DDP (gloo) through the real ``grape`` command: each rank samples its
own prompts, yet gradients, Fisher-vector products and line-search measurements are averaged, so
both ranks take the same steps and end with bit-identical weights."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


class SaveRankWeights(L.Callback):
    """Writes each rank's policy weights at the start and end of training, and its last prompts."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _save(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().clone() for name, tensor in module.policy.state_dict().items()}
        prompts = [sample["prompt"] for sample in module.last_samples]
        torch.save({"policy": state, "prompts": prompts}, self.directory / f"{stage}-rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "start")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._save(trainer, module, "end")


def test_two_ddp_ranks_end_with_identical_weights(tmp_path):
    override = {
        "trainer": {
            "max_steps": 3,
            "val_check_interval": 3,
            "logger": False,
            "callbacks": [
                {"class_path": "tests.test_trpo_ddp.SaveRankWeights", "init_args": {"directory": str(tmp_path / "weights")}},
            ],
        },
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 16}}, "batch_size": 4}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "grape_lightning.cli", "fit",
        "--config", str(ROOT / "configs/trpo.yaml"), "--config", "override.yaml",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    start = [torch.load(tmp_path / "weights" / f"start-rank{rank}.pt") for rank in (0, 1)]
    end = [torch.load(tmp_path / "weights" / f"end-rank{rank}.pt") for rank in (0, 1)]
    assert end[0]["prompts"] != end[1]["prompts"]  # the ranks trained on different rollouts
    for name, initial in start[0]["policy"].items():
        assert torch.equal(initial, start[1]["policy"][name])
        assert torch.equal(end[0]["policy"][name], end[1]["policy"][name]), name
    assert any(not torch.equal(start[0]["policy"][name], end[0]["policy"][name]) for name in start[0]["policy"])
