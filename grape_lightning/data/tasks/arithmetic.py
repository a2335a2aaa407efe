"""Integer arithmetic: ``"17+5="`` -> ``"22"``, scored by numeric match."""

from __future__ import annotations

import random

from grape_lightning.data.tasks.base import Example, Task, integer_matches

OPERATORS = "+-*"


class ArithmeticTask(Task):
    """Binary integer arithmetic over non-negative operands of 1 to ``digits`` digits.

    An operand's digit count is drawn uniformly from 1..digits, then its value uniformly among the
    numbers of that many digits (0-9 for one digit), so short operands are as common as long ones
    instead of being swamped by the many long numbers. The operator is drawn uniformly from
    ``operators``. With ``allow_negative=False`` the operands of a subtraction are ordered so the
    result is never negative.

    Args:
        digits: most digits of an operand.
        operators: operators drawn from, a string of ``+``, ``-`` and ``*``.
        allow_negative: allow negative results of subtraction.
    """

    name = "arithmetic"
    category = "math"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 2000,
        num_val: int = 200,
        digits: int = 2,
        operators: str = OPERATORS,
        allow_negative: bool = True,
    ) -> None:
        if digits < 1:
            raise ValueError(f"ArithmeticTask: digits must be >= 1, got {digits}")
        if not operators or any(op not in OPERATORS for op in operators):
            raise ValueError(
                f"ArithmeticTask: operators must be a non-empty string of {OPERATORS!r}, got {operators!r}"
            )
        super().__init__(seed=seed, num_train=num_train, num_val=num_val)
        self.digits = digits
        self.operators = operators
        self.allow_negative = allow_negative

    def _operand(self, rng: random.Random) -> int:
        num_digits = rng.randint(1, self.digits)
        low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
        return rng.randint(low, 10**num_digits - 1)

    def _sample(self, rng: random.Random) -> tuple[str, str]:
        a, b = self._operand(rng), self._operand(rng)
        op = rng.choice(self.operators)
        if op == "-" and not self.allow_negative and a < b:
            a, b = b, a
        result = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a}{op}{b}=", str(result)

    def verify(self, response: str, answer: str) -> float:
        """1.0 when the response's first line is an integer equal to the answer, else 0.0.

        Numeric comparison accepts ``"+22"`` or ``"022"`` for 22; anything that is not a plain
        integer (``"22.0"``, ``"22 apples"``) scores 0.
        """
        return integer_matches(response, answer)

    def wrong_answer(self, example: Example, rng: random.Random) -> str:
        """The answer moved by a nonzero offset in [-10, 10], negative only if the task can be."""
        value = int(example.answer)
        negatives_possible = self.allow_negative and "-" in self.operators
        offsets = [o for o in range(-10, 11) if o != 0 and (negatives_possible or value + o >= 0)]
        return str(value + rng.choice(offsets))
