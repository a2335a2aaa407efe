"""The unit-test verifier against responses that try to game it or escape it.

Every attack scores 0 and leaves no process behind. Where an attack is about the sandbox (network,
environment, files), a control runs the same response without the namespaces and shows that the
attack itself works, so a passing test means the sandbox stopped it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from grape_lightning.rewards import UnitTests
from grape_lightning.rewards import sandbox as sandbox_module
from grape_lightning.rewards.sandbox import sandbox_unavailable

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is built from Linux namespaces")

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
HARNESS_MARKER = "The program that runs inside the sandbox"  # in every harness process's command line


def score(code: str, tests: str = ADD_TESTS, timeout: float = 5.0, sandboxed: bool = True, **kwargs) -> float | None:
    verifier = UnitTests(tests=tests, timeout=timeout, **kwargs)
    verifier.sandboxed = sandboxed
    return verifier(["prompt"], [code], [{}])[0]


def leftover_programs(wait: float = 5.0) -> list[int]:
    """Host processes still running the harness (the PID namespace dies with its pid 1, which the
    kernel tears down just after the call returns)."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if HARNESS_MARKER.encode() in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
                except OSError:
                    pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def nothing_left_behind():
    yield
    assert leftover_programs() == []


def test_the_sandbox_is_available_on_linux():
    assert sandbox_unavailable() is None


def test_correct_code_passes_and_wrong_code_fails():
    assert score("def add(a, b):\n    return a + b") == 1.0
    assert score("def add(a, b):\n    return a - b") == 0.0
    assert score("def add(a, b):\n    return a +") == 0.0  # syntax error
    assert score("```python\ndef add(a, b):\n    return a + b\n```") == 1.0


def test_unittest_cases_are_run_by_the_harness():
    cases = textwrap.dedent("""
        import unittest
        class AddTest(unittest.TestCase):
            def test_small(self):
                self.assertEqual(add(2, 3), 5)
            def test_negative(self):
                self.assertEqual(add(-1, 1), 0)
    """)
    assert score("def add(a, b):\n    return a + b", cases) == 1.0
    assert score("def add(a, b):\n    return a * 2 if a == 2 else a + b", cases) == 0.0
    # A response that skips the tests, or stops unittest from running them, does not pass.
    assert score("import unittest\ndef add(a, b):\n    raise unittest.SkipTest('no')", cases) == 0.0
    assert score("import unittest\nunittest.TestCase.run = lambda self, result=None: None\ndef add(a, b):\n    return 0", cases) == 0.0


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)",
        "import os\nos._exit(0)",
        "raise SystemExit",
        "def add(a, b):\n    import sys\n    sys.exit(0)",
        "def add(a, b):\n    import os\n    os._exit(0)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "print('passed')\nprint('OK')\nimport os\nos._exit(0)",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nraise RuntimeError",
    ],
    ids=["sys.exit", "os._exit", "SystemExit", "exit-in-function", "_exit-in-function", "self-kill", "forged-output", "atexit"],
)
def test_leaving_early_is_a_failure(code):
    assert score(code) == 0.0


@pytest.fixture
def listening_server():
    """A TCP server on 127.0.0.1 that records every connection it accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(1)
                try:
                    accepted.append(connection.recv(64))
                except OSError:
                    accepted.append(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(5)
    server.close()


REACH_WITH_SOCKET = """
import _socket
def add(a, b):
    connection = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    connection.settimeout(2)
    connection.connect(("127.0.0.1", PORT))
    connection.send(b"leak")
    return a + b
"""

REACH_WITH_SUBPROCESS = """
import subprocess, sys
def add(a, b):
    script = "import socket; socket.create_connection(('127.0.0.1', PORT), timeout=2).send(b'leak')"
    subprocess.run([sys.executable, "-I", "-c", script], check=True, timeout=4)
    return a + b
"""


@pytest.mark.parametrize("attack", [REACH_WITH_SOCKET, REACH_WITH_SUBPROCESS], ids=["_socket", "subprocess"])
def test_no_network(listening_server, attack):
    port, accepted = listening_server
    code = attack.replace("PORT", str(port))
    assert score(code) == 0.0
    assert accepted == []
    assert score(code, sandboxed=False) == 1.0  # control: the attack works without the sandbox
    assert accepted and set(accepted) == {b"leak"}


def test_the_trainer_is_invisible():
    """A process of the trainer's holds secrets in its environment (as a trainer holds
    OPENAI_API_KEY and HF_TOKEN); the response looks for them in every /proc/<pid>/environ and
    cmdline it can see, and in its own environment."""
    spy = textwrap.dedent("""
        import os
        def add(a, b):
            for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
                for name in ("environ", "cmdline"):
                    try:
                        with open(f"/proc/{entry}/{name}", "rb") as seen:
                            if b"hunter2-secret" in seen.read():
                                return a + b
                    except OSError:
                        pass
            if any("hunter2-secret" in value for value in os.environ.values()):
                return a + b
            return None
    """)
    holder = subprocess.Popen(["sleep", "60"], env={"OPENAI_API_KEY": "hunter2-secret", "HF_TOKEN": "hunter2-secret"})
    os.environ["HF_TOKEN"] = "hunter2-secret"  # and the trainer's own environment
    try:
        assert score(spy) == 0.0
        assert score(spy, sandboxed=False) == 1.0  # control: the same user can read it without the sandbox
    finally:
        del os.environ["HF_TOKEN"]
        holder.kill()
        holder.wait()


def test_nothing_outside_its_directory_is_writable(tmp_path):
    """The installed package and the Python environment are read-only; its /tmp is its own."""
    import grape_lightning

    installed = [Path(grape_lightning.__file__).parent / "escaped.py", Path(sys.prefix) / "escaped"]
    writer = textwrap.dedent(f"""
        import os
        def add(a, b):
            with open("inside.txt", "w") as out:  # its own directory is writable
                out.write("fine")
            with open({str(tmp_path / "escaped")!r}.replace("/escaped", "") + "-escaped", "w") as out:
                out.write("private /tmp")
            for target in {[str(t) for t in installed]!r}:
                try:
                    with open(target, "w") as out:
                        out.write("import os; os.system('echo owned')")
                    return a + b
                except OSError:
                    pass
            return None
    """)
    host_paths = [*installed, Path(str(tmp_path) + "-escaped")]
    try:
        assert score(writer) == 0.0
        assert [t for t in host_paths if t.exists()] == []
        assert score(writer, sandboxed=False) == 1.0  # control
        assert installed[0].exists()
    finally:
        for target in host_paths:
            target.unlink(missing_ok=True)


def test_a_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    assert score(bomb, timeout=3) == 0.0
    assert time.monotonic() - started < 20


def test_a_memory_hog_is_stopped():
    assert score("hog = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b", memory_mb=512) == 0.0


def test_a_huge_file_is_stopped(tmp_path):
    writer = "def add(a, b):\n    with open('big', 'wb') as out:\n        out.write(b'x' * (64 * 1024 * 1024))\n    return a + b"
    assert score(writer) == 0.0


def test_a_sleeping_daemon_dies_with_the_program():
    daemon = textwrap.dedent("""
        import ctypes, os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG 0
                time.sleep(60)
            os._exit(0)
        def add(a, b):
            return a + b
    """)
    assert score(daemon) == 1.0  # it passes its tests; the autouse fixture checks the daemon is gone


def test_a_program_that_never_ends_is_killed_at_the_time_limit():
    started = time.monotonic()
    assert score("import time\ntime.sleep(60)", timeout=2) == 0.0
    assert time.monotonic() - started < 15


def test_without_a_sandbox_it_refuses_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox_module, "sandbox_unavailable", lambda: "no namespaces here")
    monkeypatch.setattr("grape_lightning.rewards.code_execution.sandbox_unavailable", lambda: "no namespaces here")
    with pytest.raises(RuntimeError, match="allow_unsandboxed: true"):
        UnitTests(tests=ADD_TESTS)
    verifier = UnitTests(tests=ADD_TESTS, allow_unsandboxed=True)
    assert not verifier.sandboxed
    assert verifier(["p", "p"], ["def add(a, b):\n    return a + b", "import sys\nsys.exit(0)"], [{}, {}]) == [1.0, 0.0]


def test_tests_come_from_the_metadata_when_not_configured():
    verifier = UnitTests()
    responses = ["def add(a, b):\n    return a + b"] * 2
    assert verifier(["p", "p"], responses, [{"tests": ADD_TESTS}, {}]) == [1.0, None]


def test_a_rubric_unit_tests_item_scores_through_the_sandbox(tmp_path):
    """The way a GRAPE user meets it: a rubric YAML with a ``unit_tests`` item, tests per prompt."""
    from grape_lightning.rewards.rubric import load_rubric
    from grape_lightning.rewards.rubric_scorer import RubricScorer

    rubric_path = tmp_path / "rubric.yaml"
    rubric_path.write_text(textwrap.dedent("""
        default_category: code
        categories:
          code:
            - {name: tests_pass, weight: 1.0, kind: verifiable, check: unit_tests, timeout: 5, memory_mb: 512}
    """))
    scorer = RubricScorer(load_rubric(rubric_path))
    responses = ["def add(a, b):\n    return a + b", "import sys\nsys.exit(0)", "def add(a, b):\n    return a + b"]
    scores = scorer(["p"] * 3, responses, [{"tests": ADD_TESTS}, {"tests": ADD_TESTS}, {}])
    assert scores.scores[:, 0].tolist() == [1.0, 0.0, 0.0]
    assert scores.failed[:, 0].tolist() == [False, False, True]  # no tests for the third: not scored
