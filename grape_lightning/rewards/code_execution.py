"""Unit tests run against a response's code inside an OS-level sandbox."""

from __future__ import annotations

import json
import logging
import math
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from grape_lightning.rewards.base import RewardFunction
from grape_lightning.rewards.sandbox import SandboxLimits, run_sandboxed, sandbox_unavailable
from grape_lightning.rewards.verifiers import _strip_code_fence

log = logging.getLogger(__name__)
_HARNESS = (Path(__file__).parent / "unit_test_harness.py").read_text()


class UnitTests(RewardFunction):
    """1 if every test passes against the response's code, else 0.

    The tests are ``tests`` (Python source: ``assert`` statements and/or ``unittest.TestCase``
    classes) or, when None, the response's ``metadata["tests"]`` (none there: the response cannot
    be scored, None). Each program runs in :mod:`~grape_lightning.rewards.sandbox` (no network,
    its own PID namespace, a fresh working directory and nothing else writable, an empty
    environment, rlimits, everything it started killed at ``timeout``), through the harness in
    :mod:`~grape_lightning.rewards.unit_test_harness`: a pass is the harness's own report that the
    tests ran to the end and passed, so an early exit, a crash or a timeout scores 0. A program
    whose harness never started (the sandbox itself failed) cannot be scored: None, logged.

    Where the sandbox cannot be set up (no Linux namespaces), construction fails unless
    ``allow_unsandboxed`` is set: then programs run with the same harness, limits, directory and
    empty environment but can reach the network and everything the trainer's user can.

    Args:
        tests: Python test source shared by every prompt; None reads ``metadata["tests"]``.
        timeout: Wall-clock seconds per program (also its CPU-second limit).
        max_workers: Programs run at once.
        memory_mb: Address-space limit per program, MiB.
        max_processes: Processes and threads per program.
        allow_unsandboxed: Run model output without the namespaces where they are unavailable.
        weight: Weight inside a combined reward.
        name: Metric name, ``reward/<name>``.
    """

    def __init__(
        self, tests: str | None = None, timeout: float = 10.0, max_workers: int = 4, memory_mb: int = 1024, max_processes: int = 32,
        allow_unsandboxed: bool = False, weight: float = 1.0, name: str | None = None,
    ) -> None:
        super().__init__(weight, name)
        self.tests = tests
        self.timeout = timeout
        self.max_workers = max_workers
        self.limits = SandboxLimits(memory_mb=memory_mb, cpu_seconds=max(1, math.ceil(timeout)), processes=max_processes)
        reason = sandbox_unavailable()
        if reason is not None and not allow_unsandboxed:
            raise RuntimeError(
                f"UnitTests runs model output only inside a sandbox, and none is available here: {reason}. "
                "Set allow_unsandboxed: true to run it without one (the code can then use the network and "
                "everything your user can reach)."
            )
        self.sandboxed = reason is None

    def run(self, code: str, tests: str) -> float | None:
        token = secrets.token_hex(16)
        job = {"token": token, "code": code, "tests": tests}
        result = run_sandboxed(
            [sys.executable, "-I", "-B", "-c", _HARNESS], json.dumps(job).encode(), self.timeout, self.limits, self.sandboxed
        )
        report = "\n" + result.output
        if f"\n{token} started\n" not in report and result.returncode is not None:
            log.warning("unit-test harness did not start (exit status %s): %s", result.returncode, result.output[-500:])
            return None
        return float(result.returncode == 0 and f"\n{token} passed\n" in report)

    def __call__(self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]) -> list[float | None]:
        jobs = [(_strip_code_fence(r), self.tests if self.tests is not None else m.get("tests")) for r, m in zip(responses, metadata)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(self.run, code, tests) if tests else None for code, tests in jobs]
            return [future.result() if future is not None else None for future in futures]
