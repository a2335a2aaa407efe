"""What a user watches and reads back: the progress bar counts optimizer steps against max_steps
with reward and KL beside it, a run shorter than log_every_n_steps still logs, there is no
placeholder hp_metric, and sample tables reach a CSV logger as well as TensorBoard."""

from __future__ import annotations

import csv
import re

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grape_lightning.callbacks import StepProgressBar
from tests.cli_runner import ROOT, run_grape


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    """configs/ppo.yaml (2 optimizer steps per rollout batch, log_every_n_steps 5) for 4 steps,
    logging to TensorBoard and CSV."""
    workdir = tmp_path_factory.mktemp("ppo_logs")
    override = {
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "logger": [
                {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": "runs", "name": "ppo"}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "ppo_csv"}},
            ],
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}},
                {"class_path": "grape_lightning.callbacks.SampleTable", "init_args": {"every_n_steps": 2, "max_rows": 3}},
            ],
        },
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 8}}, "batch_size": 4, "group_size": 2}},
    }
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    result = run_grape("fit", "--config", str(ROOT / "configs/ppo.yaml"), "--config", "override.yaml", cwd=workdir)
    return workdir, result


def _bar_states(output: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", output) if line.strip().startswith("step:")]


def test_the_bar_counts_optimizer_steps_against_max_steps_with_reward_and_kl(ppo_run):
    workdir, result = ppo_run
    states = _bar_states(result.stdout)
    assert states, result.stdout[-2000:]
    final = states[-1]
    assert "| 4/4 [" in final and "reward=" in final and "kl=" in final and "val_acc=" in final
    assert "Epoch" not in result.stdout and "v_num" not in result.stdout
    counts = {int(match) for state in states for match in re.findall(r"\| (\d+)/4 \[", state)}
    assert counts <= {0, 2, 4} and 4 in counts  # PPO's two optimizer steps per rollout batch
    checkpoint = torch.load(workdir / "runs/ppo/version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4  # what the bar showed is what the module did


def test_a_run_shorter_than_log_every_n_steps_logs_its_metrics_and_no_hp_metric(ppo_run):
    workdir, _ = ppo_run
    events = EventAccumulator(str(workdir / "runs/ppo/version_0"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/reward", "train/kl", "train/value_loss"} <= scalars
    assert "hp_metric" not in scalars
    with open(workdir / "runs/ppo_csv/version_0/metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train/reward") for row in rows) and "hp_metric" not in rows[0]


def test_sample_tables_reach_the_csv_logger(ppo_run):
    workdir, _ = ppo_run
    with open(workdir / "runs/ppo_csv/version_0/samples.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"step", "prompt", "response", "reward"} <= set(rows[0])
    assert sorted({int(row["step"]) for row in rows}) == [2, 4] and len(rows) == 6  # 3 rows per table
    events = EventAccumulator(str(workdir / "runs/ppo/version_0"))
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]


class _Trainer:
    def __init__(self, metrics):
        self.callback_metrics = {name: torch.tensor(value) for name, value in metrics.items()}


@pytest.mark.parametrize("metrics, shown", [
    ({"train/reward": 0.5, "train/loss": 1.0, "train/kl": 0.01, "val/accuracy": 0.7}, {"reward": "0.5", "kl": "0.01", "val_acc": "0.7"}),
    ({"train/loss": 1.25, "val/accuracy": 0.5}, {"loss": "1.25", "val_acc": "0.5"}),  # SFT, DPO: no reward
    ({"train/reward": 0.25, "train/kl_after_step": 0.002}, {"reward": "0.25", "kl": "0.002"}),  # TRPO
])
def test_the_bar_shows_reward_or_loss_and_kl(metrics, shown):
    assert StepProgressBar().get_metrics(_Trainer(metrics), None) == shown
