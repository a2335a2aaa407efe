"""Greedy accuracy on the user's own rows: the reference comes from the row (its ``answer``, else
its completion or chosen reply), a reward function scores, and the initial policy's score is kept
for the run summary; a built-in task is used only when it supplies the validation data."""

from __future__ import annotations

import json

import lightning as L
import pytest

from grape_lightning.algorithms import DPOModule, OptimizerConfig, SFTModule
from grape_lightning.callbacks import GreedyTaskAccuracy
from grape_lightning.data import PreferenceDataModule, SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import ExactMatch, NumericMatch
from tests.conftest import tiny_spec

ADDITION = dict(digits=2, operators="+", num_train=3000, num_val=200)


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _trainer(tmp_path, callbacks, max_steps=1):
    return L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        val_check_interval=max_steps, check_val_every_n_epoch=None, callbacks=callbacks, accelerator="cpu",
    )


def test_reference_rows_take_the_answer_field_else_the_reply(tmp_path):
    rows = [{"prompt": "max 3 9 =", "completion": " 9"}, {"prompt": "min 3 9 =", "completion": " 3 is the least", "answer": "3"}]
    datamodule = SFTDataModule(train_file=_write(tmp_path / "t.jsonl", rows), val_file=_write(tmp_path / "v.jsonl", rows))
    references = datamodule.reference_rows("val")
    assert [(r["prompt"], r["metadata"]["answer"]) for r in references] == [("max 3 9 =", " 9"), ("min 3 9 =", "3")]
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    preference = PreferenceDataModule(train_file=_write(tmp_path / "p.jsonl", pairs), val_file=_write(tmp_path / "p.jsonl", pairs))
    assert preference.reference_rows("val")[0]["metadata"]["answer"] == "2"


def test_dpo_on_a_preference_file_reports_greedy_accuracy_before_and_after(tmp_path):
    """The shipped warm model on the arithmetic validation prompts, as a user's JSONL pairs: the
    initial score equals the built-in task's greedy accuracy on the same prompts (0.48)."""
    task = ArithmeticTask(**ADDITION)
    pairs = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in task.preference_rows("val")]
    train = [{"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]} for row in task.preference_rows("train")[:64]]
    datamodule = PreferenceDataModule(
        task=task, train_file=_write(tmp_path / "train.jsonl", train), val_file=_write(tmp_path / "val.jsonl", pairs),
        max_length=32, batch_size=16, val_batch_size=200,
    )
    module = DPOModule(ModelSpec(name_or_path="grape/tiny-addition-sft"), optimizer=OptimizerConfig(lr=1e-6))
    expected = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=6)
    callback = GreedyTaskAccuracy(num_examples=200, max_new_tokens=6, reward=NumericMatch())
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(module, datamodule)
    assert expected.accuracy == pytest.approx(0.48)
    assert module.initial_metrics["val/accuracy"] == pytest.approx(expected.accuracy)
    assert float(trainer.callback_metrics["val/accuracy"]) == pytest.approx(expected.accuracy, abs=0.02)  # lr 1e-6, one step


def test_without_a_reward_user_rows_log_nothing_and_warn(tmp_path):
    rows = [{"prompt": "max 3 9 =", "completion": " 9"}] * 4
    datamodule = SFTDataModule(
        task=ArithmeticTask(num_train=8, num_val=4), train_file=_write(tmp_path / "t.jsonl", rows),
        val_file=_write(tmp_path / "v.jsonl", rows), max_length=32, batch_size=4,
    )
    module = SFTModule(tiny_spec())
    trainer = _trainer(tmp_path, [GreedyTaskAccuracy(num_examples=4, max_new_tokens=2)])
    with pytest.warns(UserWarning, match="no 'reward' to score them"):
        trainer.fit(module, datamodule)
    assert "val/accuracy" not in trainer.callback_metrics  # the task's prompts are not the data's
    trainer = _trainer(tmp_path, [GreedyTaskAccuracy(num_examples=4, max_new_tokens=2, reward=ExactMatch())])
    trainer.fit(SFTModule(tiny_spec()), datamodule)
    assert "val/accuracy" in trainer.callback_metrics
