"""Discoverability of the ``grape`` command: every subcommand is listed, every init argument of
every registered class has a help line, and a misspelled key is reported in one short message."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import typing
from pathlib import Path

import lightning as L
import pytest
import yaml
from jsonargparse import ArgumentParser

import grape_lightning
from grape_lightning.data.tasks.base import Task
from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.critics.base import Critic
from tests.cli_runner import ROOT, grape_in_process, run_grape

for _module in pkgutil.walk_packages(grape_lightning.__path__, "grape_lightning."):
    importlib.import_module(_module.name)

BASES = (L.LightningModule, L.LightningDataModule, RewardFunction, Critic, L.Callback, Task)


def _subclasses(base: type) -> set[type]:
    found, todo = set(), [base]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("grape_lightning.") and not inspect.isabstract(sub):
                found.add(sub)
    return found


def _config_dataclasses(classes: set[type]) -> set[type]:
    """The grape_lightning dataclasses that appear (nested in Optional, lists, ...) in the init
    signatures of ``classes`` and of those dataclasses themselves."""
    found: set[type] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # noqa: BLE001 (a hint that does not resolve is not ours to check here)
            continue
        stack = list(hints.values())
        while stack:
            hint = stack.pop()
            stack.extend(typing.get_args(hint))
            if dataclasses.is_dataclass(hint) and hint.__module__.startswith("grape_lightning.") and hint not in found:
                found.add(hint)
                todo.append(hint)
    return found


REGISTERED = set().union(*(_subclasses(base) for base in BASES))
CLASSES = sorted(REGISTERED | _config_dataclasses(REGISTERED), key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def test_every_kind_of_class_is_walked():
    names = {cls.__name__ for cls in CLASSES}
    assert {"GRPOModule", "RolloutDataModule", "NumericMatch", "OpenAICompatibleCritic", "SampleTable",
            "ArithmeticTask", "ModelSpec", "SamplingParams", "OptimizerConfig", "LoRAConfig", "OffPolicyConfig"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_init_argument_has_help(cls):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x", sub_configs=True, fail_untyped=False)
    arguments = [action for action in parser._actions if action.dest.startswith("x.") and not action.dest.endswith(".help")]
    parameters = [name for name in inspect.signature(cls).parameters if name not in ("args", "kwargs")]
    assert {name for name in parameters} <= {action.dest[2:].split(".")[0] for action in arguments}, "not every parameter was added"
    missing = [action.dest[2:] for action in arguments if not (action.help or "").strip()]
    assert not missing, f"{cls.__module__}.{cls.__name__}: no help for {missing} (add them to the docstring's Args: section)"


def test_grape_help_lists_every_subcommand(tmp_path, capsys):
    out = run_grape("--help", cwd=tmp_path).stdout  # the console command itself, once
    listed = out.split("Available subcommands:", 1)[1]
    for subcommand in ("fit", "validate", "test", "predict", "export", "rubric-report"):
        assert f"\n    {subcommand} " in listed, subcommand
    code, out, _ = grape_in_process("export", "--help", capsys=capsys)
    assert code == 0 and "--output_dir" in out
    code, out, _ = grape_in_process("rubric-report", "--help", capsys=capsys)
    assert code == 0 and all(option in out for option in ("--out", "--last", "--min-spread", "--min-confidence", "--rubric"))


def test_fit_help_and_print_config_show_argument_help(capsys):
    code, help_text, _ = grape_in_process("fit", "--model.help", "grape_lightning.algorithms.GRPOModule", capsys=capsys)
    assert code == 0 and "clip range, KL penalty and token aggregation" in help_text and "--model.update" in help_text
    code, printed, _ = grape_in_process("fit", "--config", str(ROOT / "configs/grpo.yaml"), "--print_config=comments", capsys=capsys)
    assert code == 0
    assert "# responses sampled per prompt (G)" in printed  # RolloutDataModule.group_size
    assert "# hub id or local directory of a pretrained model" in printed  # ModelSpec.name_or_path
    assert "# upper clip range" in printed and "# passes over each rollout batch" in printed  # SurrogateConfig, UpdateConfig
    assert yaml.safe_load(printed)["model"]["init_args"]["loss"]["eps_high"] == 0.2


def _typo(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "configs/grpo.yaml").read_text()
    assert old in text
    path = tmp_path / "my_grpo.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize("old, new, key, hint", [
    ("  val_check_interval:", "  val_chek_interval:", "trainer.val_chek_interval", "did you mean 'trainer.val_check_interval'?"),
    ("      beta: 0.0", "      betta: 0.0", "model.init_args.loss.betta", "SurrogateConfig has no parameter 'betta'; did you mean 'beta'?"),
    ("  accuracy:", "  acuracy:", "model.init_args.acuracy", "GRPOModule has no parameter 'acuracy'; did you mean 'accuracy'?"),
    ("max_new_tokens: 6", "max_new_tokenz: 6", "model.init_args.sampling.max_new_tokenz", "did you mean 'max_new_tokens'?"),
    ("num_train: 3000", "num_trian: 3000", "data.init_args.task.init_args.num_trian", "did you mean 'num_train'?"),
])
def test_a_misspelled_yaml_key_names_the_file_and_the_key(tmp_path, capsys, old, new, key, hint):
    config = _typo(tmp_path, old, new)
    code, _, err = grape_in_process("fit", "--config", config.name, capsys=capsys, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"error: my_grpo.yaml: unknown key '{key}' (") and lines[0].endswith(f"{hint})")
    assert len(lines) <= 3 and "usage:" not in err


def test_a_misspelled_command_line_key_says_so(capsys):
    code, _, err = grape_in_process("fit", "--config", str(ROOT / "configs/grpo.yaml"), "--model.init_args.sed", "3", capsys=capsys)
    assert code == 2
    assert err.startswith("error: command line: unknown key 'sed' (GRPOModule has no parameter 'sed'; did you mean 'seed'?)")
    assert "usage:" not in err
