"""How much every on-policy RL algorithm lifts every built-in task family.

    python scripts/learning_table.py                            # every run on the CPU (many hours on two cores)
    python scripts/learning_table.py --accelerator gpu --jobs 8
    python scripts/learning_table.py --algorithms grpo ppo --families sort --seeds 0
    python scripts/learning_table.py --report-only              # the table from the runs already made

Algorithms (``ALGORITHMS``): the on-policy RL configs in configs/ (grpo, grape, reinforce, rloo,
reinforce_pp, ppo, trpo, rejection_sampling, gspo, cispo, dapo), each with its own settings and
step budget (``--steps`` / ``--val-every`` override every one). ``max_steps`` counts optimizer
steps and ``val_check_interval`` rollout batches: PPO, GSPO and CISPO take two optimizer steps per
batch, so with ``--steps N`` they need ``--val-every`` at most N/2 to validate after step 0, and
the table's "steps" column is the last validation's rollout batch for them (training steps for
the rest). Distillation (configs/distill.yaml)
is left out: it needs a teacher model per family, and only addition has one.

Families (``FAMILIES``): ``addition`` (the configs as they are: ArithmeticTask from
grape/tiny-addition-sft), ``word_problem`` (WordProblemTask from grape/tiny-word_problem-sft) and
``sort`` (SortTask from grape/tiny-sort-sft), the last two with configs/tasks/*.yaml's task
settings and response length. For a new family the override swaps the task, the start model, the
verifier reward (the task's own, :class:`~grape_lightning.rewards.TaskVerifier`; DAPO's overlong
punishment follows the response length) and ``accuracy``; GRAPE takes configs/rubrics/tasks.yaml
(verified items only, no critic) with the family's ``correct`` item as its accuracy.

Each run is the real ``grape fit --config configs/<algorithm>.yaml --config <run>.yaml`` with
``seed_everything`` and the model's seed set to the run's seed, its own logger directory and no
checkpoints; several run at a time (``--jobs``) and a finished run is not run again
(scripts/run_grid.py). The held-out greedy accuracy (``val/accuracy``, 200 prompts) at step 0 and
at the last validation, mean +- sd over seeds, and the change, go to ``--report`` (Markdown); the
curves to ``--results`` (JSON).

A sensitivity sweep varies shared settings (``SETTINGS``) over their product, each value set in
every run of the grid and named in the run and the table:

    python scripts/learning_table.py --algorithms grpo --sweep lr=1e-4,2e-4,5e-4 group_size=4,8,16 \
        --report docs/learning_sweep.md --results docs/learning_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import yaml

from run_grid import (
    ROOT, accuracy_curve, add_grid_arguments, done_marker, log_dir, logger_config, run_all, start_end_change, write_results,
)

ALGORITHMS = ["grpo", "grape", "reinforce", "rloo", "reinforce_pp", "ppo", "trpo", "rejection_sampling", "gspo", "cispo", "dapo"]
TASKS = "grape_lightning.data.tasks."
FAMILIES = {
    "addition": None,  # the configs as they are
    "word_problem": {
        "task": {"class_path": TASKS + "WordProblemTask", "init_args": {"max_value": 10, "num_train": 3000, "num_val": 200}},
        "model": "grape/tiny-word_problem-sft", "max_new_tokens": 4,
        "accuracy": "word_problem_verifier", "grape_accuracy": "math/correct",
    },
    "sort": {
        "task": {"class_path": TASKS + "SortTask", "init_args": {"min_length": 3, "max_length": 6, "num_train": 3000, "num_val": 200}},
        "model": "grape/tiny-sort-sft", "max_new_tokens": 8,
        "accuracy": "sort_verifier", "grape_accuracy": "string/correct",
    },
}
TASK_RUBRIC = ROOT / "configs" / "rubrics" / "tasks.yaml"
SETTINGS = {  # what a sweep may vary: name -> where the value sits in a run's config
    "lr": ("model", "init_args", "optimizer", "lr"),
    "group_size": ("data", "init_args", "group_size"),
    "batch_size": ("data", "init_args", "batch_size"),
    "temperature": ("model", "init_args", "sampling", "temperature"),
    "epochs": ("model", "init_args", "update", "epochs"),
    "max_kl": ("model", "init_args", "trust_region", "max_kl"),
    "policy": ("model", "init_args", "policy", "name_or_path"),  # the start model
}


def base_config(algorithm: str) -> Path:
    return ROOT / "configs" / f"{algorithm}.yaml"


def run_name(algorithm: str, family: str, seed: int, setting: tuple[tuple[str, str], ...] = ()) -> str:
    values = (f"{name}{Path(value).name if name == 'policy' else value}" for name, value in setting)
    return "-".join([algorithm, family, *values, f"seed{seed}"])


def parse_sweep(items: list[str]) -> list[tuple[tuple[str, str], ...]]:
    """["lr=1e-4,2e-4", "group_size=8,16"] -> every combination, as ((name, value), ...) tuples."""
    axes = []
    for item in items:
        name, _, values = item.partition("=")
        if name not in SETTINGS or not values:
            raise SystemExit(f"--sweep {item!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SETTINGS)}")
        axes.append([(name, value) for value in values.split(",")])
    return list(itertools.product(*axes))


def has_setting(algorithm: str, name: str) -> bool:
    """Whether configs/<algorithm>.yaml sets ``name`` (TRPO has no lr: its step is bounded by max_kl)."""
    node = yaml.safe_load(base_config(algorithm).read_text())
    for key in SETTINGS[name]:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def parsed(text: str):
    """A sweep value as its type: "16" -> 16, "1e-4" -> 0.0001 (which YAML would keep a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def set_in(config: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        config = config.setdefault(key, {})
    config[path[-1]] = value


def model_override(algorithm: str, family: str, seed: int) -> dict:
    """model.init_args of one run: the seed, and for a new family its start model, reward and accuracy."""
    model: dict = {"seed": seed}
    spec = FAMILIES[family]
    if spec is None:
        return model
    model["policy"] = {"name_or_path": spec["model"]}
    model["sampling"] = {"max_new_tokens": spec["max_new_tokens"]}
    if algorithm == "grape":
        model.update(rubric=str(TASK_RUBRIC), critics={}, accuracy=spec["grape_accuracy"])
        return model
    verifier = {"class_path": "grape_lightning.rewards.TaskVerifier", "init_args": {"task": {"class_path": spec["task"]["class_path"]}}}
    rewards = [verifier]
    if algorithm == "dapo":  # the soft overlong punishment, rescaled to the family's response length
        rewards.append({"class_path": "grape_lightning.rewards.OverlongPunishment",
                        "init_args": {"max_length": spec["max_new_tokens"], "cache_length": 2}})
    model.update(rewards=rewards, accuracy=spec["accuracy"])
    return model


def run_config(out: Path, algorithm: str, family: str, seed: int, args: argparse.Namespace,
               setting: tuple[tuple[str, str], ...] = ()) -> dict:
    """The config layered on configs/<algorithm>.yaml for one run, with a sweep's ``setting``."""
    trainer: dict = {
        "accelerator": args.accelerator,
        "enable_checkpointing": False,
        "logger": logger_config(out, run_name(algorithm, family, seed, setting)),
    }
    if args.steps is not None:
        trainer["max_steps"] = args.steps
    if args.val_every is not None:
        trainer["val_check_interval"] = args.val_every
    config = {"seed_everything": seed, "trainer": trainer, "model": {"init_args": model_override(algorithm, family, seed)}}
    if FAMILIES[family] is not None:
        config["data"] = {"init_args": {"task": FAMILIES[family]["task"]}}
    for name, value in setting:
        set_in(config, SETTINGS[name], parsed(value))
    return config


def max_steps(algorithm: str, args: argparse.Namespace) -> int:
    if args.steps is not None:
        return args.steps
    return yaml.safe_load(base_config(algorithm).read_text())["trainer"]["max_steps"]


def runs(args: argparse.Namespace) -> list[tuple[str, str, tuple, int]]:
    """(algorithm, family, setting, seed) of every run; a sweep's settings apply to the algorithms
    whose config has them."""
    settings = parse_sweep(args.sweep) if args.sweep else [()]
    return [(a, f, setting, s) for a in args.algorithms for setting in settings
            if all(has_setting(a, name) for name, _ in setting) for f in args.families for s in args.seeds]


def train_all(out: Path, args: argparse.Namespace) -> None:
    todo = [(run_name(a, f, s, setting), base_config(a), run_config(out, a, f, s, args, setting), max_steps(a, args))
            for a, f, setting, s in runs(args)]
    run_all(out, todo, args.jobs, args.threads)


def collect(out: Path, args: argparse.Namespace) -> dict:
    """{"curves": {algorithm: {family: {seed: {step: accuracy}}}}} of the finished runs; a sweep's
    algorithm key names its setting too ("grpo lr=5e-4 group_size=16")."""
    results: dict = {"seeds": args.seeds, "curves": {}}
    for algorithm, family, setting, seed in runs(args):
        name = run_name(algorithm, family, seed, setting)
        curve = accuracy_curve(log_dir(out, name))
        if not done_marker(out, name).exists() or 0 not in curve:
            print(f"  {name}: incomplete, left out", flush=True)
            continue
        if len(curve) < 2:
            print(f"  {name}: no validation after step 0 (--val-every counts rollout batches), left out", flush=True)
            continue
        key = " ".join([algorithm, *(f"{n}={v}" for n, v in setting)])
        results["curves"].setdefault(key, {}).setdefault(family, {})[str(seed)] = {str(k): v for k, v in sorted(curve.items())}
    return results


def table(results: dict) -> str:
    """Markdown: per algorithm and family, held-out accuracy at step 0 and at the last validation
    (mean +- sd over seeds) and the change."""
    lines = ["| algorithm | family | seeds | steps | accuracy at step 0 | accuracy at the end | change |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for algorithm, families in results["curves"].items():
        for family, curves in families.items():
            last = min(max(int(step) for step in curve) for curve in curves.values())
            seeds, start, end, change = start_end_change(curves, last)
            lines.append(f"| {algorithm} | {family} | {seeds} | {last} | {start} | {end} | {change} |")
    return "\n".join(lines)


def merged(earlier: dict, results: dict) -> dict:
    """``results`` with the curves of ``earlier`` (a results JSON of runs made elsewhere, on another
    machine) that it lacks; a run found in both keeps this machine's curve."""
    curves: dict = {}
    for source in (earlier, results):
        for algorithm, by_family in source["curves"].items():
            for family, by_seed in by_family.items():
                curves.setdefault(algorithm, {}).setdefault(family, {}).update(by_seed)
    seeds = sorted({*earlier["seeds"], *results["seeds"]})
    return {"seeds": seeds, "curves": {a: {f: dict(sorted(s.items())) for f, s in fs.items()} for a, fs in curves.items()}}


def change_table(results: dict) -> str:
    """Markdown: one row per algorithm (and sweep setting), one column per family, each cell the
    change in held-out accuracy from step 0 to the last validation, mean +- sd over seeds."""
    families = list(dict.fromkeys(f for by_family in results["curves"].values() for f in by_family))
    lines = ["| algorithm | " + " | ".join(families) + " |", "| --- |" + " --- |" * len(families)]
    for algorithm, by_family in results["curves"].items():
        cells = []
        for family in families:
            curves = by_family.get(family)
            if curves is None:
                cells.append("")
                continue
            last = min(max(int(step) for step in curve) for curve in curves.values())
            cells.append(start_end_change(curves, last)[3])
        lines.append(f"| {algorithm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser, "learning_table")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=ALGORITHMS)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=None, help="max_steps of every run (default: each config's)")
    parser.add_argument("--val-every", type=int, default=None, help="val_check_interval of every run (default: each config's)")
    parser.add_argument("--sweep", nargs="+", metavar="NAME=V1,V2", help=f"settings to vary, over their product: {', '.join(SETTINGS)}")
    parser.add_argument("--include", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="results JSON of runs made elsewhere (another machine), merged into the report")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "learning_table.md")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.report_only:
        train_all(out, args)
    results = collect(out, args)
    for path in args.include or []:
        results = merged(json.loads(path.read_text()), results)
    write_results(args.results, results)
    text = change_table(results) + "\n\n" + table(results)
    args.report.write_text("# " + ("Sensitivity sweep" if args.sweep else "Learning table") + "\n\nMade by `python scripts/learning_table.py "
                           + " ".join(sys.argv[1:]) + "`: held-out greedy accuracy (200 prompts) at step 0 and at the last validation, "
                           "mean +- sd over seeds; first its change per family, then each family's numbers."
                           + (" Runs not under --out were merged from " + ", ".join(f"`{p}`" for p in args.include)
                              + " (made on another machine)." if args.include else "") + "\n\n" + text + "\n")
    print(text)
    print(f"wrote {args.report} and {args.results}")


if __name__ == "__main__":
    main()
