"""Tasks on a random word: the word's drawing and the near-miss answers they share."""

from __future__ import annotations

import random
import string

from grape_lightning.data.tasks.base import Task


class WordTask(Task):
    """A task whose prompt holds a random word of ``min_length`` to ``max_length`` letters: the
    length uniform over the range, each letter uniform over ``alphabet`` (repeats allowed).

    The alphabet may not contain whitespace: ``verify`` compares the stripped first line of the
    response with the answer exactly, and could not tell such words apart.

    Args:
        seed: of the train and val splits.
        num_train: training examples.
        num_val: validation examples.
        min_length: fewest letters of a word.
        max_length: most letters of a word.
        alphabet: letters the words are drawn from (no whitespace).
    """

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 200,
        min_length: int = 3,
        max_length: int = 6,
        alphabet: str = string.ascii_lowercase,
    ) -> None:
        name = type(self).__name__
        if not 1 <= min_length <= max_length:
            raise ValueError(f"{name}: need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}")
        if not alphabet or any(ch.isspace() for ch in alphabet):
            raise ValueError(f"{name}: alphabet must be non-empty and without whitespace, got {alphabet!r}")
        super().__init__(seed=seed, num_train=num_train, num_val=num_val)
        self.min_length = min_length
        self.max_length = max_length
        self.alphabet = alphabet

    def random_word(self, rng: random.Random) -> str:
        length = rng.randint(self.min_length, self.max_length)
        return "".join(rng.choice(self.alphabet) for _ in range(length))

    def changed_letter(self, answer: str, rng: random.Random) -> str:
        """``answer`` with one letter replaced by another of the alphabet; with a one-letter
        alphabet no letter can change, so one more letter is appended."""
        position = rng.randrange(len(answer))
        replacements = [ch for ch in dict.fromkeys(self.alphabet) if ch != answer[position]]
        if not replacements:
            return answer + answer[0]
        return answer[:position] + rng.choice(replacements) + answer[position + 1 :]
