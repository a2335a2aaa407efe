"""Models shipped with the package, addressed as ``grape/<name>`` wherever a hub id is accepted.

- ``grape/tiny-addition-sft``: a tiny Qwen2-shaped model with the character tokenizer, briefly
  fine-tuned on two-digit addition (about half of the validation prompts right under greedy
  decoding); the starting point of the RL configs and learning tests. Rebuilt by
  ``scripts/make_tiny_warm_model.py``.
- ``grape/tiny-addition-rm``: a Bradley-Terry reward model (sequence classification, one label)
  for the same task and tokenizer, trained on the right sum against the warm model's own wrong
  answers; the reward of ``configs/ppo_reward_model.yaml``. Rebuilt by
  ``scripts/make_tiny_reward_model.py``.
- ``grape/tiny-addition-student``: ``grape/tiny-addition-sft`` with seeded noise on its weights
  (about a sixth of the validation prompts right): the student of ``configs/distill.yaml`` and of
  the distillation learning test, with ``grape/tiny-addition-sft`` as its teacher. Rebuilt by
  ``scripts/make_tiny_student_model.py``.
- ``grape/tiny-addition-critic``: a yes/no critic (causal LM, the same character tokenizer) for
  :class:`~grape_lightning.rewards.critics.LocalLMCritic`, trained on the exact judging text it
  sees at run time to answer questions about a two-digit addition, its reference answer and a
  response: sure and right on "is the response a plain number", 50/50 on "is it pleasing to
  read" (conflicting training labels), not reliable on correctness; the critic of
  ``configs/grape.yaml``. Rebuilt by ``scripts/make_tiny_critic_model.py``; its held-out report
  is ``docs/critic.md``.
- ``grape/tiny-word_problem-sft`` and ``grape/tiny-sort-sft``: the same tiny shape and tokenizer,
  briefly fine-tuned on :class:`~grape_lightning.data.tasks.WordProblemTask` and
  :class:`~grape_lightning.data.tasks.SortTask` (some of the validation prompts right under greedy
  decoding; the numbers are in the script); the starting points of
  ``configs/tasks/word_problem_grpo.yaml`` and ``configs/tasks/sort_grpo.yaml``. Rebuilt by
  ``scripts/make_tiny_warm_model.py --task word_problem`` and ``--task sort``.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
PREFIX = "grape/"


def builtin_model_path(name: str) -> Path | None:
    """The directory of a shipped model named ``grape/<name>``, or None for any other name."""
    if not name.startswith(PREFIX):
        return None
    path = ASSETS_DIR / name[len(PREFIX) :]
    return path if (path / "config.json").is_file() else None
