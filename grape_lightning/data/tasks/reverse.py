"""String reversal: ``"reverse abc:"`` -> ``"cba"``, scored by exact match."""

from __future__ import annotations

import random
import string

from grape_lightning.data.tasks.base import Example, Task


class ReverseTask(Task):
    """Reverse a random word of ``min_length`` to ``max_length`` letters drawn from ``alphabet``.

    The length is uniform over the range and each letter uniform over the alphabet. The alphabet may
    not contain whitespace, since ``verify`` strips the response and could not tell such words apart.

    Args:
        min_length: fewest letters of a word.
        max_length: most letters of a word.
        alphabet: letters the words are drawn from (no whitespace).
    """

    name = "reverse"
    category = "string"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 200,
        min_length: int = 3,
        max_length: int = 6,
        alphabet: str = string.ascii_lowercase,
    ) -> None:
        if not 1 <= min_length <= max_length:
            raise ValueError(
                f"ReverseTask: need 1 <= min_length <= max_length, got min_length={min_length}, "
                f"max_length={max_length}"
            )
        if not alphabet or any(ch.isspace() for ch in alphabet):
            raise ValueError(
                f"ReverseTask: alphabet must be non-empty and without whitespace, got {alphabet!r}"
            )
        super().__init__(seed=seed, num_train=num_train, num_val=num_val)
        self.min_length = min_length
        self.max_length = max_length
        self.alphabet = alphabet

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        length = rng.randint(self.min_length, self.max_length)
        word = "".join(rng.choice(self.alphabet) for _ in range(length))
        return f"reverse {word}:", word[::-1]

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """The word left unreversed; for a palindrome, the answer with one letter changed.

        When the alphabet has a single letter no letter can change, so one more letter is appended.
        """
        answer = example.answer
        word = answer[::-1]
        if word != answer:
            return word
        position = rng.randrange(len(answer))
        replacements = [ch for ch in dict.fromkeys(self.alphabet) if ch != answer[position]]
        if not replacements:
            return answer + answer[0]
        return answer[:position] + rng.choice(replacements) + answer[position + 1 :]
