"""Build the SFT-warmed tiny model that the RL configs and learning tests start from.

    python scripts/make_tiny_warm_model.py            # writes grape_lightning/assets/tiny-addition-sft

A Qwen2-shaped model (the same shape as configs/sft.yaml) trained briefly on two-digit addition,
so that it answers some prompts correctly and leaves room for reinforcement learning to improve.
Deterministic under the seed; prints the greedy validation accuracy it reached.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

from grape_lightning.algorithms import OptimizerConfig, SFTModule
from grape_lightning.data import SFTDataModule
from grape_lightning.data.tasks import ArithmeticTask
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
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "grape_lightning" / "assets" / "tiny-addition-sft"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(args.seed)
    task = ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200)
    module = SFTModule(
        ModelSpec(config=TINY_QWEN2, tokenizer="grape/char", init_seed=args.seed),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.01, warmup_steps=20),
    )
    trainer = L.Trainer(
        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        limit_val_batches=0, accelerator="cpu",
    )
    trainer.fit(module, SFTDataModule(task=task, max_length=32, batch_size=64, seed=args.seed))
    score = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=8)
    module.export_hf(args.output)
    print(f"wrote {args.output}: greedy val accuracy {score.accuracy:.3f} after {args.steps} SFT steps")


if __name__ == "__main__":
    main()
