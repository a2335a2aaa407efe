"""One table of a run's rubric items, printed at the end of a GRAPE ``fit`` and by ``grape
rubric-report``: per item the means over steps of the statistics a run logs
(:mod:`~grape_lightning.rewards.rubric_statistics`), and the items that carried no signal or
could not be judged."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

PerItem = Mapping[str, Mapping[str, float]]
"""item key ("category/item") -> statistic name -> value."""

COLUMNS = (
    ("score", "score"), ("confidence", "conf"), ("omega", "omega"), ("reward_share", "reward%"), ("spread", "spread"),
    ("advantage_share", "adv%"), ("agreement", "agree"), ("calibration_error", "ECE"),
)
"""(statistic, column heading) of the table, in order; ``%`` columns print shares as percentages."""

MIN_SPREAD = 0.01
"""An item whose mean within-set spread of scores is below this carried no signal."""
MIN_CONFIDENCE = 0.2
"""An item whose mean confidence is below this could not be judged."""


def mean_over_steps(steps: Iterable[PerItem]) -> dict[str, dict[str, float]]:
    """Per item and statistic, the mean over the steps that have it (every step weighs the same)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for step in steps:
        for key, values in step.items():
            for name, value in values.items():
                if value is not None and math.isfinite(value):
                    total = sums.setdefault(key, {}).setdefault(name, [0.0, 0.0])
                    total[0] += value
                    total[1] += 1
    return {key: {name: total / count for name, (total, count) in values.items()} for key, values in sums.items()}


def item_flags(values: Mapping[str, float], min_spread: float = MIN_SPREAD, min_confidence: float = MIN_CONFIDENCE) -> list[str]:
    """``no signal`` (mean spread < ``min_spread``: the item never told a set's responses apart),
    ``not judged`` (mean confidence < ``min_confidence``), ``no data`` (never scored)."""
    if "score" not in values:
        return ["no data"]
    flags = []
    if values.get("spread", 0.0) < min_spread:
        flags.append("no signal")
    if values.get("confidence", 0.0) < min_confidence:
        flags.append("not judged")
    return flags


def rubric_table(
    per_item: PerItem, keys: Iterable[str] | None = None, weights: Mapping[str, float] | None = None,
    min_spread: float = MIN_SPREAD, min_confidence: float = MIN_CONFIDENCE,
) -> str:
    """The table, one row per item (``keys``: which, in order; default every item of ``per_item``),
    with the rubric weight w when ``weights`` gives it, a "-" for a statistic never logged, and the
    flags of :func:`item_flags` last."""
    keys = list(per_item) if keys is None else list(keys)
    headings = ["item", *(["w"] if weights is not None else []), *(heading for _, heading in COLUMNS), "flags"]
    rows = []
    for key in keys:
        values = per_item.get(key, {})
        cells = [key]
        if weights is not None:
            cells.append(_number(weights.get(key)))
        for name, heading in COLUMNS:
            value = values.get(name)
            cells.append(_number(None if value is None else 100 * value) if heading.endswith("%") else _number(value))
        cells.append(", ".join(item_flags(values, min_spread, min_confidence)))
        rows.append(cells)
    widths = [max(len(row[column]) for row in [headings, *rows]) for column in range(len(headings))]
    lines = ["  ".join(cell.ljust(width) if column == 0 or column == len(headings) - 1 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(row, widths))).rstrip()
             for row in [headings, *rows]]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
