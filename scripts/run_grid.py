"""Run many ``grape fit`` configs and read their curves back.

A run is ``grape fit --config <base>.yaml --config <out>/configs/<name>.yaml``, its TensorBoard
logs under ``<out>/runs/<name>/version_0`` and its console under ``<out>/logs/<name>.log``; several
run at a time (``jobs``), and a run whose held-out accuracy reached the last step is not run again.
The curves come back as {training steps done: ``val/accuracy``}, summarised by mean and standard
deviation over seeds. scripts/grape_vs_grpo.py and scripts/learning_table.py are built on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grape_lightning.run_logs import read_scalars

ROOT = Path(__file__).resolve().parents[1]


def log_dir(out: Path, name: str) -> Path:
    return out / "runs" / name / "version_0"


def logger_config(out: Path, name: str) -> dict:
    """The trainer's logger settings that put a run's logs where :func:`log_dir` reads them."""
    return {"init_args": {"save_dir": str(out / "runs"), "name": name, "version": 0}}


def accuracy_curve(log_dir: Path) -> dict[int, float]:
    """{training steps done: held-out accuracy}. The initial policy is logged at step 0; Lightning
    logs a validation at the index of the training batch it follows (149 for the one after 150
    steps), so those points move one step on."""
    if not any(log_dir.glob("events.out.tfevents.*")):
        return {}
    logged = read_scalars(log_dir, "val/accuracy").get("val/accuracy", {})
    return {step + 1 if step > 0 else 0: value for step, value in sorted(logged.items())}


def finished(log_dir: Path, steps: int) -> bool:
    return steps in accuracy_curve(log_dir)


def done_marker(out: Path, name: str) -> Path:
    """Written when a run exits cleanly: the finished check for runs whose last validation does not
    fall on ``steps`` (PPO counts optimizer steps, several per validated rollout batch)."""
    return out / "logs" / f"{name}.done"


def launch(out: Path, name: str, base: Path, config: dict, steps: int, threads: int) -> tuple[str, float, int]:
    """Run one config unless it is finished; (name, seconds taken (0: done before), exit code)."""
    if done_marker(out, name).exists() or finished(log_dir(out, name), steps):
        return name, 0.0, 0
    for sub in ("configs", "logs", "runs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    path = out / "configs" / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1) + "\n")  # JSON is YAML
    began = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with (out / "logs" / f"{name}.log").open("w") as log:
        code = subprocess.run(
            [sys.executable, "-m", "grape_lightning.cli", "fit", "--config", str(base), "--config", str(path)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        ).returncode
    if code == 0:
        done_marker(out, name).touch()
    return name, time.perf_counter() - began, code


def run_all(out: Path, todo: list[tuple[str, Path, dict, int]], jobs: int, threads: int) -> dict[str, int]:
    """Launch every (name, base config, override, max_steps) ``jobs`` at a time, printing each
    outcome; {name: exit code}."""
    print(f"{len(todo)} runs, {jobs} at a time, logs under {out}", flush=True)
    codes = {}
    with ThreadPoolExecutor(jobs) as pool:
        for name, seconds, code in pool.map(lambda run: launch(out, *run, threads), todo):
            status = "done before" if seconds == 0 else f"{'ok' if code == 0 else f'FAILED ({code})'} in {seconds / 60:.1f} min"
            print(f"  {name}: {status}", flush=True)
            codes[name] = code
    return codes


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def start_end_change(curves: dict, steps: int) -> tuple[int, str, str, str]:
    """(seeds, start, end, change) as "mean +- sd" over the seeds' curves ({seed: {"step": value}})."""
    start = [curve["0"] for curve in curves.values()]
    end = [curve[str(steps)] for curve in curves.values()]
    change = [e - s for s, e in zip(start, end)]
    (s0, s0d), (s1, s1d), (dc, dcd) = mean_sd(start), mean_sd(end), mean_sd(change)
    return len(curves), f"{s0:.3f} +- {s0d:.3f}", f"{s1:.3f} +- {s1d:.3f}", f"{dc:+.3f} +- {dcd:.3f}"


def add_grid_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every grid shares: where its runs go, how many at a time, and where the
    report (docs/<name>_table.md or docs/<name>.md, given by the caller) and the curves
    (docs/<name>.json) are written."""
    parser.add_argument("--out", type=Path, default=Path("runs") / name, help="run configs, logs and TensorBoard runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each run")
    parser.add_argument("--report-only", action="store_true", help="only read the runs already made")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / f"{name}.json")


def write_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
