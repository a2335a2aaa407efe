"""The program that runs inside the sandbox: a response's code, then its tests, in one interpreter.

Standard input is JSON ``{"token", "code", "tests"}``. The harness prints ``<token> started``,
runs the code and then the tests (plain ``assert`` statements, and/or ``unittest.TestCase``
classes, which the harness runs itself), and prints ``<token> passed`` as its very last act only
when the tests' source ran to its end and every collected test case ran and passed (none failed,
errored or was skipped). Anything else is a failure: an early ``sys.exit`` or ``os._exit``, a
crash, a signal, a skipped test, a test run cut short. The token is random per program and never
enters the program's namespace, so printing "passed" does not forge a report.

The token does live in this interpreter's memory: code written to search the interpreter for it
could still forge a pass. The sandbox bounds what such code can do to the machine; the verdict
is only as strong as the tests.

This file is run with ``python -I -B -c``; it uses only the standard library.
"""

import json
import os
import sys
import traceback
import unittest


def _emit(line: str, write=os.write) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced them
            pass
    write(1, f"\n{line}\n".encode())


def _test_cases(namespace: dict, before: dict) -> unittest.TestSuite:
    """The TestCase classes the tests' source defined (not the response's)."""
    suite = unittest.TestSuite()
    for name, value in namespace.items():
        if before.get(name) is not value and isinstance(value, type) and issubclass(value, unittest.TestCase):
            suite.addTests(unittest.defaultTestLoader.loadTestsFromTestCase(value))
    return suite


def main(leave=os._exit) -> None:
    job = json.loads(sys.stdin.read())
    sys.stdin.close()
    token = job.pop("token")
    _emit(f"{token} started")
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "response.py", "exec"), namespace)
        before = dict(namespace)
        exec(compile(job["tests"], "tests.py", "exec"), namespace)
        suite = _test_cases(namespace, before)
        expected = suite.countTestCases()
        result = unittest.TestResult()
        suite.run(result)
        passed = (
            result.testsRun == expected and not result.failures and not result.errors and not result.skipped
            and not result.unexpectedSuccesses and not result.shouldStop
        )
        for test, report in result.failures + result.errors:
            sys.stderr.write(f"{test}: {report}\n")
    except BaseException:  # SystemExit and KeyboardInterrupt included: leaving early is not passing
        traceback.print_exc()
        passed = False
    if passed:
        _emit(f"{token} passed")
    leave(0 if passed else 1)


if __name__ == "__main__":
    main()
