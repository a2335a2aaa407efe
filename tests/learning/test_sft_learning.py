"""SFT measurably raises a tiny model's greedy accuracy on a built-in task."""

import lightning as L

from grape_lightning.algorithms import OptimizerConfig, SFTModule
from grape_lightning.data import SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.evaluation import greedy_task_score
from tests.conftest import tiny_spec


def test_sft_raises_greedy_accuracy(tmp_path):
    L.seed_everything(0)
    task = ArithmeticTask(digits=1, operators="+-*", num_train=240, num_val=60)
    module = SFTModule(
        tiny_spec(config={**tiny_spec().config, "hidden_size": 64, "intermediate_size": 256}),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=20, weight_decay=0.01),
    )
    before = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=6)
    trainer = L.Trainer(
        max_steps=400, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0,
    )
    trainer.fit(module, SFTDataModule(task=task, max_length=16, batch_size=64))
    after = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=6)
    print(f"greedy val accuracy before {before.accuracy:.3f} after {after.accuracy:.3f}")
    assert before.accuracy < 0.1
    assert after.accuracy >= before.accuracy + 0.25
