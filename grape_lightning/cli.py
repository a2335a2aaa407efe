"""The ``grape`` command: LightningCLI over every algorithm and DataModule, plus ``grape export``.

    grape fit --config configs/sft.yaml
    grape fit --config configs/sft.yaml --trainer.max_steps 50 --print_config
    grape export --ckpt_path runs/sft/version_0/checkpoints/last.ckpt --output_dir exported/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import grape_lightning.algorithms  # noqa: F401  (registers the modules for class_path lookup)
from grape_lightning.callbacks import CompleteLogs, StepProgressBar
from grape_lightning.checkpointing import AtomicCheckpointIO
from grape_lightning.cli_errors import explain
import grape_lightning.callbacks  # noqa: F401
import grape_lightning.data  # noqa: F401
import grape_lightning.rewards  # noqa: F401
import grape_lightning.rewards.critics  # noqa: F401
import grape_lightning.rollout  # noqa: F401


EXPORT_HELP = "Write the policy of a checkpoint in Hugging Face format."


class GrapeCLI(LightningCLI):
    """LightningCLI with the model and the data chosen by ``class_path`` in the YAML."""

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # ``grape export`` is dispatched before LightningCLI parses (cli_main); registering a parser
        # for it here only lists it beside fit/validate/test/predict in ``grape --help``.
        assert parser._subcommands_action is not None
        parser._subcommands_action.add_subcommand("export", LightningArgumentParser(description=EXPORT_HELP), help=EXPORT_HELP)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[L.Callback]) -> L.Trainer:
        # The grape progress bar (optimizer steps of max_steps, reward or loss, KL) unless the config
        # brings its own or turns bars off; complete logs (last step's metrics, no hp_metric) always.
        given = config.get("callbacks") or []
        configured = [*(given if isinstance(given, list) else [given]), *callbacks]
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


def export_main(argv: Sequence[str]) -> str:
    """``grape export``: a Lightning checkpoint to a Hugging Face directory."""
    from grape_lightning.callbacks.hf_export import export_atomically

    parser = argparse.ArgumentParser(prog="grape export", description="Write the policy of a checkpoint in Hugging Face format.")
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint written by 'grape fit'")
    parser.add_argument("--output_dir", required=True, help="directory for save_pretrained (replaced atomically)")
    options = parser.parse_args(list(argv))
    module = L.LightningModule.load_from_checkpoint(options.ckpt_path, map_location="cpu")
    directory = export_atomically(module, options.output_dir)
    print(f"exported {type(module).__name__} policy to {directory}")
    return str(directory)


def cli_main(args: Sequence[str] | None = None) -> GrapeCLI | str:
    """Entry point of the console script; ``args`` lets tests drive the real CLI in-process."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    return GrapeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"plugins": [{"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}]},
        args=None if args is None else argv,
    )


def main() -> None:
    """Console script ``grape`` (returns nothing, so the exit status stays 0)."""
    cli_main()


if __name__ == "__main__":
    main()
