"""Which run a resumed ``grape fit`` continues: the same log directory, so the same TensorBoard run.

A logger such as ``TensorBoardLogger(save_dir="runs", name="grpo")`` writes each new run to the
next ``runs/grpo/version_N``, and ``ModelCheckpoint`` writes to ``<that directory>/checkpoints``.
Left alone, a restarted run would open a fresh ``version_N+1`` whose empty ``checkpoints`` hide the
old ones. So, before the logger is built:

- ``--ckpt_path last`` continues the latest run: the highest ``version_N`` under the logger's
  directory (its last checkpoint, or from step 0 if it never wrote one);
- ``--ckpt_path <save_dir>/<name>/version_N/checkpoints/<file>.ckpt`` continues run ``version_N``
  from that checkpoint;
- a ``version`` set in the logger's config is kept as it is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

_VERSION = re.compile(r"version_(\d+)")


def latest_version(root: Path) -> int | None:
    """The highest N of the ``version_N`` directories under ``root`` (None without any)."""
    if not root.is_dir():
        return None
    versions = [int(match.group(1)) for p in root.iterdir() if p.is_dir() and (match := _VERSION.fullmatch(p.name))]
    return max(versions, default=None)


def version_of_checkpoint(root: Path, ckpt_path: str) -> int | None:
    """N when ``ckpt_path`` lies inside ``root/version_N``; else None."""
    try:
        relative = Path(ckpt_path).resolve().relative_to(root.resolve())
    except ValueError:
        return None
    match = _VERSION.fullmatch(relative.parts[0]) if relative.parts else None
    return int(match.group(1)) if match else None


def _logger_configs(logger: Any) -> list[Any]:
    configs = logger if isinstance(logger, list) else [logger]
    fields = ("save_dir", "name", "version")  # TensorBoardLogger, CSVLogger and their like
    return [c for c in configs if hasattr(c, "init_args") and all(hasattr(c.init_args, k) for k in fields)]


def continue_run(trainer_config: Any, ckpt_path: str | None) -> None:
    """Point every versioned logger of ``trainer_config`` (the parsed ``trainer`` section) at the run
    that ``ckpt_path`` resumes (see the module docstring); nothing changes for a fresh run."""
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return
    for logger in _logger_configs(getattr(trainer_config, "logger", None)):
        init_args = logger.init_args
        if init_args.version is not None:
            continue
        root = Path(str(init_args.save_dir)) / (init_args.name or "")
        version = latest_version(root) if ckpt_path == "last" else version_of_checkpoint(root, ckpt_path)
        if version is None:
            continue
        init_args.version = version
        rank_zero_info(f"Continuing run {root / f'version_{version}'} (--ckpt_path {ckpt_path})")
