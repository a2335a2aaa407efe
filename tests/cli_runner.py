"""The real ``grape`` console command in a subprocess, as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_grape(*args: str, cwd: Path | str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """``grape ARGS`` (through ``python -m grape_lightning.cli``, the console script's entry point)
    in ``cwd``, offline. With ``check`` a non-zero exit fails with the command's output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "grape_lightning.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"grape {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def grape_in_process(*args: str, capsys, cwd: Path | str | None = None) -> tuple[int, str, str]:
    """``grape ARGS`` run by :func:`grape_lightning.cli.cli_main` in this process (no interpreter
    start-up: for parse-only commands such as ``--help`` and ``--print_config``); returns
    (exit status, stdout, stderr)."""
    from grape_lightning.cli import cli_main

    previous, argv = Path.cwd(), sys.argv
    capsys.readouterr()
    try:
        sys.argv = ["grape"]  # pytest's own arguments are not the command's
        if cwd is not None:
            os.chdir(cwd)
        try:
            cli_main(list(args))
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(previous)
        sys.argv = argv
    out, err = capsys.readouterr()
    return code, out, err
