"""Every shipped config parses through the real ``grape`` command (in-process, nothing trains) on top
of the trainer base (grape_lightning/base_config.yaml), from any directory; stacking configs
replaces or appends lists as the README says without losing the checkpoint; and the DataModule's
tokenizer is linked to the trained model's spec."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.cli import BASE_CONFIG, cli_main
from grape_lightning.models.spec import trained_model_spec
from tests.cli_runner import ROOT, grape_in_process

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BASE = yaml.safe_load(BASE_CONFIG.read_text())


def _classes(callbacks: list[dict]) -> list[str]:
    return [callback["class_path"] for callback in callbacks]


def _print_config(capsys, *args: str, cwd: Path) -> dict:
    code, out, err = grape_in_process("fit", *args, "--print_config", capsys=capsys, cwd=cwd)
    assert code == 0, err[-3000:]
    return yaml.safe_load(out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_parses_copied_elsewhere_with_the_trainer_base(path, tmp_path, capsys):
    """The config alone, copied to another directory (the base comes with the package): its own
    keys over the base's, the base's callbacks first and the config's appended, its own run name."""
    shutil.copy(path, tmp_path / path.name)
    config = _print_config(capsys, "--config", path.name, cwd=tmp_path)
    own = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"] == own["model"]["class_path"]
    assert config["data"]["class_path"] == own["data"]["class_path"]
    assert config["seed_everything"] == BASE["seed_everything"] == 0
    for key, value in BASE["trainer"].items():
        if key not in ("logger", "callbacks"):
            assert config["trainer"][key] == own["trainer"].get(key, value), key
    assert config["trainer"]["max_steps"] == own["trainer"]["max_steps"]
    assert config["trainer"]["val_check_interval"] == own["trainer"]["val_check_interval"]
    logger = config["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.TensorBoardLogger"
    assert logger["init_args"]["save_dir"] == "runs" and logger["init_args"]["name"] == path.stem  # runs/<algo>
    callbacks = _classes(config["trainer"]["callbacks"])
    assert callbacks == _classes(BASE["trainer"]["callbacks"]) + _classes(own["trainer"].get("callbacks+", []))
    assert "grape_lightning.callbacks.RunSummary" in callbacks and "grape_lightning.callbacks.HFExport" in callbacks
    checkpoint = config["checkpoint"]
    assert checkpoint["save_last"] is True
    assert checkpoint["every_n_train_steps"] == own.get("checkpoint", BASE["checkpoint"])["every_n_train_steps"]


def test_every_config_names_its_own_run():
    """``--ckpt_path last`` continues the latest run under runs/<name>: two configs sharing a
    name would continue each other's runs."""
    names = [yaml.safe_load(path.read_text())["trainer"]["logger"]["init_args"]["name"] for path in CONFIGS]
    assert len(set(names)) == len(names) == len(CONFIGS)


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return path.name


@pytest.fixture
def instantiate(monkeypatch, tmp_path):
    """``grape fit ARGS`` in-process up to the call of ``Trainer.fit`` (the model, the DataModule
    and the Trainer built as for a run; nothing trains); returns the CLI object."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(L.Trainer, "fit", lambda self, *args, **kwargs: None)

    def run(*args: str):
        return cli_main(["fit", *args])

    return run


def _checkpoints(trainer: L.Trainer) -> list[ModelCheckpoint]:
    return [callback for callback in trainer.callbacks if isinstance(callback, ModelCheckpoint)]


def test_a_stacked_callbacks_list_replaces_the_base_list_and_the_checkpoint_stays(instantiate, tmp_path, capsys):
    """Lists are replaced, not merged: a later ``trainer.callbacks`` drops the base's and the
    algorithm's callbacks. The checkpoint is a section of its own and stays, with save_last."""
    mine = _write(tmp_path / "mine.yaml", {"trainer": {"callbacks": [
        {"class_path": "grape_lightning.callbacks.SampleTable", "init_args": {"every_n_steps": 7}}]}})
    grpo = str(ROOT / "configs/grpo.yaml")
    config = _print_config(capsys, "--config", grpo, "--config", mine, cwd=tmp_path)
    assert _classes(config["trainer"]["callbacks"]) == ["grape_lightning.callbacks.SampleTable"]
    cli = instantiate("--config", grpo, "--config", mine)
    names = {type(callback).__name__ for callback in cli.trainer.callbacks}
    assert "SampleTable" in names and not {"LearningRateMonitor", "HFExport", "RunSummary"} & names
    (checkpoint,) = _checkpoints(cli.trainer)
    assert checkpoint.save_last is True and checkpoint._every_n_train_steps == 50
    assert cli.trainer.logger.log_dir == str(Path("runs") / "grpo" / "version_0")


def test_appending_keeps_the_list_and_a_checkpoint_in_the_list_replaces_the_section(instantiate, tmp_path, capsys):
    mine = _write(tmp_path / "mine.yaml", {"trainer": {"callbacks+": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 3}}]}})
    sft = str(ROOT / "configs/sft.yaml")
    config = _print_config(capsys, "--config", sft, "--config", mine, cwd=tmp_path)
    own = yaml.safe_load((ROOT / "configs/sft.yaml").read_text())["trainer"]["callbacks+"]
    expected = _classes(BASE["trainer"]["callbacks"]) + _classes(own) + ["lightning.pytorch.callbacks.ModelCheckpoint"]
    assert _classes(config["trainer"]["callbacks"]) == expected
    (checkpoint,) = _checkpoints(instantiate("--config", sft, "--config", mine).trainer)
    assert checkpoint._every_n_train_steps == 3 and not checkpoint.save_last


def test_checkpointing_turned_off_takes_the_checkpoint_away(instantiate):
    cli = instantiate("--config", str(ROOT / "configs/dpo.yaml"), "--trainer.enable_checkpointing", "false")
    assert not _checkpoints(cli.trainer)


def test_the_datamodule_tokenizer_follows_the_trained_model(instantiate):
    """The link: the spec's tokenizer (a model built from config), its name_or_path (a pretrained
    model, also when one flag replaces the model), a reward model's ``model`` spec, and the
    spec's chat-template choice. The module's own tokenizer object is used, not a second load."""
    sft = instantiate("--config", str(ROOT / "configs/sft.yaml"))
    assert (sft.datamodule.tokenizer_name, sft.datamodule.chat_template_choice) == ("grape/char", None)
    switched = instantiate("--config", str(ROOT / "configs/sft.yaml"), "--model.init_args.policy",
                           '{"name_or_path": "grape/tiny-addition-sft", "chat_template": false}')
    assert (switched.datamodule.tokenizer_name, switched.datamodule.chat_template_choice) == ("grape/tiny-addition-sft", False)
    reward = instantiate("--config", str(ROOT / "configs/reward_model.yaml"))
    assert reward.datamodule.tokenizer_name == "grape/tiny-addition-sft"
    for cli in (sft, switched, reward):
        cli.datamodule.trainer = cli.trainer
        cli.trainer.strategy.connect(cli.model)
        assert cli.datamodule.tokenizer is cli.model.tokenizer
        assert cli.datamodule.tokenizer_name == trained_model_spec(cli.model.hparams).tokenizer_name
    assert switched.datamodule.chat_template is False


def test_the_link_overrides_a_tokenizer_given_to_the_data(instantiate):
    cli = instantiate("--config", str(ROOT / "configs/grpo.yaml"), "--data.init_args.tokenizer", "gpt2")
    assert cli.datamodule.tokenizer_name == "grape/tiny-addition-sft"


def test_a_datamodule_named_another_tokenizer_loads_it():
    """Without the command (Python API): a name other than the trained module's is loaded."""
    from grape_lightning.data import SFTDataModule
    from grape_lightning.data.tasks import ArithmeticTask

    data = SFTDataModule(task=ArithmeticTask(num_train=4, num_val=2), tokenizer="grape/tiny-addition-sft")
    assert data.tokenizer.vocab_size == 100 and data.chat_template is False


def test_reinforce_pp_and_rloo_are_reinforce_configured(instantiate):
    """The named configurations of REINFORCEModule: REINFORCE++ (per-token KL reward-to-go, no
    group baseline, advantages whitened over the global batch's tokens) and RLOO (leave-one-out
    baseline, the sequence's KL subtracted from its reward); both keep a reference."""
    from grape_lightning.algorithms import REINFORCEModule

    pp = instantiate("--config", str(ROOT / "configs/reinforce_pp.yaml")).model
    rloo = instantiate("--config", str(ROOT / "configs/rloo.yaml")).model
    assert isinstance(pp, REINFORCEModule) and isinstance(rloo, REINFORCEModule)
    assert (pp.kl_reward, pp.advantage.baseline, pp.advantage.scaling) == ("token", "none", "whiten")
    assert (rloo.kl_reward, rloo.advantage.baseline, rloo.advantage.scaling) == ("sequence", "leave_one_out", "none")
    assert pp.kl_coef > 0 and rloo.kl_coef > 0 and pp.reference is not None and rloo.reference is not None


@pytest.mark.parametrize("config", ["grpo", "gspo", "cispo", "reinforce"])
def test_the_mismatch_correction_is_one_flag_away(instantiate, config):
    """``--model.init_args.mismatch.mode tis`` on a shipped config: the module corrects, and
    recomputes pi_old's log-probs even where it would read them off its own pass."""
    plain = instantiate("--config", str(ROOT / f"configs/{config}.yaml")).model
    cli = instantiate(
        "--config", str(ROOT / f"configs/{config}.yaml"), "--model.init_args.mismatch.mode", "tis", "--model.init_args.mismatch.cap", "3.0",
    )
    assert (cli.model.mismatch.mode, cli.model.mismatch.cap) == ("tis", 3.0) and cli.model.needs_old_logprobs
    assert plain.mismatch.mode == "none"
    with pytest.raises(SystemExit):
        instantiate("--config", str(ROOT / f"configs/{config}.yaml"), "--model.init_args.mismatch.mode", "truncate")


def test_the_distillation_config_links_the_data_to_the_student_and_keeps_the_teacher_a_spec(instantiate):
    """The DataModule tokenizes for the student; the teacher is a second model spec (its source
    replaced by one flag like the policy's) that the module loads only when fit starts."""
    cli = instantiate("--config", str(ROOT / "configs/distill.yaml"))
    assert cli.datamodule.tokenizer_name == "grape/tiny-addition-student"
    assert cli.model.teacher_spec.name_or_path == "grape/tiny-addition-sft" and cli.model.teacher is None
    assert cli.model.hparams["teacher"]["name_or_path"] == "grape/tiny-addition-sft"
    switched = instantiate("--config", str(ROOT / "configs/distill.yaml"), "--model.init_args.teacher",
                           '{"config": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4}, '
                           '"tokenizer": "grape/char"}')
    assert switched.model.teacher_spec.name_or_path is None and switched.model.teacher_spec.config["hidden_size"] == 32


def test_the_grape_config_judges_with_the_shipped_critic_on_the_questions_it_was_trained_on(instantiate):
    """configs/grape.yaml: every judged item of its rubric goes to LocalLMCritic with
    grape/tiny-addition-critic, and asks, word for word, a question the critic was trained and
    reported on (docs/critic_report.json, written by scripts/make_tiny_critic_model.py)."""
    import json

    from grape_lightning.rewards.critics import LocalLMCritic

    rubric = str(ROOT / "configs/rubrics/arithmetic.yaml")
    cli = instantiate("--config", str(ROOT / "configs/grape.yaml"), "--model.init_args.rubric", rubric)
    scorer = cli.model.collector.scorer.items  # the RubricScorer inside the confidence weighting
    (critic,) = scorer.critics.values()
    assert isinstance(critic, LocalLMCritic) and critic.model_name == "grape/tiny-addition-critic"
    judged = [item for _, item in scorer.columns if item.kind == "judged"]
    assert len(judged) >= 2 and all(scorer.critics[item.params["critic"]] is critic for item in judged)
    trained = {row["question"] for row in json.loads((ROOT / "docs/critic_report.json").read_text())["held_out"].values()}
    assert {item.params["question"] for item in judged} <= trained
    assert [item.kind for _, item in scorer.columns].count("verifiable") == 1
