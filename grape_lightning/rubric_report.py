"""``grape rubric-report RUN_DIR``: what each rubric item of a GRAPE run did, and the rubric to
try next.

    grape rubric-report runs/grape/version_0
    grape rubric-report runs/grape/version_0 --last 50 --min-spread 0.02 --out rubrics/next.yaml

It reads the per-item metrics the run logged (``rubric/<category>/<item>/<statistic>`` in the
TensorBoard event files of the run directory; :mod:`~grape_lightning.rewards.rubric_statistics`
defines them), averages each over the logged training steps (every step the same weight; the
last ``--last`` of them when given), prints the table of
:func:`~grape_lightning.rewards.rubric_table.rubric_table` (the one a run prints at the end of
``fit``), flags the items that carried no signal (mean spread within sample sets below
``--min-spread``) or could not be judged (mean confidence below ``--min-confidence``), and writes
the rubric with suggested weights (:func:`suggested_weights`) to ``--out`` (default
``RUN_DIR/rubric_suggested.yaml``), which loads with :func:`~grape_lightning.rewards.rubric.load_rubric`.

The rubric is the one the run's ``config.yaml`` names (``model.init_args.rubric``; a relative path
is taken from the directory training ran in, which the run's checkpoints record, else from the
current directory), or ``--rubric``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml

from grape_lightning.rewards.rubric import Rubric, RubricError, load_rubric
from grape_lightning.rewards.rubric_table import MIN_CONFIDENCE, MIN_SPREAD, PerItem, item_flags, mean_over_steps, rubric_table
from grape_lightning.run_logs import read_scalars

RUBRIC_REPORT_HELP = "Print what each rubric item of a GRAPE run did and write a rubric with suggested weights."
_PREFIX = "rubric/"


class RunDirectoryError(ValueError):
    """A run directory that holds no GRAPE logs to report on; the message names the path."""


def read_item_metrics(run_dir: str | Path) -> list[dict[str, dict[str, float]]]:
    """Per logged step (in step order), ``{item key: {statistic: value}}`` from the TensorBoard
    event files directly in ``run_dir`` (every file, so a resumed run's too; a step logged twice
    keeps its last value)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir}: no such run directory")
    if not any(run_dir.glob("events.out.tfevents.*")):
        raise RunDirectoryError(
            f"{run_dir}: no TensorBoard event files (events.out.tfevents.*); give the directory of one run, "
            "such as runs/grape/version_0"
        )
    steps: dict[int, dict[str, dict[str, float]]] = {}
    for tag, values in read_scalars(run_dir, _PREFIX).items():
        if tag.count("/") < 3:
            continue
        key, name = tag[len(_PREFIX):].rsplit("/", 1)
        for step, value in values.items():
            steps.setdefault(step, {}).setdefault(key, {})[name] = value
    if not steps:
        raise RunDirectoryError(
            f"{run_dir}: the event files hold no rubric/<category>/<item>/... metrics (not a GRAPE run, or no training "
            "step was logged yet)"
        )
    return [steps[step] for step in sorted(steps)]


def reliability_of(values: Mapping[str, float], verifiable: bool) -> float:
    """rho_k: 1 for a verifiable item; else its mean agreement with the verifiable items of its
    category where it was measured; else its mean confidence (what confidence weighting scaled it by)."""
    if verifiable:
        return 1.0
    if "agreement" in values:
        return values["agreement"]
    return values.get("confidence", 1.0)


def suggested_weights(
    rubric: Rubric, per_item: PerItem, min_spread: float = MIN_SPREAD, min_confidence: float = MIN_CONFIDENCE
) -> tuple[dict[str, float], list[str]]:
    """The weights for the next run, per item key, and notes on categories left as they were.

    For item k of a category C with rubric weight w_k and the run's means (``per_item``):

        w~_k = 0                   flagged "no signal" (spread < min_spread) or "not judged"
                                   (confidence < min_confidence)
        w~_k = w_k                 never scored in the run ("no data": nothing was learnt about it)
        w~_k = w_k * rho_k         otherwise (rho_k: :func:`reliability_of`)
        w'_k = w~_k * sum_{j in C} w_j / sum_{j in C} w~_j

    so each category keeps its total weight (a response's reward is a weighted mean, so only the
    ratios matter; the total keeps the numbers comparable). A category whose w~ are all 0 (every
    item flagged) keeps its weights: a rubric needs a weight above 0 in each category, and the
    note says so. Weights are rounded to 4 decimals.
    """
    suggested: dict[str, float] = {}
    notes: list[str] = []
    for category, items in rubric.categories.items():
        raw = {}
        for item in items:
            key = f"{category}/{item.name}"
            values = per_item.get(key, {})
            flags = item_flags(values, min_spread, min_confidence)
            if flags == ["no data"]:
                raw[key] = item.weight
            elif flags:
                raw[key] = 0.0
            else:
                raw[key] = item.weight * reliability_of(values, item.kind == "verifiable")
        total, new_total = sum(item.weight for item in items), sum(raw.values())
        if new_total <= 0:
            notes.append(f"every item of category {category!r} is flagged: its weights are kept")
            raw = {f"{category}/{item.name}": item.weight for item in items}
            new_total = total
        suggested.update({key: round(value * total / new_total, 4) for key, value in raw.items()})
    return suggested, notes


def revised_rubric_text(rubric: Rubric, weights: Mapping[str, float], header: Sequence[str]) -> str:
    """The rubric as YAML with ``weights`` in place of its own, ``header`` as comment lines first."""
    document: dict = {}
    if rubric.default_category is not None:
        document["default_category"] = rubric.default_category
    document["categories"] = {
        category: [
            {"name": item.name, "weight": weights[f"{category}/{item.name}"], "kind": item.kind, **item.params} for item in items
        ]
        for category, items in rubric.categories.items()
    }
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header)
    return comments + yaml.safe_dump(document, sort_keys=False, width=1_000_000, allow_unicode=True)


def _training_directory(run_dir: Path) -> Path | None:
    """The working directory of training, as the run's newest checkpoint records it."""
    from grape_lightning.callbacks.working_directory import _KEY

    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    for checkpoint in checkpoints:
        try:
            recorded = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True).get(_KEY)
        except Exception:  # a torn checkpoint: try the next
            continue
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return None


def run_rubric_path(run_dir: Path) -> Path:
    """The rubric file of the run in ``run_dir`` (see the module docstring)."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirectoryError(f"{config_path}: not found, so the run's rubric is unknown; name it with --rubric")
    config = yaml.safe_load(config_path.read_text()) or {}
    rubric = (((config.get("model") or {}).get("init_args") or {}).get("rubric"))
    if not rubric:
        raise RunDirectoryError(f"{config_path}: model.init_args.rubric is not set (not a GRAPE run?); name the rubric with --rubric")
    path = Path(rubric)
    if path.is_absolute():
        return path
    training = _training_directory(run_dir)
    candidates = ([training / path] if training is not None else []) + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise RunDirectoryError(
        f"{config_path}: the run's rubric {rubric!r} is not at {' or '.join(str(c) for c in candidates)}; name it with --rubric"
    )


def rubric_report(
    run_dir: str | Path, rubric_path: str | Path | None = None, out: str | Path | None = None, last: int | None = None,
    min_spread: float = MIN_SPREAD, min_confidence: float = MIN_CONFIDENCE,
) -> tuple[str, Path]:
    """The report's text and the path of the revised rubric it wrote (see the module docstring)."""
    run_dir = Path(run_dir)
    steps = read_item_metrics(run_dir)
    if last is not None:
        steps = steps[-last:]
    rubric = load_rubric(rubric_path if rubric_path is not None else run_rubric_path(run_dir))
    per_item = mean_over_steps(steps)
    keys = [f"{category}/{item.name}" for category, item in rubric.item_keys]
    unknown = sorted(set(per_item) - set(keys))
    if unknown:
        raise RubricError(f"{rubric.source}: the run logged items the rubric does not have: {unknown}")
    weights = {f"{category}/{item.name}": item.weight for category, item in rubric.item_keys}
    suggested, notes = suggested_weights(rubric, per_item, min_spread, min_confidence)
    out = Path(out) if out is not None else run_dir / "rubric_suggested.yaml"
    changes = [f"{key}: {weights[key]:g} -> {suggested[key]:g}" for key in keys]
    header = [
        f"Suggested by grape rubric-report from {run_dir} ({len(steps)} logged steps) and {rubric.source}.",
        "w' = w * reliability (1 for a verifiable item; else the agreement with the verifiable items of its category;",
        f"else the confidence), 0 for items with no signal (spread < {min_spread:g}) or not judged (confidence < {min_confidence:g}),",
        "rescaled so that each category keeps its total weight.",
        *changes, *notes,
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(revised_rubric_text(rubric, suggested, header))
    load_rubric(out)  # what the next run will do with it
    table = rubric_table(per_item, keys=keys, weights=weights, min_spread=min_spread, min_confidence=min_confidence)
    text = "\n".join([
        f"rubric items of {run_dir} over {len(steps)} logged steps (%: share of the reward / of sum |A|):", table, "",
        "suggested weights:", *(f"  {line}" for line in changes), *notes, f"wrote {out}",
    ])
    return text, out


def rubric_report_main(argv: Sequence[str]) -> str:
    """``grape rubric-report``: print the report; a run directory without GRAPE logs, or a rubric
    that cannot be found, ends the command with a one-line error naming the path (exit status 2)."""
    parser = argparse.ArgumentParser(prog="grape rubric-report", description=RUBRIC_REPORT_HELP)
    parser.add_argument("run_dir", help="the run's log directory, such as runs/grape/version_0")
    parser.add_argument("--out", default=None, help="where to write the revised rubric (default: RUN_DIR/rubric_suggested.yaml)")
    parser.add_argument("--rubric", default=None, help="the run's rubric file (default: the one the run's config.yaml names)")
    parser.add_argument("--last", type=int, default=None, help="average over the last N logged steps only (default: all)")
    parser.add_argument("--min-spread", type=float, default=MIN_SPREAD,
                        help=f"flag items whose mean spread within sample sets is below this as carrying no signal (default {MIN_SPREAD})")
    parser.add_argument("--min-confidence", type=float, default=MIN_CONFIDENCE,
                        help=f"flag items whose mean confidence is below this as not judged (default {MIN_CONFIDENCE})")
    options = parser.parse_args(list(argv))
    if options.last is not None and options.last < 1:
        parser.error(f"--last must be at least 1, got {options.last}")
    try:
        text, out = rubric_report(options.run_dir, options.rubric, options.out, options.last, options.min_spread, options.min_confidence)
    except (RunDirectoryError, RubricError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(text)
    return str(out)
