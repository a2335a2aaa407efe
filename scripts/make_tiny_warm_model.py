"""Build the SFT-warmed tiny models that the RL configs and learning tests start from.

    python scripts/make_tiny_warm_model.py                       # grape_lightning/assets/tiny-addition-sft
    python scripts/make_tiny_warm_model.py --task word_problem   # grape_lightning/assets/tiny-word_problem-sft
    python scripts/make_tiny_warm_model.py --task sort           # grape_lightning/assets/tiny-sort-sft

A Qwen2-shaped model (the same shape as configs/sft.yaml) trained briefly on one built-in task, so
that it answers some validation prompts correctly and leaves room for reinforcement learning to
improve. Deterministic under the seed; prints the greedy validation accuracy it reached.

Shipped builds (greedy accuracy on the task's 200 validation prompts; CPU, OMP_NUM_THREADS=1):

- addition: two-digit addition, 400 steps: 0.48 as shipped. Rebuilt today (one thread) the same
  command writes a different model, at 0.120 in 22 s (the shipped file was built by an earlier
  state of the code, or on other hardware); the shipped file stays, as the learning tests and
  README numbers are measured from it.
- word_problem: WordProblemTask(max_value=10), 800 steps: 0.520 in 167 s on a busy machine (600
  steps give 0.425, 1000 give 0.620). 600 steps leave a model still learning the two-step sum, and
  reinforcement learning cannot teach a sum the model cannot yet do: from it GRPO gained 4 to 8.5
  points in 150 steps over every learning rate, group size and temperature tried; from the
  800-step model it gains 14 (scripts/learning_table.py; docs/learning_table.md).
- sort: SortTask(3 to 6 letters), 75 steps: 0.425 in 7 s (0.19, 0.425, 0.57, 0.635, 0.67 after 50,
  75, 100, 125, 200 steps; 0.78 after 600). Sorting is learned fast up to about two thirds right,
  so its warm model stops early.

The accuracy is read on the same split the GRPO configs validate on, so it is their step-0 value.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from grape_lightning.algorithms import OptimizerConfig, SFTModule
from grape_lightning.data import SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask, SortTask, Task, WordProblemTask
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.models import ModelSpec

TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 96,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
ASSETS = Path(__file__).resolve().parents[1] / "grape_lightning" / "assets"


@dataclass(frozen=True)
class WarmBuild:
    """What one warm model is trained on, for how long, and how its accuracy is read."""

    task: Callable[[], Task]
    steps: int  # SFT steps: chosen so that greedy val accuracy lands in about 0.3-0.6
    max_length: int  # tokens of the longest prompt + answer + </s>
    max_new_tokens: int  # greedy tokens decoded to score a validation answer


BUILDS = {
    "addition": WarmBuild(lambda: ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200), 400, 32, 8),
    "word_problem": WarmBuild(lambda: WordProblemTask(max_value=10, num_train=3000, num_val=200), 800, 56, 6),
    "sort": WarmBuild(lambda: SortTask(min_length=3, max_length=6, num_train=3000, num_val=200), 75, 24, 10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(BUILDS), default="addition")
    parser.add_argument("--output", type=Path, default=None, help="default: grape_lightning/assets/tiny-<task>-sft")
    parser.add_argument("--steps", type=int, default=None, help="default: the task's shipped number of steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build = BUILDS[args.task]
    output = args.output or ASSETS / f"tiny-{args.task}-sft"
    steps = build.steps if args.steps is None else args.steps
    started = time.perf_counter()

    L.seed_everything(args.seed)
    task = build.task()
    module = SFTModule(
        ModelSpec(config=TINY_QWEN2, tokenizer="grape/char", init_seed=args.seed),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=20),
    )
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, SFTDataModule(task=task, max_length=build.max_length, batch_size=64, seed=args.seed))
    score = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=build.max_new_tokens)
    module.export_hf(output)
    print(
        f"wrote {output}: greedy val accuracy {score.accuracy:.3f} after {steps} SFT steps "
        f"({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
