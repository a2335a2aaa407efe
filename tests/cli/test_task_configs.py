"""The per-task configs (configs/tasks/*.yaml): each parses through the real ``grape`` command,
trains the family its warm model was built for with that family's own verifier, and runs a few
GRPO steps from the shipped warm model. (configs/*.yaml are covered by test_configs.py and
test_cli.py; these live one folder down so that those tests' per-algorithm lists stay as they are.)"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from grape_lightning.data.tasks import TASKS
from tests.cli_runner import ROOT, grape_here, grape_in_process

TASK_CONFIGS = sorted((ROOT / "configs" / "tasks").glob("*.yaml"))


def test_there_is_a_config_for_each_new_family():
    assert {path.stem for path in TASK_CONFIGS} >= {"word_problem_grpo", "sort_grpo"}


def test_every_run_name_is_unique_across_all_configs():
    """``--ckpt_path last`` continues the latest run under runs/<name>: names must not collide."""
    paths = sorted((ROOT / "configs").glob("*.yaml")) + TASK_CONFIGS
    names = [yaml.safe_load(path.read_text())["trainer"]["logger"]["init_args"]["name"] for path in paths]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda path: path.stem)
def test_task_config_parses_and_rewards_its_own_task_from_its_warm_model(path, tmp_path, capsys):
    shutil.copy(path, tmp_path / path.name)
    code, out, err = grape_in_process("fit", "--config", path.name, "--print_config", capsys=capsys, cwd=tmp_path)
    assert code == 0, err[-3000:]
    config = yaml.safe_load(out)
    assert config["trainer"]["logger"]["init_args"]["name"] == path.stem
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    task_class = data["task"]["class_path"]
    (task_name,) = [name for name, cls in TASKS.items() if f"grape_lightning.data.tasks.{cls.__name__}" == task_class]
    assert model["policy"]["name_or_path"] == f"grape/tiny-{task_name}-sft"
    (reward,) = model["rewards"]
    assert reward["class_path"] == "grape_lightning.rewards.TaskVerifier"
    assert reward["init_args"]["task"]["class_path"] == task_class
    assert model["accuracy"] == f"{task_name}_verifier"


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda path: path.stem)
def test_grape_fit_runs_grpo_steps_from_the_warm_model(path, tmp_path):
    """Two optimizer steps on small rollout batches: the warm model is scored at step 0 and after,
    by the task's verifier, and the run checkpoints."""
    override = {
        "trainer": {"max_steps": 2, "val_check_interval": 2, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "callbacks": []},
        "checkpoint": {"every_n_train_steps": 2},
        "data": {"init_args": {"task": {"init_args": {"num_train": 32, "num_val": 8}}, "batch_size": 4,
                               "group_size": 4, "val_batch_size": 8}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    cli, output = grape_here("fit", "--config", str(path), "--config", "override.yaml", cwd=tmp_path)
    assert "initial policy: val/accuracy" in output
    assert 0.0 <= float(cli.trainer.callback_metrics["val/accuracy"]) <= 1.0
    checkpoint = tmp_path / "runs" / path.stem / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2


FAMILIES = {"word_problem": "WordProblemTask", "sort": "SortTask"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("config", ["sft", "dpo", "reward_model"])
def test_the_offline_algorithms_train_on_each_family_by_swapping_the_task(config, family, tmp_path):
    """SFT (demonstrations), DPO and the reward model (preference pairs) take a new family as they
    take addition: only the task (and a max_length that holds its longest prompt) changes."""
    override = {
        "trainer": {"max_steps": 1, "val_check_interval": 1, "limit_val_batches": 1, "enable_progress_bar": False,
                    "callbacks": []},
        "checkpoint": {"every_n_train_steps": 1},
        "data": {"init_args": {"max_length": 64, "batch_size": 4, "val_batch_size": 4, "task": {
            "class_path": f"grape_lightning.data.tasks.{FAMILIES[family]}", "init_args": {"num_train": 8, "num_val": 4}}}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    cli, output = grape_here("fit", "--config", str(ROOT / f"configs/{config}.yaml"), "--config", "override.yaml", cwd=tmp_path)
    assert type(cli.datamodule.task).__name__ == FAMILIES[family]
    assert config != "sft" or "; 0 truncated, 0 skipped" in output, output[-2000:]  # max_length holds every pair
    checkpoint = tmp_path / "runs" / config / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 1


def test_the_task_rubric_routes_each_family_to_its_category_and_checks_its_answers():
    """configs/rubrics/tasks.yaml: word problems to "math", sorting to "string"; the correct item
    gives the reference answer 1 and the preference pair's rejected answer 0."""
    from grape_lightning.data.tasks import SortTask, WordProblemTask
    from grape_lightning.rewards.rubric import load_rubric
    from grape_lightning.rewards.rubric_scorer import verifier_for

    rubric = load_rubric(ROOT / "configs/rubrics/tasks.yaml")
    for task, category in ((WordProblemTask(num_train=20, num_val=5), "math"), (SortTask(num_train=20, num_val=5), "string")):
        rows = task.preference_rows("train")
        assert {rubric.category_of(row["metadata"]) for row in rows} == {category}
        (correct,) = [item for item in rubric.categories[category] if item.name == "correct"]
        check = verifier_for(correct)
        metadata = [row["metadata"] for row in rows]
        assert check([""] * len(rows), [row["chosen"] for row in rows], metadata) == [1.0] * len(rows)
        assert check([""] * len(rows), [row["rejected"] for row in rows], metadata) == [0.0] * len(rows)
    (word,) = [item for item in rubric.categories["string"] if item.name == "lowercase_word"]
    assert verifier_for(word)(["", "", ""], ["abc", " abc\n", "a b"], [{}, {}, {}]) == [1.0, 1.0, 0.0]


def test_grape_runs_on_the_sort_family_with_the_task_rubric(tmp_path):
    """The command in configs/rubrics/tasks.yaml, for one step: no critic, the string category's items."""
    _, output = grape_here(
        "fit", "--config", str(ROOT / "configs/grape.yaml"), "--model.init_args.rubric", str(ROOT / "configs/rubrics/tasks.yaml"),
        "--model.init_args.critics", "{}", "--model.init_args.accuracy", "string/correct",
        "--model.init_args.sampling.max_new_tokens", "8", "--model.init_args.policy", '{"name_or_path": "grape/tiny-sort-sft"}',
        "--data.init_args.task", '{"class_path": "grape_lightning.data.tasks.SortTask", "init_args": {"num_train": 16, "num_val": 8}}',
        "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "8", "--trainer.max_steps", "1",
        "--trainer.val_check_interval", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path,
    )
    assert "string/correct" in output and "string/lowercase_word" in output and "initial policy: val/accuracy" in output
