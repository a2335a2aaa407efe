"""The real ``grape`` command: in a subprocess as a user types it, or in this process where a separate
process is not what a test is about."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def grape_here(*args: str, cwd: Path | str) -> tuple[Any, str]:
    """``grape ARGS`` run by :func:`grape_lightning.cli.cli_main` in this process, in the directory
    ``cwd`` (no interpreter start-up: for runs where a separate process is not what is tested).
    Returns the CLI object (the exported directory for ``export``) and what the command printed,
    logged (Lightning's and the library's info lines) and warned. An error propagates."""
    from grape_lightning.cli import cli_main

    records = _Records()
    loggers = [logging.getLogger(name) for name in ("", "lightning.pytorch", "lightning.fabric")]
    previous, argv = Path.cwd(), sys.argv
    out, err = io.StringIO(), io.StringIO()
    for logger in loggers:
        logger.addHandler(records)
    try:
        sys.argv = ["grape"]
        os.chdir(cwd)
        with warnings.catch_warnings(record=True) as warned, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            result = cli_main(list(args))
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        os.chdir(previous)
        sys.argv = argv
    text = "\n".join([out.getvalue(), err.getvalue(), *records.lines, *(str(w.message) for w in warned)])
    return result, text
