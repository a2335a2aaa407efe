"""A run stopped mid-epoch and resumed sees exactly the batches an uninterrupted run sees."""

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.data.resumable_loader import ResumableDataLoader


class RecordingModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.extend(batch.tolist())
        return (self.weight * batch.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> ResumableDataLoader:
    return ResumableDataLoader(list(range(20)), batch_size=3, collate_fn=torch.tensor, seed=7)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=list(callbacks), default_root_dir=tmp_path, enable_checkpointing=bool(callbacks),
    )


def test_order_depends_on_seed_and_epoch_only():
    first, second = _loader(), _loader()
    assert [b.tolist() for b in first] == [b.tolist() for b in second]
    first.sampler.set_epoch(1)
    assert [b.tolist() for b in first] != [b.tolist() for b in second]


def test_mid_epoch_resume_continues_with_the_next_batch(tmp_path):
    full = RecordingModule()
    _trainer(tmp_path / "full", max_steps=17).fit(full, _loader())  # 7 batches an epoch: 2 epochs + 3

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    first_half = RecordingModule()
    _trainer(tmp_path / "a", max_steps=10, callbacks=[checkpoint]).fit(first_half, _loader())
    resumed = RecordingModule()
    _trainer(tmp_path / "b", max_steps=17).fit(resumed, _loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=10.ckpt"))

    assert first_half.seen + resumed.seen == full.seen
    torch.testing.assert_close(resumed.weight, full.weight, rtol=0, atol=0)
