"""The ``grape`` command: LightningCLI over every algorithm and DataModule, plus ``grape export``
and ``grape rubric-report``.

    grape fit --config configs/sft.yaml
    grape fit --config configs/sft.yaml --trainer.max_steps 50 --print_config
    grape fit --config configs/sft.yaml --ckpt_path last     # continue the latest run of this config
    grape export --ckpt_path runs/sft/version_0/checkpoints/last.ckpt --output_dir exported/
    grape rubric-report runs/grape/version_0                 # a GRAPE run's rubric items, suggested weights

Every subcommand first applies ``grape_lightning/base_config.yaml`` (the trainer settings all the
shipped configs share: logger, checkpoint, callbacks), then each ``--config`` in order: a mapping
merges key by key, a list (``trainer.callbacks``) is replaced, ``callbacks+:`` appends to it.
The run's ``ModelCheckpoint`` is the ``checkpoint`` section, so replacing the callbacks list keeps
it. The DataModule's ``tokenizer`` and ``chat_template`` are linked to the trained model's spec.

Code of your own (a reward function in ``my_rewards.py``) is found by class path when its file
sits beside a ``--config`` file or in the current directory: both are put on ``sys.path``, as
Python does for the directory of a script.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

import grape_lightning.algorithms  # noqa: F401  (registers the modules for class_path lookup)
import grape_lightning.callbacks  # noqa: F401
from grape_lightning.callbacks import CompleteLogs, StepProgressBar
from grape_lightning.callbacks.interrupt_checkpoint import CheckpointOnInterrupt, interrupt_exit_status
from grape_lightning.callbacks.learning_guard import StopWhenNotLearning
from grape_lightning.callbacks.working_directory import RecordWorkingDirectory, training_working_directory
from grape_lightning.checkpointing import AtomicCheckpointIO, newest_intact_sibling, unreadable_checkpoint_error
from grape_lightning.cli_errors import explain
import grape_lightning.data  # noqa: F401
import grape_lightning.rewards  # noqa: F401
import grape_lightning.rewards.critics  # noqa: F401
import grape_lightning.rollout  # noqa: F401
from grape_lightning.model_source_args import replace_model_sources
from grape_lightning.models.spec import ModelSpec, trained_model_spec
from grape_lightning.resume import continue_run
from grape_lightning.rubric_report import RUBRIC_REPORT_HELP, rubric_report_main


EXPORT_HELP = "Write the policy of a checkpoint in Hugging Face format."
BASE_CONFIG = Path(__file__).resolve().parent / "base_config.yaml"
"""Trainer settings every config shares, applied before the first ``--config``."""


class GrapeCLI(LightningCLI):
    """LightningCLI with the model and the data chosen by ``class_path`` in the YAML; ``fit`` with a
    ``ckpt_path`` continues the run it came from (:mod:`grape_lightning.resume`)."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads an explicit ckpt_path's hyper-parameters before anything else: a torn
        # file must be reported there by name, with the intact checkpoint beside it.
        try:
            super()._parse_ckpt_path()
        except Exception as error:
            path = Path(self.config[self.config.subcommand].get("ckpt_path"))
            intact = newest_intact_sibling(path)
            raise unreadable_checkpoint_error(path, error, None if intact is None else intact[0]) from error

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit":
            config = self.config["fit"]
            continue_run(config.trainer, config.get("ckpt_path"))

    def before_fit(self) -> None:
        if not any(isinstance(callback, StopWhenNotLearning) for callback in self.trainer.callbacks):
            self.trainer.callbacks.append(StopWhenNotLearning())
        checkpoint_io = getattr(self.trainer.strategy, "checkpoint_io", None)
        if isinstance(checkpoint_io, AtomicCheckpointIO) and self.config_init["fit"].get("ckpt_path") == "last":
            checkpoint_io.fall_back_to_intact = True

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # ``grape export`` and ``grape rubric-report`` are dispatched before LightningCLI parses
        # (cli_main); registering parsers for them here only lists them beside fit/validate/test/predict
        # in ``grape --help``.
        assert parser._subcommands_action is not None
        parser._subcommands_action.add_subcommand("export", LightningArgumentParser(description=EXPORT_HELP), help=EXPORT_HELP)
        parser._subcommands_action.add_subcommand(
            "rubric-report", LightningArgumentParser(description=RUBRIC_REPORT_HELP), help=RUBRIC_REPORT_HELP
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The run's checkpoint is a section of its own rather than an item of trainer.callbacks: a
        # later config's list replaces the earlier one as a whole, and must not take it away unseen.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # The trained model's spec (``policy``; ``model`` of a reward model) also sets the DataModule's
        # tokenizer and chat-template choice, so the data is encoded as the model reads it. Linked on
        # parse, as names: RolloutDataModule's ``tokenizer`` is typed ``str``, and jsonargparse checks
        # a linked value (a spec or a loaded tokenizer is refused there, on parse and on instantiation).
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=trained_tokenizer, apply_on="parse")
        parser.link_arguments("model", "data.init_args.chat_template", compute_fn=trained_chat_template, apply_on="parse")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        # The ``checkpoint`` section's ModelCheckpoint, unless trainer.callbacks brings its own or
        # checkpointing is off (Lightning refuses a ModelCheckpoint then).
        if config.get("enable_checkpointing") is False or any(isinstance(c, ModelCheckpoint) for c in given):
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        # The grape progress bar (optimizer steps of max_steps, reward or loss, KL) unless the config
        # brings its own or turns bars off; complete logs (last step's metrics, no hp_metric) always.
        configured = [*given, *callbacks]
        added: list[L.Callback] = [] if any(isinstance(c, CompleteLogs) for c in configured) else [CompleteLogs()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in configured):
            added.append(StepProgressBar())
        return super()._instantiate_trainer(config, [*callbacks, *added])

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """A parse error ends the command with one short message (for an unknown key: the file
        holding it and the nearest accepted name), not the parser's usage text."""
        for each in (parser, *self._subcommand_parsers.values()):
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            argv = list(sys.argv[1:] if args is None else args)
            subcommand = next((arg for arg in argv if arg in self._subcommand_parsers), None)
            options = [action.dest for action in self._subcommand_parsers[subcommand]._actions] if subcommand else []
            print(f"error: {explain(str(error), argv, options)}", file=sys.stderr)
            command = f"grape {subcommand} --help" if subcommand else "grape --help"
            print(f"Run '{command}' for the accepted options.", file=sys.stderr)
            raise SystemExit(2) from None


def _trained_spec(model: Namespace) -> ModelSpec | None:
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    return trained_model_spec(init_args.as_dict()) if isinstance(init_args, Namespace) else None


def trained_tokenizer(model: Namespace) -> str | None:
    """The tokenizer of the trained model of the parsed ``model`` section (its spec's ``tokenizer``,
    else its ``name_or_path``); None for a module without a :class:`ModelSpec`."""
    spec = _trained_spec(model)
    return None if spec is None else spec.tokenizer_name


def trained_chat_template(model: Namespace) -> bool | None:
    """The chat-template choice of the trained model's spec (None: the tokenizer's template if it
    has one)."""
    spec = _trained_spec(model)
    return None if spec is None else spec.chat_template


def add_config_directories_to_path(argv: Sequence[str]) -> list[str]:
    """Put the current directory and the directory of every ``--config`` file first on ``sys.path``,
    so ``class_path: my_rewards.MyReward`` finds ``my_rewards.py`` beside the config; returns the
    config files' directories (checkpoints record them for ``grape export``)."""
    directories = [os.getcwd()]
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            directories.append(str(Path(argv[index + 1]).resolve().parent))
        elif arg.startswith("--config="):
            directories.append(str(Path(arg.partition("=")[2]).resolve().parent))
    for directory in reversed(directories):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    return directories[1:]


def export_main(argv: Sequence[str]) -> str:
    """``grape export``: a Lightning checkpoint to a Hugging Face directory."""
    from grape_lightning.callbacks.hf_export import export_atomically

    parser = argparse.ArgumentParser(prog="grape export", description=EXPORT_HELP)
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by 'grape fit'")
    parser.add_argument("--output_dir", required=True, help="directory for save_pretrained (replaced atomically)")
    options = parser.parse_args(list(argv))
    checkpoint = Path(options.ckpt_path).resolve()
    output_dir = Path(options.output_dir).resolve()
    # Relative paths in the run's config (a GRAPE rubric, say) meant the directory training ran in.
    with training_working_directory(checkpoint):
        module = L.LightningModule.load_from_checkpoint(checkpoint, map_location="cpu")
    directory = export_atomically(module, output_dir)
    print(f"exported {type(module).__name__} policy to {directory}")
    return str(directory)


def cli_main(args: Sequence[str] | None = None) -> GrapeCLI | str:
    """Entry point of the console script; ``args`` lets tests drive the real CLI in-process."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["rubric-report"]:
        return rubric_report_main(argv[1:])
    config_directories = add_config_directories_to_path(argv)
    argv = replace_model_sources(argv)
    if args is None:
        sys.argv[1:] = argv  # also what a multi-process launcher re-runs (the rewrite is idempotent)
    return GrapeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={subcommand: {"default_config_files": [str(BASE_CONFIG)]} for subcommand in GrapeCLI.subcommands()},
        trainer_defaults={
            "plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}],
            "callbacks": [CheckpointOnInterrupt(), RecordWorkingDirectory(config_directories)],
        },
        args=None if args is None else argv,
    )


def main() -> None:
    """Console script ``grape``: exit status 0 when the command finished, 128 + the signal number
    when SIGTERM or Ctrl-C stopped training (after writing a checkpoint), 1 on an error."""
    try:
        cli_main()
    except SIGTERMException:
        sys.exit(interrupt_exit_status())


if __name__ == "__main__":
    main()
