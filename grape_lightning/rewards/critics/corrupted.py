"""A critic made worse on purpose: what does a run do when its judge is noisy, or sure and wrong?"""

from __future__ import annotations

import hashlib
from typing import Literal

from grape_lightning.rewards.critics.base import Critic, Judgement, JudgeRequest

CorruptionMode = Literal["noise", "invert"]


class CorruptedCritic(Critic):
    """Wraps ``critic`` and corrupts its judgements of the rubric ``items`` named (every item
    when None). Each corrupted (response, item) is drawn independently with probability ``rate``,
    by a hash of (``seed``, item, prompt, response), so the same request is corrupted the same way
    in every process, batch order and resumed run. With (s, c) the wrapped critic's judgement:

    - ``noise``: a judge that is often guessing and says so. A drawn request gets a fair coin's
      answer s' in {0, 1}; every judgement of the item reports c' = (1 - rate) c, the confidence
      a calibrated judge would state when it answers at random ``rate`` of the time.
    - ``invert``: a judge that is sure and wrong. A drawn request gets s' = 1 - s with the
      same confidence c: nothing in its judgement says it is wrong.

    Args:
        critic: the critic whose judgements are corrupted.
        mode: ``noise`` or ``invert``.
        rate: probability that a request is corrupted, in [0, 1].
        items: rubric item names to corrupt (None: all).
        seed: of the draws.
    """

    def __init__(self, critic: Critic, mode: CorruptionMode, rate: float = 1.0, items: list[str] | None = None, seed: int = 0) -> None:
        if mode not in ("noise", "invert"):
            raise ValueError(f"mode: expected 'noise' or 'invert', got {mode!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate: expected a probability in [0, 1], got {rate!r}")
        self.critic, self.mode, self.rate, self.seed = critic, mode, rate, seed
        self.items = None if items is None else frozenset(items)

    def uniform(self, request: JudgeRequest, stream: str) -> float:
        """A draw in [0, 1) fixed by (seed, stream, item, prompt, response)."""
        key = "\x1f".join((str(self.seed), stream, request.item, request.prompt, request.response))
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64

    def corrupt(self, request: JudgeRequest, judgement: Judgement) -> Judgement:
        if self.items is not None and request.item not in self.items:
            return judgement
        drawn = self.uniform(request, "corrupt") < self.rate
        if self.mode == "invert":
            return Judgement(1.0 - judgement.score, judgement.confidence, "inverted: " + judgement.critique) if drawn else judgement
        confidence = (1.0 - self.rate) * judgement.confidence
        if not drawn:
            return Judgement(judgement.score, confidence, judgement.critique)
        coin = float(self.uniform(request, "coin") < 0.5)
        return Judgement(coin, confidence, "a guess: " + judgement.critique)

    def judge(self, requests: list[JudgeRequest]) -> list[Judgement | None]:
        judged = self.critic.judge(requests)
        return [None if judgement is None else self.corrupt(request, judgement) for request, judgement in zip(requests, judged)]
