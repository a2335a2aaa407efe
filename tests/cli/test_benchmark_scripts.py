"""The benchmark scripts run as documented (a CPU smoke run on the tiny shape; on a GPU they time
the real shapes): every implementation of ours reports a row, padded and padding-free variable-
length SFT see the same real tokens, and each on-policy algorithm reports its step phases."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, script, *arguments):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *arguments], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_training_benchmark_variable_lengths(tmp_path):
    _run(tmp_path, "bench_training.py", "--shape", "tiny", "--seq", "256", "--min-response", "20", "--sft-batch", "4",
         "--kinds", "sft", "--lengths", "variable", "--steps", "2", "--warmup", "1", "--only", "ours-padded", "ours-padding-free")
    report = json.loads((tmp_path / "training_variable.json").read_text())
    rows = {row["impl"]: row for row in report["rows"]}
    assert set(rows) == {"ours-padded", "ours-padding-free"}
    assert all(row["tokens_per_s"] > 0 and row["steps_timed"] == 2 for row in rows.values())


def test_on_policy_benchmark_reports_each_algorithm(tmp_path):
    _run(tmp_path, "bench_grpo.py", "--shape", "tiny", "--prompts", "2", "--group", "2", "--prompt", "8", "--new", "4",
         "--micro-batch", "2", "--steps", "1", "--warmup", "1", "--algorithms", "grpo", "dapo", "grape", "ppo", "gspo",
         "cispo", "distill")
    rows = json.loads((tmp_path / "grpo_step.json").read_text())["rows"]
    assert [row["impl"] for row in rows] == [
        "ours-grpo", "ours-dapo", "ours-grape", "ours-ppo", "ours-gspo", "ours-cispo", "ours-distill",
    ]
    for row in rows:
        assert row["step_s"] >= row["generation_s"] + row["update_s"] > 0
    dapo = rows[1]
    assert 1 <= dapo["rounds"] <= 4 and dapo["prompts_generated"] >= 2  # the loader's 2 prompts, and fresh ones per extra round


def test_on_policy_benchmark_runs_reinforce_pp_and_rloo_with_the_mismatch_correction(tmp_path):
    """Their KL keeps pi_old's log-probs recomputed, so each row reports the mismatch it measured."""
    _run(tmp_path, "bench_grpo.py", "--shape", "tiny", "--prompts", "2", "--group", "2", "--prompt", "8", "--new", "4",
         "--micro-batch", "2", "--steps", "1", "--warmup", "1", "--algorithms", "reinforce_pp", "rloo", "--mismatch", "tis")
    report = json.loads((tmp_path / "grpo_step.json").read_text())
    assert [row["impl"] for row in report["rows"]] == ["ours-reinforce_pp", "ours-rloo"]
    for row in report["rows"]:
        assert row["step_s"] >= row["generation_s"] + row["update_s"] > 0
        assert row["mismatch_kl"] >= 0 and row["mismatch_ratio_max"] > 0 and 0 <= row["mismatch_corrected"] <= 1
