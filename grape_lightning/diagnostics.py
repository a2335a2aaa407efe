"""End-of-run failure signatures of an on-policy run, read from its per-step metric history.

A history maps a logged metric name (``train/tied_groups``, ``train/reward``, ``train/entropy``,
``train/kl``, ``train/clip_fraction_low``/``_high``, ``train/update_steps``, ``train/response_length``)
to its ``(step, value)`` pairs. Each
signature is one function that returns a one-line flag (cause and the knob to turn) or ``None``;
a metric the run did not log never fires a flag.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import fmean
from typing import Callable

History = dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Thresholds:
    """Where each signature fires.

    Args:
        tied_share: mean ``train/tied_groups`` over the run's later half above which groups tie.
        entropy_fraction: final mean entropy (later quarter) below this fraction of the first
            step's entropy counts as collapsed.
        kl_max: mean ``train/kl`` over the later quarter above which KL ran away. Runs that
            learned 17 points on sorting reached 1.16 (a KL summed over 5 to 8 response tokens),
            so 1.0 flagged healthy runs.
        clip_min: mean clip fraction (low + high) over the run below which nothing clipped.
        reward_rise: a rise of mean reward (later half minus first half) below this is flat.
        length_factor: mean response length over the later quarter more than this many times the
            first tenth's, or less than its inverse, counts as drift.
    """

    tied_share: float = 0.8
    entropy_fraction: float = 0.1
    kl_max: float = 3.0
    clip_min: float = 1e-4
    reward_rise: float = 0.01
    length_factor: float = 2.0


def _values(history: History, name: str) -> list[float]:
    return [value for _, value in sorted(history.get(name, []))]


def _tail(values: list[float], fraction: float) -> list[float]:
    return values[len(values) - max(1, int(len(values) * fraction)):]


def _reward_flat(history: History, t: Thresholds) -> bool:
    rewards = _values(history, "train/reward")
    if len(rewards) < 2:
        return True
    half = len(rewards) // 2
    return fmean(rewards[half:]) - fmean(rewards[:half]) < t.reward_rise


def tied_groups(history: History, t: Thresholds = Thresholds()) -> str | None:
    values = _values(history, "train/tied_groups")
    if not values or fmean(_tail(values, 0.5)) <= t.tied_share:
        return None
    return ("most groups tied: no learning signal, the task is too hard/easy for the start model; "
            "raise group_size or temperature, use dynamic sampling, or warm the model with SFT")


def entropy_collapse(history: History, t: Thresholds = Thresholds()) -> str | None:
    values = _values(history, "train/entropy")
    if len(values) < 2 or values[0] <= 0 or fmean(_tail(values, 0.25)) >= t.entropy_fraction * values[0]:
        return None
    if not _reward_flat(history, t):
        return None
    return ("entropy collapsed with reward flat: the policy became deterministic before it learned; "
            "raise temperature, lower lr, or add an entropy bonus / KL penalty (beta)")


def kl_runaway(history: History, t: Thresholds = Thresholds()) -> str | None:
    values = _values(history, "train/kl")
    if not values or fmean(_tail(values, 0.25)) <= t.kl_max:
        return None
    return "KL to the reference ran away: the policy drifts too far per step; lower lr or raise beta"


def no_clipping(history: History, t: Thresholds = Thresholds()) -> str | None:
    low, high = _values(history, "train/clip_fraction_low"), _values(history, "train/clip_fraction_high")
    if not low and not high:
        return None
    updates = _values(history, "train/update_steps")
    if updates and fmean(updates) <= 1:  # one step per batch: the ratio is exactly 1, nothing can clip
        return None
    clipped = fmean(low) if low else 0.0
    clipped += fmean(high) if high else 0.0
    if clipped >= t.clip_min or not _reward_flat(history, t):
        return None
    return ("no clipping while reward is flat: the updates are too small to move the policy; "
            "raise lr or the number of update iterations")


def length_drift(history: History, t: Thresholds = Thresholds()) -> str | None:
    values = _values(history, "train/response_length")
    if len(values) < 4:
        return None
    first, last = fmean(values[: max(1, len(values) // 10)]), fmean(_tail(values, 0.25))
    if first <= 0 or 1 / t.length_factor <= last / first <= t.length_factor or not _reward_flat(history, t):
        return None
    direction = "grew" if last > first else "shrank"
    return (f"response length {direction} from {first:.1f} to {last:.1f} tokens with reward flat: the policy is "
            "changing its length, not its answers; check that max_new_tokens fits the answers, and add a length "
            "penalty (OverlongPunishment) or lower lr")


SIGNATURES: dict[str, Callable[[History, Thresholds], str | None]] = {
    "tied_groups": tied_groups,
    "entropy_collapse": entropy_collapse,
    "kl_runaway": kl_runaway,
    "no_clipping": no_clipping,
    "length_drift": length_drift,
}


def failure_flags(history: History, t: Thresholds = Thresholds()) -> dict[str, str | None]:
    """Every signature's flag (``None`` where it did not fire)."""
    return {name: signature(history, t) for name, signature in SIGNATURES.items()}
