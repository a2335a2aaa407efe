"""scripts/grape_vs_grpo.py as documented, on a two-step budget: it trains through the real
``grape fit``, keeps the verifier out of the reward, reads the held-out accuracy back from the
logs, and does not train a finished run again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import grape_vs_grpo  # noqa: E402


def test_every_critic_meets_every_arm_and_the_verifier_arm_asks_no_critic():
    runs = grape_vs_grpo.runs(list(grape_vs_grpo.CRITICS), list(grape_vs_grpo.ARMS), [0, 1, 2])
    assert len(runs) == 3 + 3 * 3 * 3 and len(set(runs)) == len(runs)
    judged, verified = grape_vs_grpo.JUDGED_RUBRIC["categories"]["math"], grape_vs_grpo.VERIFIED_RUBRIC["categories"]["math"]
    assert [(i["name"], i["weight"]) for i in judged if i["kind"] == "verifiable"] == [("verified", 0.0)]  # held back
    assert {i["weight"] for i in judged if i["kind"] == "judged"} == {1.0}  # the equal-weight mean is the plain mean
    assert verified == [dict(grape_vs_grpo.VERIFIED, weight=1.0)]


def test_the_script_trains_reports_and_resumes(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "grape_vs_grpo.py"), "--out", str(tmp_path / "out"), "--seeds", "0",
        "--critics", "wrong", "--arms", "grape_reliability", "--steps", "2", "--val-every", "2",
        "--report", str(tmp_path / "table.md"), "--results", str(tmp_path / "results.json"), "--plot", str(tmp_path / "plot.png"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "wrong-grape_reliability-seed0: ok" in first.stdout

    config = json.loads((tmp_path / "out" / "configs" / "wrong-grape_reliability-seed0.yaml").read_text())
    model = config["model"]["init_args"]
    assert model["weighting"] == {"mode": "reliability", "momentum": 0.9} and model["accuracy"] == "math/verified"
    assert model["critics"]["judge"]["init_args"] == {
        "critic": grape_vs_grpo.SHIPPED_CRITIC, "mode": "invert", "rate": 1.0, "items": ["correct"],
    }
    results = json.loads((tmp_path / "results.json").read_text())
    curve = results["curves"]["wrong/grape_reliability"]["0"]
    assert list(curve) == ["0", "2"] and curve["0"] == pytest.approx(0.48)  # the shipped start, on the 200 held-out prompts
    assert "| wrong | GRAPE (reliability) | 1 | 0.480 +- 0.000 |" in (tmp_path / "table.md").read_text()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "wrong-grape_reliability-seed0: done before" in again.stdout
    assert json.loads((tmp_path / "results.json").read_text()) == results
