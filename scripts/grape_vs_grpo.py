"""GRAPE against GRPO when the training reward comes from a judge alone.

    python scripts/grape_vs_grpo.py                           # every run on the CPU (hours on two cores)
    python scripts/grape_vs_grpo.py --accelerator gpu --jobs 15
    python scripts/grape_vs_grpo.py --report-only             # table and plot from the runs already made

From the same start (grape/tiny-addition-sft, configs/grape.yaml's settings) every run trains on
two-digit addition with a training reward made only of judged rubric items (``JUDGED_RUBRIC``):
"is the response correct", "is its units digit right", "is it a plain number" and "is it pleasing
to read", weight 1 each, all asked of one critic. The task's verifier is held back: it is a rubric
item of weight 0, so it never enters a reward; it measures the greedy accuracy on the 200
held-out prompts (``val/accuracy``, every ``--val-every`` steps) and is the reference against
which the ``reliability`` weighting measures each judged item's agreement.

Critics (``CRITICS``):
- ``shipped``: grape/tiny-addition-critic as built (docs/critic.md): right and sure on the first
  three questions, unsure on "pleasing".
- ``noisy``: the same critic, guessing on ``correct`` 80% of the time and saying so (its confidence
  there is 0.2 of the critic's: :class:`~grape_lightning.rewards.critics.CorruptedCritic` ``noise``).
- ``wrong``: the same critic, with every answer on ``correct`` inverted at full confidence
  (``invert``): sure and wrong, which nothing in its own judgements shows.

Arms (``ARMS``), the same module and settings but for how the items are weighted:
- ``grape_confidence``: GRAPE, omega_k = w_k mean_i c_ik (the default weighting).
- ``grape_reliability``: GRAPE, omega_k = w_k R_k, R_k the item's running agreement with the
  held-back verifier (``weighting: {mode: reliability}``).
- ``grpo_mean``: GRPO on the equal-weight mean of the same judged items (``weighting: {mode: fixed}``).
- ``grpo_verifier``: GRPO on the verifier itself (the upper bound; it asks no critic).

Each run is the real ``grape fit --config configs/grape.yaml --config <run>.yaml``, several at a
time (``--jobs``); the runs' TensorBoard logs are read back for the report: a table of held-out
accuracy per critic and arm (mean and standard deviation over seeds, at the start and at the end),
written with the curves' numbers to ``--report`` (Markdown) and ``--results`` (JSON), and a plot
of the mean curves to ``--plot`` (needs matplotlib: ``pip install -e '.[plots]'``). A run whose
logs are complete is not run again. The measured table and its reading: docs/grape_vs_grpo.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from run_grid import (
    ROOT, accuracy_curve, add_grid_arguments, finished, logger_config, read_scalars, run_all, start_end_change, write_results,
)
from run_grid import log_dir as run_log_dir
BASE_CONFIG = ROOT / "configs" / "grape.yaml"
QUESTIONS = {
    "correct": "Is the response the correct result of the arithmetic in the prompt?",
    "units_digit": "Is the units digit of the response right?",
    "plain_number": "Is the response a plain number?",
    "pleasing": "Is the response pleasing to read?",
}
VERIFIED = {"name": "verified", "kind": "verifiable", "check": "numeric_match"}
JUDGED_RUBRIC = {
    "default_category": "math",
    "categories": {"math": [dict(VERIFIED, weight=0.0)] + [
        {"name": name, "weight": 1.0, "kind": "judged", "critic": "judge", "question": question}
        for name, question in QUESTIONS.items()
    ]},
}
VERIFIED_RUBRIC = {"default_category": "math", "categories": {"math": [dict(VERIFIED, weight=1.0)]}}
SHIPPED_CRITIC = {"class_path": "grape_lightning.rewards.critics.LocalLMCritic", "init_args": {"model": "grape/tiny-addition-critic"}}


def corrupted(mode: str, rate: float) -> dict:
    return {
        "class_path": "grape_lightning.rewards.critics.CorruptedCritic",
        "init_args": {"critic": SHIPPED_CRITIC, "mode": mode, "rate": rate, "items": ["correct"]},
    }


CRITICS = {"shipped": SHIPPED_CRITIC, "noisy": corrupted("noise", 0.8), "wrong": corrupted("invert", 1.0)}
ARMS = {
    "grape_confidence": {"mode": "confidence"},
    "grape_reliability": {"mode": "reliability", "momentum": 0.9},
    "grpo_mean": {"mode": "fixed"},
    "grpo_verifier": None,  # the verifier's reward: no critic, no weighting to choose
}
ARM_LABELS = {
    "grape_confidence": "GRAPE (confidence)",
    "grape_reliability": "GRAPE (reliability)",
    "grpo_mean": "GRPO (mean of items)",
    "grpo_verifier": "GRPO (verifier)",
}


def runs(critics: list[str], arms: list[str], seeds: list[int]) -> list[tuple[str, str, int]]:
    """(critic, arm, seed) of every run; the verifier arm once per seed (it asks no critic)."""
    out = [("none", "grpo_verifier", seed) for seed in seeds if "grpo_verifier" in arms]
    out += [(critic, arm, seed) for critic in critics for arm in arms if arm != "grpo_verifier" for seed in seeds]
    return out


def run_name(critic: str, arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}" if arm == "grpo_verifier" else f"{critic}-{arm}-seed{seed}"


def run_config(out: Path, critic: str, arm: str, seed: int, args: argparse.Namespace) -> dict:
    """The config layered on configs/grape.yaml for one run."""
    verifier_arm = arm == "grpo_verifier"
    rubric_path = out / "rubrics" / ("verified.yaml" if verifier_arm else "judged.yaml")
    model = {
        "rubric": str(rubric_path),
        "accuracy": "math/verified",
        "critics": {} if verifier_arm else {"judge": CRITICS[critic]},
        "seed": seed,
    }
    if not verifier_arm:
        model["weighting"] = ARMS[arm]
    return {
        "seed_everything": seed,
        "trainer": {
            "max_steps": args.steps,
            "val_check_interval": args.val_every,
            "accelerator": args.accelerator,
            "enable_checkpointing": False,
            "logger": logger_config(out, run_name(critic, arm, seed)),
            "callbacks": [{"class_path": "grape_lightning.callbacks.RunSummary"}],
        },
        "model": {"init_args": model},
    }


def launch(out: Path, critic: str, arm: str, seed: int, args: argparse.Namespace) -> tuple[str, Path, dict, int]:
    return run_name(critic, arm, seed), BASE_CONFIG, run_config(out, critic, arm, seed, args), args.steps


def train_all(out: Path, args: argparse.Namespace) -> None:
    (out / "rubrics").mkdir(parents=True, exist_ok=True)
    (out / "rubrics" / "judged.yaml").write_text(json.dumps(JUDGED_RUBRIC, indent=1) + "\n")
    (out / "rubrics" / "verified.yaml").write_text(json.dumps(VERIFIED_RUBRIC, indent=1) + "\n")
    todo = [launch(out, *run, args) for run in runs(args.critics, args.arms, args.seeds)]
    run_all(out, todo, args.jobs, args.threads)


def collect(out: Path, args: argparse.Namespace) -> dict:
    """Per (critic, arm): the held-out accuracy curve of every seed, and the item weights' shares."""
    results: dict = {"steps": args.steps, "seeds": args.seeds, "curves": {}, "reward_shares": {}}
    for critic, arm, seed in runs(args.critics, args.arms, args.seeds):
        log_dir = run_log_dir(out, run_name(critic, arm, seed))
        if not finished(log_dir, args.steps):
            print(f"  {run_name(critic, arm, seed)}: incomplete, left out", flush=True)
            continue
        accuracy = accuracy_curve(log_dir)
        key = "verifier" if arm == "grpo_verifier" else f"{critic}/{arm}"
        results["curves"].setdefault(key, {})[str(seed)] = {str(step): value for step, value in sorted(accuracy.items())}
        shares = read_scalars(log_dir, "rubric/math/")
        results["reward_shares"].setdefault(key, {})[str(seed)] = {
            tag.split("/")[2]: statistics.fmean(values.values()) for tag, values in shares.items() if tag.endswith("/reward_share") and values
        }
    return results


def table(results: dict) -> str:
    """Markdown: per critic and arm, held-out accuracy at the start and the end (mean +- sd over
    seeds) and the mean reward share of the ``correct`` item."""
    lines = [
        "| critic | arm | seeds | accuracy at step 0 | accuracy at the end | change | `correct`'s share of the reward |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, curves in results["curves"].items():
        critic, arm = ("-", "grpo_verifier") if key == "verifier" else key.split("/")
        shares = [s["correct"] for s in results["reward_shares"].get(key, {}).values() if "correct" in s]
        share = f"{statistics.fmean(shares):.2f}" if shares else "-"
        seeds, start, end, change = start_end_change(curves, results["steps"])
        lines.append(f"| {critic} | {ARM_LABELS[arm]} | {seeds} | {start} | {end} | {change} | {share} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, critics: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(critics), figsize=(4.2 * len(critics), 3.6), sharey=True)
    for axis, critic in zip([axes] if len(critics) == 1 else axes, critics):
        for key, curves in results["curves"].items():
            arm = "grpo_verifier" if key == "verifier" else key.split("/")[1]
            if key != "verifier" and not key.startswith(critic + "/"):
                continue
            steps = sorted({int(step) for curve in curves.values() for step in curve})
            per_step = [[curve[str(step)] for curve in curves.values() if str(step) in curve] for step in steps]
            mean = [statistics.fmean(values) for values in per_step]
            sd = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in per_step]
            style = {"linestyle": "--", "color": "0.4"} if arm == "grpo_verifier" else {}
            line, = axis.plot(steps, mean, label=ARM_LABELS[arm], **style)
            axis.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.15, color=line.get_color())
        axis.set_title(f"critic: {critic}")
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    (axes if len(critics) == 1 else axes[0]).set_ylabel("held-out greedy accuracy")
    (axes if len(critics) == 1 else axes[-1]).legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser, "grape_vs_grpo")
    parser.add_argument("--critics", nargs="+", choices=list(CRITICS), default=list(CRITICS))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--val-every", type=int, default=25)
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "grape_vs_grpo_table.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "grape_vs_grpo.png")
    args = parser.parse_args()
    out = args.out.resolve()
    if not args.report_only:
        train_all(out, args)
    results = collect(out, args)
    write_results(args.results, results)
    text = table(results)
    args.report.write_text(text + "\n")
    print(text)
    critics = [c for c in args.critics if any(k.startswith(c + "/") for k in results["curves"])]
    if not critics:
        print(f"wrote {args.results} and {args.report}: no finished run to plot")
        return
    try:
        plot(results, args.plot, critics)
        print(f"wrote {args.results}, {args.report} and {args.plot}")
    except ImportError:
        print(f"wrote {args.results} and {args.report}; the plot needs matplotlib (pip install -e '.[plots]')")


if __name__ == "__main__":
    main()
