"""Procedural tasks: prompts with a checkable reference answer, generated offline from a seed.

A task draws its examples from a seeded random stream, so the same ``(task, seed)`` always gives the
same data on every machine, and it knows how to score a response (``verify``) and how to produce a
plausible wrong answer (``wrong_answer``). That is all the built-in algorithms need: prompts for
rollouts, a verifier for rewards, prompt/completion rows for SFT and chosen/rejected rows for
preference training, without downloading anything.
"""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Literal

Split = Literal["train", "val"]
SPLITS: tuple[Split, ...] = ("train", "val")

# A draw that repeats a prompt already taken is rejected; after this many rejections in a row the
# prompt space is taken to be exhausted.
_MAX_CONSECUTIVE_REPEATS = 10_000


def stable_seed(key: str) -> int:
    """A 64-bit seed derived from ``key`` that is the same in every process.

    Python's ``hash()`` of a string is salted per process, so it cannot seed reproducible data.
    """
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


@dataclass(frozen=True)
class Example:
    """One task item: the prompt shown to the model and the reference answer.

    ``metadata`` holds at least ``task``, ``category``, ``answer`` and ``split``, so that reward
    functions and rubrics downstream can route and score without knowing the task object.
    """

    prompt: str
    answer: str
    metadata: dict


class Task(ABC):
    """A procedural task with a deterministic train split and a disjoint val split.

    Subclasses set ``name`` and ``category`` and implement ``_sample`` and ``wrong_answer``; they may
    override ``verify`` when exact matching of the first response line is not the right check.

    Args:
        seed: seed of the procedural examples (the same seed gives the same splits).
        num_train: training examples.
        num_val: validation examples (disjoint from the training ones).
    """

    name: ClassVar[str]
    category: ClassVar[str]

    def __init__(self, seed: int = 0, num_train: int = 2000, num_val: int = 200) -> None:
        for arg, value in (("num_train", num_train), ("num_val", num_val)):
            if value < 0:
                raise ValueError(f"{type(self).__name__}: {arg} must be >= 0, got {value}")
        self.seed = seed
        self.num_train = num_train
        self.num_val = num_val
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: Split) -> list[Example]:
        """The examples of ``split``; the same list on every call and in every process.

        Val is drawn first, and train rejects val's prompts, so no val prompt is ever trained on.
        Prompts are distinct within a split. Raises ``ValueError`` when the task cannot produce that
        many distinct prompts.
        """
        if split not in SPLITS:
            raise ValueError(f"{self.name}: unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._cache:
            if split == "val":
                self._cache["val"] = self._generate("val", self.num_val, exclude=set())
            else:
                val_prompts = {example.prompt for example in self.examples("val")}
                self._cache["train"] = self._generate("train", self.num_train, exclude=val_prompts)
        return list(self._cache[split])

    def _generate(self, split: Split, count: int, exclude: set[str]) -> list[Example]:
        rng = random.Random(stable_seed(f"{self.name}:{self.seed}:{split}"))
        seen: set[str] = set()
        examples: list[Example] = []
        repeats = 0
        while len(examples) < count:
            prompt, answer = self._sample(rng)
            if prompt in seen or prompt in exclude:
                repeats += 1
                if repeats >= _MAX_CONSECUTIVE_REPEATS:
                    excluding = " (val prompts excluded)" if exclude else ""
                    raise ValueError(
                        f"{self.name}: the space of distinct prompts is too small for {count} {split} "
                        f"examples{excluding}; only {len(examples)} were found. Lower num_train/num_val "
                        f"or widen the task."
                    )
                continue
            repeats = 0
            seen.add(prompt)
            metadata = {"task": self.name, "category": self.category, "answer": answer, "split": split}
            examples.append(Example(prompt=prompt, answer=answer, metadata=metadata))
        return examples

    @abstractmethod
    def _sample(self, rng: random.Random) -> tuple[str, str]:
        """Draw one ``(prompt, answer)`` pair using only ``rng`` for randomness."""

    def verify(self, response: str, answer: str) -> float:
        """Reward in [0, 1]: 1.0 when the response's first line, stripped, equals the answer.

        The response is stripped and cut at its first newline, so a model that answers and then keeps
        generating on new lines is judged on its answer alone.
        """
        return float(first_line(response) == answer.strip())

    @abstractmethod
    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """A plausible answer to ``example`` that ``verify`` scores 0; never equal to the answer."""

    def sft_rows(self, split: Split) -> list[dict]:
        """``{"prompt", "completion", "metadata"}`` rows whose completion is the reference answer."""
        return [
            {"prompt": ex.prompt, "completion": ex.answer, "metadata": dict(ex.metadata)}
            for ex in self.examples(split)
        ]

    def preference_rows(self, split: Split) -> list[dict]:
        """``{"prompt", "chosen", "rejected", "metadata"}`` rows: the answer against a wrong answer.

        Each rejected answer comes from its own generator seeded by task, seed, split and index, so a
        row does not change when rows before it do.
        """
        rows = []
        for index, ex in enumerate(self.examples(split)):
            rng = random.Random(stable_seed(f"{self.name}:{self.seed}:{split}:rejected:{index}"))
            rejected = self.wrong_answer(ex, rng)
            if rejected == ex.answer:
                raise ValueError(f"{self.name}: wrong_answer returned the reference answer for {ex.prompt!r}")
            rows.append(
                {
                    "prompt": ex.prompt,
                    "chosen": ex.answer,
                    "rejected": rejected,
                    "metadata": dict(ex.metadata),
                }
            )
        return rows


def first_line(response: str) -> str:
    """The first line of ``response`` after dropping surrounding whitespace, itself stripped."""
    return response.strip().split("\n", 1)[0].strip()


_INTEGER = re.compile(r"[+-]?[0-9]+")


def integer_matches(response: str, answer: str) -> float:
    """1.0 when the response's first line is a plain integer equal to ``answer``, else 0.0.

    Numeric comparison accepts ``"+22"`` or ``"022"`` for 22; anything that is not a plain
    integer (``"22.0"``, ``"22 apples"``) scores 0.
    """
    line = first_line(response)
    if not _INTEGER.fullmatch(line):
        return 0.0
    return float(int(line) == int(answer))
