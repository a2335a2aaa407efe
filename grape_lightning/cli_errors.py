"""Short command-line errors: an unknown key is reported with the config file that holds it and the
nearest accepted name, instead of the parser's full usage and its nested union-type report.

    error: my.yaml: unknown key 'model.init_args.betta' (GRPOModule has no parameter 'betta'; did you mean 'beta'?)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

_UNKNOWN_TOP = re.compile(r"does not accept option '([\w.]+)'")
_UNKNOWN_INIT = re.compile(r"Option '(\w+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([\w.]+)'")


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given with ``--config`` / ``-c`` on the command line, in order."""
    files = []
    for index, arg in enumerate(argv):
        if arg in ("--config", "-c") and index + 1 < len(argv):
            files.append(argv[index + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _load(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted path, key) for every mapping key in a parsed YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, str(key)
            yield from _walk(value, path)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}[{index}]")


def where(key: str, files: Iterable[str], dotted: bool) -> list[tuple[str, str]]:
    """(file, dotted path) of each occurrence of ``key``: a full dotted path from the top of the
    document when ``dotted``, else a key name at any depth."""
    found = []
    for file in files:
        for path, name in _walk(_load(file)):
            if (path == key) if dotted else (name == key):
                found.append((file, path))
    return found


def accepted_parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameter names of the class at ``class_path`` (empty if it does not import)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _suggestion(key: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


def explain(message: str, argv: Sequence[str], top_level_options: Iterable[str] = ()) -> str:
    """One short paragraph for a parse error ``message``: for an unknown key, the file that holds it
    (or the command line) and the nearest accepted name; other errors are passed through."""
    files = config_files(argv)
    unknown_init = _UNKNOWN_INIT.findall(message)
    if unknown_init:
        key = unknown_init[-1]
        classes = _CLASS_PATH.findall(message[: message.rfind(f"Option '{key}'")])
        owner = classes[-1] if classes else ""
        hint = _suggestion(key, accepted_parameters(owner)) if owner else ""
        detail = f"{owner.rpartition('.')[2]} has no parameter '{key}'" + (f"; {hint}" if hint else "")
        return _located(key, where(key, files, dotted=False), detail)
    unknown_top = _UNKNOWN_TOP.findall(message)
    if unknown_top:
        key = unknown_top[-1]
        hint = _suggestion(key, top_level_options)
        return _located(key, where(key, files, dotted=True), hint)
    return message


def _located(key: str, occurrences: list[tuple[str, str]], detail: str) -> str:
    suffix = f" ({detail})" if detail else ""
    if not occurrences:
        return f"command line: unknown key '{key}'{suffix}"
    return "\n".join(f"{file}: unknown key '{path}'{suffix}" for file, path in occurrences)
