"""Build the tiny Bradley-Terry reward model that configs/ppo_reward_model.yaml scores with.

    python scripts/make_tiny_reward_model.py          # writes grape_lightning/assets/tiny-addition-rm

Two-digit addition. ``--trunk-steps 0 --negatives task`` is exactly configs/reward_model.yaml:
the trunk of grape/tiny-addition-sft with a fresh scalar head, trained on the task's pairs, whose
rejected answer is the sum moved by 1..10. Those pairs nearly always differ in the units digit,
and the model learns to check that digit alone: its favourite among all sums 0..198 is the right
one on about 1% of the prompts, and PPO (or GRPO) against it lowers the policy's accuracy.

The default builds the reward model as RLHF does, from a stronger model and the policy's own
mistakes:

1. the trunk: grape/tiny-addition-sft fine-tuned ``--trunk-steps`` more SFT steps with the
   optimizer of configs/sft.yaml (greedy accuracy about 0.99);
2. the pairs: for each prompt, the right sum against each distinct wrong answer among ``--samples``
   answers that grape/tiny-addition-sft (the policy PPO starts from) samples at temperature 1,
   plus one answer moved by 1..9 in the units or 10..90 in the tens digit;
3. the training of configs/reward_model.yaml (optimizer, schedule, clipping, steps).

Deterministic under the seed; prints the held-out pair accuracy and how often the model's
favourite among all sums 0..198 is the right one.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import lightning as L

from grape_lightning.algorithms import OptimizerConfig, RewardModelModule, SFTModule
from grape_lightning.data import PreferenceDataModule, SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.data.tasks.base import Example
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import RewardModelScore
from policy_samples import POLICY, sample_policy_answers

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "grape_lightning" / "assets" / "tiny-addition-rm"
ADDITION = dict(digits=2, operators="+", num_train=3000, num_val=200)


class PolicyNegatives(ArithmeticTask):
    """Two-digit addition whose preference rows pair the right sum with one answer wrong in a
    random digit and with each wrong answer in ``sampled[prompt]``."""

    def __init__(self, sampled: dict[str, list[str]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.sampled = sampled

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        value = int(example.answer)
        step = rng.choice([1, 10])
        return str(value + rng.choice([k * step for k in range(-9, 10) if k != 0 and value + k * step >= 0]))

    def preference_rows(self, split: str) -> list[dict]:
        rows = super().preference_rows(split)
        for example in self.examples(split):
            rows += [
                {"prompt": example.prompt, "chosen": example.answer, "rejected": rejected, "metadata": dict(example.metadata)}
                for rejected in self.sampled[example.prompt]
            ]
        return rows


def fine_tune_trunk(task: ArithmeticTask, steps: int, seed: int, directory: Path) -> ModelSpec:
    """grape/tiny-addition-sft after ``steps`` more SFT steps (configs/sft.yaml's optimizer)."""
    L.seed_everything(seed)
    module = SFTModule(
        POLICY, optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=20, schedule="cosine", min_lr_ratio=0.1)
    )
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, SFTDataModule(task=task, max_length=32, batch_size=64, seed=seed))
    score = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=8)
    print(f"trunk: greedy val accuracy {score.accuracy:.3f} after {steps} more SFT steps")
    module.export_hf(directory)
    return ModelSpec(name_or_path=str(directory))


def sample_wrong_answers(task: ArithmeticTask, samples: int, seed: int) -> dict[str, list[str]]:
    """The distinct wrong answers among ``samples`` answers of the policy to every prompt."""
    examples = task.examples("train") + task.examples("val")
    references = {example.prompt: example.answer for example in examples}
    return {
        prompt: list(dict.fromkeys(a for a in answers if a.strip() and task.verify(a, references[prompt]) == 0.0))
        for prompt, answers in sample_policy_answers(examples, samples, seed).items()
    }


def favourite_is_right(reward: RewardModelScore, task: ArithmeticTask) -> float:
    """Share of validation prompts whose highest-scored sum among 0..198 is the right one."""
    candidates = [str(v) for v in range(199)]
    right = 0
    for example in task.examples("val"):
        scores = reward([example.prompt] * len(candidates), candidates, [{}] * len(candidates))
        right += candidates[max(range(len(candidates)), key=scores.__getitem__)] == example.answer
    return right / len(task.examples("val"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--trunk-steps", type=int, default=1500, help="more SFT steps for the trunk (0: none)")
    parser.add_argument("--negatives", choices=["policy", "task"], default="policy")
    parser.add_argument("--samples", type=int, default=4, help="policy answers sampled per prompt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    task = ArithmeticTask(**ADDITION)
    with tempfile.TemporaryDirectory() as scratch:
        trunk = fine_tune_trunk(task, args.trunk_steps, args.seed, Path(scratch)) if args.trunk_steps else POLICY
        L.seed_everything(args.seed)
        if args.negatives == "policy":
            task = PolicyNegatives(sample_wrong_answers(task, args.samples, args.seed), **ADDITION)
        module = RewardModelModule(trunk, optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=50, schedule="cosine"))
        datamodule = PreferenceDataModule(task=task, max_length=32, batch_size=32, val_batch_size=200, seed=args.seed)
        trainer = L.Trainer(
            max_steps=args.steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
            val_check_interval=args.steps, check_val_every_n_epoch=None, accelerator="cpu",
        )
        trainer.fit(module, datamodule)
        accuracy = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
        module.export_hf(args.output)
    favourite = favourite_is_right(RewardModelScore(str(args.output), device="cpu", batch_size=256), task)
    print(f"wrote {args.output}: held-out pair accuracy {accuracy:.3f} after {args.steps} steps; "
          f"the favourite sum is right on {favourite:.3f} of the validation prompts")


if __name__ == "__main__":
    main()
