"""String reversal: ``"reverse abc:"`` -> ``"cba"``, scored by exact match."""

from __future__ import annotations

import random

from grape_lightning.data.tasks.base import Example
from grape_lightning.data.tasks.words import WordTask


class ReverseTask(WordTask):
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

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        word = self.random_word(rng)
        return f"reverse {word}:", word[::-1]

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """The word left unreversed; for a palindrome, the answer with one letter changed.

        When the alphabet has a single letter no letter can change, so one more letter is appended.
        """
        answer = example.answer
        word = answer[::-1]
        if word != answer:
            return word
        return self.changed_letter(answer, rng)
