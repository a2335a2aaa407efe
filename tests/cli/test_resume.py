"""Resuming from a mid-run checkpoint reaches the same weights as an uninterrupted run."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.algorithms import OptimizerConfig, SFTModule
from grape_lightning.data import SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask
from tests.conftest import tiny_spec


class StopAt(L.Callback):
    """Ends fit after ``step`` optimizer steps, as an interrupted run would (max_steps stays the same,
    so the learning-rate schedule is the one of the full run)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _run(root, max_steps, ckpt_path=None, checkpoint=None, stop_at=None):
    L.seed_everything(0)
    module = SFTModule(tiny_spec(), optimizer=OptimizerConfig(lr=1e-2, warmup_steps=3, schedule="cosine"))
    datamodule = SFTDataModule(task=ArithmeticTask(num_train=50, num_val=8), batch_size=8, max_length=16)
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=[c for c in (checkpoint, stop_at and StopAt(stop_at)) if c], enable_checkpointing=bool(checkpoint),
        val_check_interval=4, check_val_every_n_epoch=None,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, trainer


def test_resume_mid_epoch_matches_uninterrupted_run(tmp_path):
    # 50 examples / batch 8 = 7 batches an epoch: step 5 is mid-epoch, step 12 is in the second epoch.
    uninterrupted, _ = _run(tmp_path / "full", 12)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    _, first = _run(tmp_path / "first", 12, checkpoint=checkpoint, stop_at=5)
    assert first.global_step == 5
    resumed, trainer = _run(tmp_path / "second", 12, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=5.ckpt"))
    assert trainer.global_step == 12
    for ours, reference in zip(resumed.policy.parameters(), uninterrupted.policy.parameters()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_checkpoint_holds_plain_hyperparameters(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    _run(tmp_path, 2, checkpoint=checkpoint)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(path, weights_only=True)  # plain types only: loads without pickled classes
    assert state["hyper_parameters"]["policy"]["tokenizer"] == "grape/char"
    restored = SFTModule.load_from_checkpoint(path)
    assert restored.optimizer_config.lr == 1e-2


# -- through the real ``grape`` command, with the shipped config's TensorBoard logger (the killed run
# in a process of its own, the others in this one) ----------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from grape_lightning.checkpointing import UnreadableCheckpointError  # noqa: E402
from tests.cli_runner import grape_here  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _grape(workdir: Path, *args: str) -> str:
    """``grape fit`` of the run, in this process: only the run that is killed needs its own."""
    _, output = grape_here("fit", "--config", str(ROOT / "configs/grpo.yaml"), "--config", "override.yaml", *args, cwd=workdir)
    return output


def _train_steps(event_file: Path) -> list[int]:
    events = EventAccumulator(str(event_file))
    events.Reload()
    return [event.step for event in events.Scalars("train/reward")]


def test_killed_run_continues_in_its_own_log_directory_and_a_chosen_run_resumes_by_path(tmp_path):
    """The README's commands: a run killed with SIGKILL and started again with ``--ckpt_path last``
    goes on in the same ``version_0`` (same TensorBoard run, next step); ``--ckpt_path
    <run>/checkpoints/last.ckpt`` continues that run even when a later one exists; a torn
    ``last.ckpt`` is named, and ``--ckpt_path last`` falls back to the intact checkpoint beside it."""
    override = {
        "trainer": {
            "max_steps": 6, "val_check_interval": 1000, "log_every_n_steps": 1, "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 2, "save_last": True}},
                {"class_path": "tests.cli.test_fault_tolerance.Pace", "init_args": {"seconds": 0.5}},
                {"class_path": "tests.cli.test_fault_tolerance.Record", "init_args": {"directory": "record"}},
            ],
        },
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 4}}, "batch_size": 4, "group_size": 2}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    command = [sys.executable, "-m", "grape_lightning.cli", "fit", "--config", str(ROOT / "configs/grpo.yaml"),
               "--config", "override.yaml", "--ckpt_path", "last"]
    run = tmp_path / "runs" / "grpo" / "version_0"
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "epoch=0-step=2.ckpt").exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.05)
        time.sleep(0.75)  # into step 3 or 4, before the next checkpoint
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()

    output = _grape(tmp_path, "--ckpt_path", "last")
    assert "Continuing run runs/grpo/version_0 (--ckpt_path last)" in output
    assert "no last checkpoint available" not in output
    assert sorted(p.name for p in (tmp_path / "runs" / "grpo").iterdir()) == ["version_0"]
    assert [int(s) for s in (tmp_path / "record" / "starts.txt").read_text().split()] == [0, 2]
    first, second = sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    killed_steps, resumed_steps = _train_steps(first), _train_steps(second)
    print(f"\nkilled run logged train/reward at steps {killed_steps}; the resumed one at {resumed_steps}")
    # metrics of the batch that starts at step s are logged at s: the resumed run goes on right after the checkpoint
    assert killed_steps[:2] == [0, 1] and resumed_steps == [2, 3, 4, 5]  # (the killed run may have logged step 2 too)

    # a later, separate run, then the earlier one chosen by its checkpoint's path
    _grape(tmp_path, "--trainer.max_steps", "2")
    assert (tmp_path / "runs" / "grpo" / "version_1" / "checkpoints" / "last.ckpt").is_file()
    output = _grape(tmp_path, "--ckpt_path", "runs/grpo/version_0/checkpoints/last.ckpt", "--trainer.max_steps", "8")
    assert "Continuing run runs/grpo/version_0" in output
    assert sorted(p.name for p in (tmp_path / "runs" / "grpo").iterdir()) == ["version_0", "version_1"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8

    # the latest run's last.ckpt torn in half: named, with the intact checkpoint beside it
    latest = tmp_path / "runs" / "grpo" / "version_1" / "checkpoints"
    torn = latest / "last.ckpt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    with pytest.raises(UnreadableCheckpointError) as unreadable:
        _grape(tmp_path, "--ckpt_path", "runs/grpo/version_1/checkpoints/last.ckpt", "--trainer.max_steps", "4")
    assert "checkpoint runs/grpo/version_1/checkpoints/last.ckpt cannot be read: it is truncated or corrupt" in str(unreadable.value)
    assert "The newest intact checkpoint beside it is runs/grpo/version_1/checkpoints/epoch=0-step=2.ckpt" in str(unreadable.value)
    output = _grape(tmp_path, "--ckpt_path", "last", "--trainer.max_steps", "4")
    assert "moved it to last.ckpt.unreadable and resuming from the newest intact checkpoint beside it" in output
    assert "epoch=0-step=2.ckpt" in output
    assert torch.load(latest / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (latest / "last.ckpt.unreadable").is_file()
