"""On-policy distillation closes most of a student's gap to its teacher, with no task reward in the loss.

Teacher: grape/tiny-addition-sft (48% of the 200 held-out two-digit additions right, greedy).
Student: grape/tiny-addition-student, the teacher's weights with seeded noise (17.5% right). The
student samples 16 prompts x 8 responses per step and follows the per-token reverse KL to the
teacher on them; NumericMatch only measures. STEPS optimizer steps on two CPU cores.
"""

import lightning as L

from grape_lightning.algorithms import OnPolicyDistillationModule, OptimizerConfig
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import NumericMatch
from grape_lightning.rollout import RolloutDataModule, SamplingParams

STEPS = 50
TEACHER_ACCURACY = 0.48  # grape/tiny-addition-sft, as tests/learning/test_rl_learning.py measures it


def _val_accuracy(trainer, module, datamodule) -> float:
    return trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]


def test_the_student_approaches_the_teacher(tmp_path):
    L.seed_everything(0)
    module = OnPolicyDistillationModule(
        policy=ModelSpec(name_or_path="grape/tiny-addition-student"),
        teacher=ModelSpec(name_or_path="grape/tiny-addition-sft"),
        rewards=[NumericMatch()], accuracy="numeric_match",
        sampling=SamplingParams(max_new_tokens=6, temperature=1.0), optimizer=OptimizerConfig(lr=1e-3),
    )
    datamodule = RolloutDataModule(
        task=ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200), group_size=8, batch_size=16, val_batch_size=200,
    )
    trainer = L.Trainer(
        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, val_check_interval=1000, check_val_every_n_epoch=None, default_root_dir=tmp_path,
    )
    before = _val_accuracy(trainer, module, datamodule)
    trainer.fit(module, datamodule)
    after = _val_accuracy(trainer, module, datamodule)
    print(f"distill: student greedy val accuracy {before:.3f} -> {after:.3f} (teacher {TEACHER_ACCURACY:.3f})")
    assert trainer.global_step == STEPS
    assert before <= TEACHER_ACCURACY - 0.25
    assert after >= before + 0.5 * (TEACHER_ACCURACY - before)  # at least half the gap closed
