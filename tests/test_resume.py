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
