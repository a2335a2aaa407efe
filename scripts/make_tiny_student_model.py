"""Build the weak student that configs/distill.yaml and the distillation learning test start from.

    python scripts/make_tiny_student_model.py         # writes grape_lightning/assets/tiny-addition-student

grape/tiny-addition-sft (the teacher) with seeded Gaussian noise added to every weight tensor,
of standard deviation ``--noise`` times that tensor's own: the same architecture and tokenizer,
most of its skill lost (about a sixth of the validation prompts right instead of about half), so
that distillation from the teacher has a gap to close in a few dozen CPU steps. Deterministic
under the seed; prints both greedy validation accuracies.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.tokenizer_check import save_tokenizer

TEACHER = "grape/tiny-addition-sft"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "grape_lightning" / "assets" / "tiny-addition-student"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = ModelSpec(name_or_path=TEACHER)
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer)
    task = ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200)
    teacher_accuracy = greedy_task_score(model, tokenizer, task, max_new_tokens=8).accuracy
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for _, weight in sorted(model.named_parameters()):
            weight.add_(torch.randn(weight.shape, generator=generator, dtype=weight.dtype) * weight.std() * args.noise)
    accuracy = greedy_task_score(model, tokenizer, task, max_new_tokens=8).accuracy
    model.save_pretrained(args.output, safe_serialization=True)
    save_tokenizer(tokenizer, args.output)
    print(f"wrote {args.output}: greedy val accuracy {accuracy:.3f} (teacher {TEACHER}: {teacher_accuracy:.3f})")


if __name__ == "__main__":
    main()
