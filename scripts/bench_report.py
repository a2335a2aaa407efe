"""Render the JSON reports written by the benchmarks as Markdown tables (for benchmarks/RESULTS.md).

    python scripts/bench_report.py benchmarks/out/generation.json benchmarks/out/training.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def render(path: Path) -> str:
    report = json.loads(path.read_text())
    rows = report["rows"]
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    lines = [f"### {path.stem}", "", f"Device: {report['device']}; {versions}.", ""]
    settings = {k: v for k, v in report.items() if k not in ("rows", "device", "versions")}
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {cell(v)}" for k, v in settings.items()) + ".", ""]
    columns = list(dict.fromkeys(column for row in rows for column in row))
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + " --- |" * len(columns))
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(render(Path(argument)) for argument in sys.argv[1:]))
