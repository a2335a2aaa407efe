"""Two-step word problems: ``"Tom has 7 pens, buys 5, gives 3. How many?"`` -> ``"9"``, scored as an integer."""

from __future__ import annotations

import random
import re

from grape_lightning.data.tasks.base import Example, Task, integer_matches

NAMES = ("Tom", "Ann", "Bob", "Eve", "Sam", "Mia")
ITEMS = ("apples", "pens", "cards", "eggs")
GAINS = ("buys", "finds", "gets")  # verbs that add to the count
LOSSES = ("gives", "loses", "sells")  # verbs that take from it
_PROMPT = re.compile(r"(\w+) has (\d+) (\w+), (\w+) (\d+), (\w+) (\d+)\. How many\?")


def _signed(verb: str, amount: int) -> int:
    return amount if verb in GAINS else -amount


class WordProblemTask(Task):
    """A count changed twice in words: the answer is s + d_1 + d_2, two steps of arithmetic.

    A person holds s items (s uniform in 1..max_value), then two changes follow, each a gain or a
    loss with equal chance and its amount uniform in 1..max_value; a loss never takes more than is
    held at that point (its amount is drawn from 1..held), so the count stays non-negative and the
    answer is in 0..3*max_value. Names, items and verbs are drawn uniformly and carry no
    information beyond the verb's sign: the model has to read the verbs and add the signed amounts.

    The answer is an integer scored as the arithmetic task scores it (the first response line a
    plain integer equal to the answer; ``"09"`` counts, ``"9 pens"`` does not).

    Args:
        max_value: largest starting count and largest amount of one change.
    """

    name = "word_problem"
    category = "math"

    def __init__(self, seed: int = 0, num_train: int = 2000, num_val: int = 200, max_value: int = 10) -> None:
        if max_value < 1:
            raise ValueError(f"WordProblemTask: max_value must be >= 1, got {max_value}")
        super().__init__(seed=seed, num_train=num_train, num_val=num_val)
        self.max_value = max_value

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        held = start = rng.randint(1, self.max_value)
        steps = []
        for _ in range(2):
            if held > 0 and rng.random() < 0.5:
                verb, amount = rng.choice(LOSSES), rng.randint(1, min(held, self.max_value))
            else:
                verb, amount = rng.choice(GAINS), rng.randint(1, self.max_value)
            held += _signed(verb, amount)
            steps.append(f"{verb} {amount}")
        return f"{name} has {start} {item}, {steps[0]}, {steps[1]}. How many?", str(held)

    def verify(self, response: str, answer: str) -> float:
        """1.0 when the response's first line is a plain integer equal to the answer, else 0.0."""
        return integer_matches(response, answer)

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """A one-slip answer: the count after the first change only, or one change read with the
        wrong sign; drawn among those that differ from the answer and are non-negative, else the
        answer plus one."""
        match = _PROMPT.fullmatch(example.prompt)
        if match is None:
            raise ValueError(f"{self.name}: not a word-problem prompt: {example.prompt!r}")
        start, first, second = int(match[2]), _signed(match[4], int(match[5])), _signed(match[6], int(match[7]))
        slips = {start + first, start - first + second, start + first - second}
        candidates = sorted(value for value in slips if value >= 0 and str(value) != example.answer)
        return str(rng.choice(candidates)) if candidates else str(int(example.answer) + 1)
