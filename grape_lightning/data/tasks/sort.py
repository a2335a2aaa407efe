"""Letter sorting: ``"sort dbca:"`` -> ``"abcd"``, scored by exact match."""

from __future__ import annotations

import random

from grape_lightning.data.tasks.base import Example
from grape_lightning.data.tasks.words import WordTask


class SortTask(WordTask):
    """Sort the letters of a random word of ``min_length`` to ``max_length`` letters.

    The length is uniform over the range and each letter uniform over the alphabet (repeats
    allowed); the answer is the word's letters in ascending character order (``sorted``), e.g.
    ``"sort dbca:"`` -> ``"abcd"``. Unlike reversal, where each output position copies a fixed
    input position, the letter at an output position depends on every letter of the word.

    The alphabet may not contain whitespace: ``verify`` compares the stripped first line of the
    response with the answer exactly, so ``" abcd "`` counts and ``"a b c d"`` does not.

    Args:
        min_length: fewest letters of a word.
        max_length: most letters of a word.
        alphabet: letters the words are drawn from (no whitespace).
    """

    name = "sort"
    category = "string"

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        word = self.random_word(rng)
        return f"sort {word}:", "".join(sorted(word))

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """A near miss: the answer with two neighbouring different letters swapped (out of order).

        When all letters are the same no swap changes it: one letter is replaced by another of the
        alphabet, or, with a one-letter alphabet, one more letter is appended.
        """
        answer = example.answer
        swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        return self.changed_letter(answer, rng)
