"""The documentation runs as written: every command of a ```bash block in README.md and docs/ is
checked (each ``grape`` command parses with ``--print_config``; a few train for real, in this
process, with small step overrides; each ``python scripts/...`` command's script starts and knows the options the
docs give it), every ```yaml block parses, and no file the docs cite is missing."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli_runner import ROOT, grape_here, grape_in_process

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(first line number, text) of each ```language block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fence = line.strip()
        if current is None and fence == f"```{language}":
            current, start = [], number + 1
        elif current is not None and fence == "```":
            blocks.append((start, "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


HEREDOC = re.compile(r"<<-?\s*'?(\w+)'?")


def shell_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuations joined, comments dropped, ``&&``
    chains split, launcher prefixes (``srun``, ``torchrun ... -m grape_lightning.cli``) removed."""
    commands = []
    lines = block.replace("\\\n", " ").splitlines()
    while lines:
        line = lines.pop(0)
        heredoc = HEREDOC.search(line)
        if heredoc:  # ``python - <<'PY'`` ... ``PY``: the command, "<<", and the text it reads
            body = []
            while lines and lines[0].strip() != heredoc.group(1):
                body.append(lines.pop(0))
            lines = lines[1:]
            commands.append([*shlex.split(line[: heredoc.start()]), "<<", "\n".join(body)])
            continue
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            if command and command[0] == "srun":
                command = command[1:]
            if command and command[0] == "torchrun" and "grape_lightning.cli" in command:
                command = ["grape", *command[command.index("grape_lightning.cli") + 1:]]
            if command:
                commands.append(command)
    return commands


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for line, block in fenced_blocks(path, "bash"):
            for command in shell_commands(block):
                found.append((f"{path.name}:{line}:{' '.join(command)[:60]}", command))
    return found


COMMANDS = documented_commands()
GRAPE = [(name, command) for name, command in COMMANDS if command[0] == "grape"]
SCRIPTS = [(name, command) for name, command in COMMANDS if command[0] == "python" and command[1:2] and command[1].startswith("scripts/")]
PYTHON_INPUTS = [(name, command) for name, command in COMMANDS if command[:3] == ["python", "-", "<<"]]
# commands that set up the reader's machine, not the library's
SETUP = {"python -m venv", "pip install", ". .venv/bin/activate", "python -m pytest", "#!/bin/bash"}


def test_every_documented_command_is_checked():
    unchecked = [name for name, command in COMMANDS if (name, command) not in GRAPE + SCRIPTS + PYTHON_INPUTS
                 and not any(" ".join(command).startswith(prefix) for prefix in SETUP)]
    assert not unchecked, f"documented commands that no test runs: {unchecked}"
    assert len(GRAPE) >= 15 and SCRIPTS


@pytest.fixture
def workdir(tmp_path):
    """A fresh directory where the docs' relative paths (configs/...) resolve as in a checkout."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    return tmp_path


@pytest.mark.parametrize("name, command", GRAPE, ids=[name for name, _ in GRAPE])
def test_documented_grape_command_parses(name, command, workdir, capsys):
    asks_for_help = any(word.endswith("help") or word.startswith("--print_config") for word in command)
    arguments = command[1:] if asks_for_help else [*command[1:], "--print_config"]
    code, out, err = grape_in_process(*arguments, capsys=capsys, cwd=workdir)
    assert code == 0, f"{name}\n{err[-3000:]}"
    if not asks_for_help:
        assert yaml.safe_load(out)["model"]["class_path"]
    assert out.strip()


# Real runs, a few steps each: the quickstart and the own-data SFT command, as documented plus the
# overrides that make them short.
SHORT = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1"]
SMALL_TASK = ["--data.init_args.task.init_args.num_train", "32", "--data.init_args.task.init_args.num_val", "8"]


def _documented(text: str) -> list[str]:
    matches = [command for _, command in GRAPE if " ".join(command).startswith(text)]
    assert matches, f"the docs no longer document '{text}'"
    return matches[0]


def test_quickstart_command_trains_and_exports_a_model_that_generates(workdir):
    from tests.cli.test_cli import assert_exported_model_generates

    command = _documented("grape fit --config configs/grape.yaml")
    _, output = grape_here(*command[1:], *SHORT, *SMALL_TASK, "--data.init_args.batch_size", "2",
                           "--checkpoint.every_n_train_steps", "2", cwd=workdir)
    assert "val/accuracy: before" in output
    export, _ = grape_here("export", "--ckpt_path", "runs/grape/version_0/checkpoints/last.ckpt", "--output_dir", "exported",
                           cwd=workdir)
    for directory in (workdir / "runs/grape/version_0/hf", Path(export)):
        assert_exported_model_generates(directory)


def test_own_data_command_trains(workdir):
    command = _documented("grape fit --config configs/sft.yaml --data.init_args.train_file train.jsonl")
    # the two row formats the README documents
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(6) for b in range(4)]
    rows += [{"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}]
    (workdir / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (workdir / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    grape_here(*command[1:], *SHORT, "--data.init_args.batch_size", "8", cwd=workdir)
    events = EventAccumulator(str(workdir / "runs/sft/version_0"))
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])


def test_prompt_file_example_trains(workdir, monkeypatch):
    """The worked example from prompt JSONL to a GRPO run: its Python writes the files, then the
    documented command trains on them (a few steps)."""
    (name, writer), = [(name, command) for name, command in PYTHON_INPUTS if "_prompts.jsonl" in command[3]]
    monkeypatch.chdir(workdir)
    exec(compile(writer[3], name, "exec"), {"__name__": "__main__"})  # what `python - <<'PY'` runs
    assert (workdir / "train_prompts.jsonl").is_file() and (workdir / "val_prompts.jsonl").is_file()
    command = _documented("grape fit --config configs/grpo.yaml --data.init_args.train_file train_prompts.jsonl")
    _, output = grape_here(*command[1:], *SHORT, "--data.init_args.batch_size", "2", cwd=workdir)
    assert "val/accuracy: before" in output


@pytest.mark.parametrize("name, command", SCRIPTS, ids=[name for name, _ in SCRIPTS])
def test_documented_script_knows_its_options(name, command, tmp_path):
    import subprocess
    import sys

    script = ROOT / command[1]
    assert script.is_file(), f"{name}: {command[1]} does not exist"
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for option in (word for word in command[2:] if word.startswith("--")):
        assert option in result.stdout, f"{name}: {command[1]} has no option {option}"


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_yaml_blocks_parse(path):
    for line, block in fenced_blocks(path, "yaml"):
        assert isinstance(yaml.safe_load(block), dict), f"{path.name}:{line}"


# -- citations ---------------------------------------------------------------------------------
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^)#\s]+)")
_TOP = tuple(f"{entry.name}/" for entry in ROOT.iterdir() if entry.is_dir() and not entry.name.startswith("."))
_EXTENSIONS = (".py", ".yaml", ".yml", ".md", ".json", ".jsonl", ".toml", ".txt")
# paths a run writes, or that the reader supplies: not files of the repository
_NOT_OURS = ("runs/", "exported/", "/path/", "train.jsonl", "val.jsonl", "my_rewards.py")


def cited_paths(path: Path) -> list[tuple[int, str]]:
    """Repository paths that a Markdown file cites: relative link targets, and code spans that
    name a path under a top-level directory of the repository or a file with a known extension."""
    cited = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        for target in _LINK.findall(line):
            if "://" not in target:
                cited.append((number, str((path.parent / target).resolve().relative_to(ROOT))))
        for span in _CODE_SPAN.findall(line):
            for word in span.split():
                word = word.strip("(),;:'\"")
                looks_like_file = word.startswith(_TOP) or ("/" not in word and word.endswith(_EXTENSIONS) and word[0].isupper())
                if looks_like_file and not any(part in word for part in _NOT_OURS) and not re.search(r"[<>{}=$]", word):
                    cited.append((number, word))
    return cited


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_docs_cite_only_files_that_exist(path):
    missing = [f"{path.name}:{line}: {cited}" for line, cited in cited_paths(path) if not glob.glob(str(ROOT / cited))]
    assert not missing, "cited but missing:\n" + "\n".join(missing)


def test_the_citation_check_sees_citations():
    cited = {word for _, word in cited_paths(ROOT / "README.md")}
    assert {"configs/grape.yaml", "configs/rubrics/arithmetic.yaml", "benchmarks/RESULTS.md", "docs/scaling.md"} <= cited


_DOTTED = re.compile(r"^grape_lightning(?:\.\w+)+$")


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("path", DOCS, ids=lambda path: path.name)
def test_docs_name_only_classes_and_modules_that_exist(path):
    names = {(number, word.strip("(),;:'\"")) for number, line in enumerate(path.read_text().splitlines(), start=1)
             for span in _CODE_SPAN.findall(line) for word in span.split()}
    dotted = [(number, word) for number, word in names if _DOTTED.match(word)]
    assert dotted or path.name != "README.md"
    missing = [f"{path.name}:{number}: {word}" for number, word in sorted(dotted) if not _resolves(word)]
    assert not missing, "named but missing:\n" + "\n".join(missing)
