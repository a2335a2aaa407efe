"""TRPO raises the greedy validation accuracy of the SFT-warmed tiny model.

Starting point: grape/tiny-addition-sft answers 48% of the 200 held-out two-digit additions
correctly under greedy decoding. 20 TRPO updates of 32 prompts x 8 samples (configs/trpo.yaml
takes 30), about 20 seconds on one CPU core; every accepted step stays within delta.
"""

import lightning as L

from grape_lightning.algorithms.trpo import TRPOModule
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models import ModelSpec
from grape_lightning.natural_gradient import TrustRegionConfig
from grape_lightning.rewards import NumericMatch
from grape_lightning.rollout import RolloutDataModule, SamplingParams


class TrustRegionLog(L.Callback):
    """The KL and acceptance logged by every update."""

    def __init__(self) -> None:
        self.kl: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.kl.append(float(trainer.callback_metrics["train/kl_after_step"]))


def test_trpo_raises_validation_accuracy(tmp_path):
    L.seed_everything(0)
    max_kl = 0.005
    module = TRPOModule(
        policy=ModelSpec(name_or_path="grape/tiny-addition-sft"),
        rewards=[NumericMatch()], accuracy="numeric_match",
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0),
        trust_region=TrustRegionConfig(max_kl=max_kl, damping=10.0, fisher_sample_size=32, cg_iterations=10),
    )
    datamodule = RolloutDataModule(
        task=ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200),
        group_size=8, batch_size=32, val_batch_size=200,
    )
    log = TrustRegionLog()
    trainer = L.Trainer(
        max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=1000,
        check_val_every_n_epoch=None, default_root_dir=tmp_path, callbacks=[log],
    )
    before = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    print(f"trpo: greedy val accuracy {before:.3f} -> {after:.3f}; accepted share {float(module.accepted_updates) / 20:.2f}")
    assert trainer.global_step == 20
    assert len(log.kl) == 20 and all(0 <= kl <= max_kl for kl in log.kl)
    assert int(module.accepted_updates) >= 15
    assert after >= before + 0.08
