"""Unit tests run against a response's code in a subprocess, with a time limit and no network."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.verifiers import _strip_code_fence

# Prepended to every program: sockets refuse to connect, so a response cannot reach the network.
_NO_NETWORK = '''
import socket as _socket
def _refuse(*args, **kwargs):
    raise OSError("network access is disabled while testing a response")
_socket.socket.connect = _refuse
_socket.socket.connect_ex = _refuse
_socket.create_connection = _refuse
_socket.getaddrinfo = _refuse
del _refuse
'''


class UnitTests(RewardFunction):
    """1 if ``response code + tests`` exits with status 0 within ``timeout`` seconds, else 0.

    The tests are ``tests`` (Python source) or, when None, the response's ``metadata["tests"]``
    (no tests there: the response cannot be scored, None). Each program runs in its own
    temporary directory in a fresh ``python -I`` (isolated mode, no user site), with networking
    disabled and at most ``max_workers`` at a time. A timeout scores 0: the code did not pass.

    Args:
        tests: Python test source appended to every response (None: each row's ``metadata["tests"]``).
        timeout: seconds a program may run before it scores 0.
        max_workers: programs run at the same time.
    """

    def __init__(
        self, tests: str | None = None, timeout: float = 10.0, max_workers: int = 4, weight: float = 1.0, name: str | None = None
    ) -> None:
        super().__init__(weight, name)
        self.tests = tests
        self.timeout = timeout
        self.max_workers = max_workers

    def run(self, code: str, tests: str) -> float:
        with tempfile.TemporaryDirectory() as directory:
            program = Path(directory) / "program.py"
            program.write_text(_NO_NETWORK + "\n" + code + "\n\n" + tests + "\n")
            try:
                result = subprocess.run(
                    [sys.executable, "-I", str(program)], cwd=directory, capture_output=True, timeout=self.timeout,
                    env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                )
            except subprocess.TimeoutExpired:
                return 0.0
            return float(result.returncode == 0)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float | None]:
        jobs = [(_strip_code_fence(r), self.tests if self.tests is not None else m.get("tests")) for r, m in zip(responses, metadata)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(self.run, code, tests) if tests else None for code, tests in jobs]
            return [future.result() if future is not None else None for future in futures]
