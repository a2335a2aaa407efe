"""The ``grape`` command: LightningCLI over every algorithm and DataModule, plus ``grape export``.

    grape fit --config configs/sft.yaml
    grape fit --config configs/sft.yaml --trainer.max_steps 50 --print_config
    grape export --ckpt_path runs/sft/version_0/checkpoints/last.ckpt --output_dir exported/
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

import grape_lightning.algorithms  # noqa: F401  (registers the modules for class_path lookup)
from grape_lightning.checkpointing import AtomicCheckpointIO
import grape_lightning.callbacks  # noqa: F401
import grape_lightning.data  # noqa: F401
import grape_lightning.rewards  # noqa: F401
import grape_lightning.rewards.critics  # noqa: F401
import grape_lightning.rollout  # noqa: F401


class GrapeCLI(LightningCLI):
    """LightningCLI with the model and the data chosen by ``class_path`` in the YAML."""


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
