"""scripts/learning_table.py: every (algorithm, family) override names the family's task, start
model, verifier and (for GRAPE) rubric; and on a two-step budget the script trains through the
real ``grape fit``, writes the table row and does not train a finished run again."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import learning_table  # noqa: E402

SHIPPED = {"word_problem": "configs/tasks/word_problem_grpo.yaml", "sort": "configs/tasks/sort_grpo.yaml"}


def _args(**kw):
    return argparse.Namespace(**{"steps": None, "val_every": None, "accelerator": "cpu", **kw})


@pytest.mark.parametrize("algorithm", learning_table.ALGORITHMS)
@pytest.mark.parametrize("family", list(learning_table.FAMILIES))
def test_every_override_names_the_family_task_model_and_reward(tmp_path, algorithm, family):
    base = yaml.safe_load(learning_table.base_config(algorithm).read_text())
    assert base["model"]["init_args"]["policy"]["name_or_path"] == "grape/tiny-addition-sft"  # what a new family replaces
    config = learning_table.run_config(tmp_path, algorithm, family, 3, _args())
    model = config["model"]["init_args"]
    assert config["seed_everything"] == 3 and model["seed"] == 3
    trainer = config["trainer"]
    assert trainer["enable_checkpointing"] is False and "max_steps" not in trainer  # each config's own budget
    assert trainer["logger"]["init_args"] == {"save_dir": str(tmp_path / "runs"), "name": f"{algorithm}-{family}-seed3", "version": 0}
    if family == "addition":
        assert "data" not in config and set(model) == {"seed"}  # the configs as they are
        return
    shipped = yaml.safe_load((ROOT / SHIPPED[family]).read_text())
    task = shipped["data"]["init_args"]["task"]
    assert config["data"]["init_args"]["task"] == task
    assert model["policy"] == shipped["model"]["init_args"]["policy"]
    assert model["sampling"]["max_new_tokens"] == shipped["model"]["init_args"]["sampling"]["max_new_tokens"]
    if algorithm == "grape":
        assert Path(model["rubric"]) == ROOT / "configs" / "rubrics" / "tasks.yaml" and model["critics"] == {}
        category = {"word_problem": "math", "sort": "string"}[family]
        rubric = yaml.safe_load(Path(model["rubric"]).read_text())
        assert model["accuracy"] == f"{category}/correct" and "correct" in [i["name"] for i in rubric["categories"][category]]
        assert "rewards" not in model
        return
    assert model["rewards"][0] == shipped["model"]["init_args"]["rewards"][0]  # the task's own verifier
    assert model["accuracy"] == shipped["model"]["init_args"]["accuracy"]
    if algorithm == "dapo":
        assert model["rewards"][1]["init_args"]["max_length"] == model["sampling"]["max_new_tokens"]
    else:
        assert len(model["rewards"]) == 1


def test_steps_and_val_every_override_every_config(tmp_path):
    config = learning_table.run_config(tmp_path, "ppo", "sort", 0, _args(steps=7, val_every=5, accelerator="gpu"))
    assert config["trainer"]["max_steps"] == 7 and config["trainer"]["val_check_interval"] == 5
    assert config["trainer"]["accelerator"] == "gpu"
    assert learning_table.max_steps("ppo", _args()) == 200 and learning_table.max_steps("ppo", _args(steps=7)) == 7


def test_the_script_trains_reports_and_resumes(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "learning_table.py"), "--out", str(tmp_path / "out"), "--seeds", "0",
        "--algorithms", "grpo", "--families", "sort", "--steps", "2", "--val-every", "2",
        "--report", str(tmp_path / "table.md"), "--results", str(tmp_path / "results.json"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "grpo-sort-seed0: ok" in first.stdout

    results = json.loads((tmp_path / "results.json").read_text())
    curve = results["curves"]["grpo"]["sort"]["0"]
    assert list(curve) == ["0", "2"] and curve["0"] == pytest.approx(0.425)  # grape/tiny-sort-sft's held-out start
    assert "| grpo | sort | 1 | 2 | 0.425 +- 0.000 |" in (tmp_path / "table.md").read_text()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "grpo-sort-seed0: done before" in again.stdout
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_a_sweep_runs_the_product_of_its_settings_where_the_config_has_them(tmp_path):
    args = _args(algorithms=["grpo", "trpo"], families=["sort"], seeds=[0], sweep=["lr=1e-4,2e-4", "group_size=8,16"])
    runs = learning_table.runs(args)
    assert [(a, s) for a, _, s, _ in runs] == [  # TRPO has no lr (its step is bounded by max_kl): left out
        ("grpo", (("lr", "1e-4"), ("group_size", "8"))), ("grpo", (("lr", "1e-4"), ("group_size", "16"))),
        ("grpo", (("lr", "2e-4"), ("group_size", "8"))), ("grpo", (("lr", "2e-4"), ("group_size", "16"))),
    ]
    setting = (("lr", "2e-4"), ("group_size", "16"), ("temperature", "0.7"), ("policy", "some/dir/wp800"))
    config = learning_table.run_config(tmp_path, "grpo", "word_problem", 1, _args(), setting)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert model["optimizer"]["lr"] == 2e-4 and data["group_size"] == 16 and model["sampling"]["temperature"] == 0.7
    assert model["sampling"]["max_new_tokens"] == 4  # the family's, kept beside the swept temperature
    assert model["policy"]["name_or_path"] == "some/dir/wp800" and data["task"]["class_path"].endswith("WordProblemTask")
    name = config["trainer"]["logger"]["init_args"]["name"]
    assert name == "grpo-word_problem-lr2e-4-group_size16-temperature0.7-policywp800-seed1"
    with pytest.raises(SystemExit, match="NAME=V1,V2"):
        learning_table.parse_sweep(["learning_rate=1e-4"])


def test_runs_made_elsewhere_merge_into_the_report_and_local_runs_win():
    elsewhere = {"seeds": [0, 1], "curves": {"grpo": {"sort": {"0": {"0": 0.4, "150": 0.6}, "1": {"0": 0.4, "150": 0.7}}},
                                            "ppo": {"sort": {"0": {"0": 0.4, "100": 0.5}}}}}
    here = {"seeds": [1, 2], "curves": {"grpo": {"sort": {"1": {"0": 0.4, "150": 0.5}, "2": {"0": 0.4, "150": 0.8}}}}}
    results = learning_table.merged(elsewhere, here)
    assert results["seeds"] == [0, 1, 2]
    assert results["curves"]["grpo"]["sort"] == {"0": {"0": 0.4, "150": 0.6}, "1": {"0": 0.4, "150": 0.5}, "2": {"0": 0.4, "150": 0.8}}
    assert results["curves"]["ppo"]["sort"] == {"0": {"0": 0.4, "100": 0.5}}
    rows = learning_table.change_table(results).splitlines()
    assert rows[0] == "| algorithm | sort |"
    assert rows[2] == "| grpo | +0.233 +- 0.153 |" and rows[3] == "| ppo | +0.100 +- 0.000 |"


def test_a_sweep_trains_each_setting_and_merges_runs_made_elsewhere(tmp_path):
    """The sweep through the real script: one run per setting, named by it, with its value in the
    run's config; a results file from another machine fills the report beside it."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(json.dumps({"seeds": [1], "curves": {"grpo temperature=0.7": {"sort": {"1": {"0": 0.425, "2": 0.5}}}}}))
    command = [
        sys.executable, str(ROOT / "scripts" / "learning_table.py"), "--out", str(tmp_path / "out"), "--seeds", "0",
        "--algorithms", "grpo", "--families", "sort", "--steps", "2", "--val-every", "2", "--sweep", "temperature=0.7,1.0",
        "--include", str(elsewhere), "--report", str(tmp_path / "sweep.md"), "--results", str(tmp_path / "sweep.json"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for temperature in ("0.7", "1.0"):
        assert f"grpo-sort-temperature{temperature}-seed0: ok" in done.stdout
        config = json.loads((tmp_path / "out" / "configs" / f"grpo-sort-temperature{temperature}-seed0.yaml").read_text())
        assert config["model"]["init_args"]["sampling"] == {"max_new_tokens": 8, "temperature": float(temperature)}
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert results["seeds"] == [0, 1]
    assert set(results["curves"]["grpo temperature=0.7"]["sort"]) == {"0", "1"}  # this machine's seed 0 and the other's seed 1
    assert set(results["curves"]["grpo temperature=1.0"]["sort"]) == {"0"}
    report = (tmp_path / "sweep.md").read_text()
    assert report.startswith("# Sensitivity sweep") and f"`{elsewhere}` (made on another machine)" in report
    assert "| grpo temperature=0.7 | sort | 2 | 2 | 0.425 +- 0.000 |" in report
