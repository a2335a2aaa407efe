"""Letter sorting: ``"sort dbca:"`` -> ``"abcd"``, scored by exact match."""

from __future__ import annotations

import random
import string

from grape_lightning.data.tasks.base import Example, Task


class SortTask(Task):
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
                f"SortTask: need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}"
            )
        if not alphabet or any(ch.isspace() for ch in alphabet):
            raise ValueError(f"SortTask: alphabet must be non-empty and without whitespace, got {alphabet!r}")
        super().__init__(seed=seed, num_train=num_train, num_val=num_val)
        self.min_length = min_length
        self.max_length = max_length
        self.alphabet = alphabet

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        length = rng.randint(self.min_length, self.max_length)
        word = "".join(rng.choice(self.alphabet) for _ in range(length))
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
        position = rng.randrange(len(answer))
        replacements = [ch for ch in dict.fromkeys(self.alphabet) if ch != answer[position]]
        if not replacements:
            return answer + answer[0]
        return answer[:position] + rng.choice(replacements) + answer[position + 1 :]
