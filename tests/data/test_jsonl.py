"""JSONL readers: good rows normalise as documented; every bad row names file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grape_lightning.data.jsonl import DataFormatError, read_completion_rows, read_preference_rows


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict:
    return {"role": "system", "content": content}


def write(tmp_path: Path, *lines: object, name: str = "data.jsonl") -> Path:
    """Write one line per item: strings verbatim, anything else as JSON."""
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def error_of(reader, path: Path) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        reader(path)
    return info.value


def assert_located(error: DataFormatError, path: Path, line: int, field: str | None) -> None:
    message = str(error)
    assert message.startswith(f"{path}:{line}: "), message
    assert (error.path, error.line, error.field) == (str(path), line, field)
    if field is not None:
        assert f"'{field}'" in message, message


# Whole-file problems


@pytest.mark.parametrize("reader", [read_completion_rows, read_preference_rows])
def test_missing_empty_and_blank_files(tmp_path, reader):
    missing = tmp_path / "nope.jsonl"
    assert str(error_of(reader, missing)) == f"{missing}: file not found"
    assert str(error_of(reader, tmp_path)) == f"{tmp_path}: not a file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert str(error_of(reader, empty)) == f"{empty}: no rows"
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n   \n\t\n")
    assert str(error_of(reader, blank)) == f"{blank}: no rows"


@pytest.mark.parametrize("reader", [read_completion_rows, read_preference_rows])
def test_line_level_problems_name_the_line(tmp_path, reader):
    good = {"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"}
    path = write(tmp_path, good, "", '{"prompt": "p",')
    error = error_of(reader, path)
    assert_located(error, path, 3, None)
    assert "invalid JSON" in str(error)

    path = write(tmp_path, good, '["prompt", "completion"]')
    error = error_of(reader, path)
    assert_located(error, path, 2, None)
    assert "expected a JSON object, got list" in str(error)

    path = write(tmp_path, '{"prompt": "p", "prompt": "q"}')
    assert "appears twice" in str(error_of(reader, path))

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "p"}\n{"prompt": "caf\xe9"}\n')
    error = error_of(reader, path)
    assert_located(error, path, 2, None)
    assert "UTF-8" in str(error)


# Completion rows


def test_completion_rows_parse_with_metadata_and_true_line_numbers(tmp_path):
    path = write(
        tmp_path,
        {"prompt": "17+5=", "completion": "22", "category": "math", "id": 7},
        "",
        "   ",
        {"messages": [system("Be brief."), user("hi"), assistant("hello"), user("2+2?"), assistant("4")]},
        {"prompt": [user("q")], "completion": "a", "metadata": {"category": "qa"}, "source": "web"},
    )
    rows = read_completion_rows(path)
    assert rows == [
        {
            "prompt": "17+5=",
            "completion": "22",
            "metadata": {"category": "math", "id": 7, "source": f"{path}:1"},
        },
        {
            "prompt": [system("Be brief."), user("hi"), assistant("hello"), user("2+2?")],
            "completion": "4",
            "metadata": {"source": f"{path}:4"},
        },
        {
            "prompt": [user("q")],
            "completion": "a",
            "metadata": {"category": "qa", "row_source": "web", "source": f"{path}:5"},
        },
    ]


def test_completion_as_conversation_with_or_without_prompt(tmp_path):
    path = write(
        tmp_path,
        {"prompt": "hi", "completion": [user("hi"), assistant("hello")]},
        {"completion": [user("hi"), assistant("hello")]},
        {"prompt": "hi", "completion": [assistant("hello")]},
    )
    prompts = [(row["prompt"], row["completion"]) for row in read_completion_rows(path)]
    assert prompts == [("hi", "hello"), ([user("hi")], "hello"), ("hi", "hello")]


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b'\xef\xbb\xbf{"prompt": "p", "completion": "c"}\r\n\r\n{"prompt": "q", "completion": "d"}\r\n'
    )
    rows = read_completion_rows(path)
    assert [(r["prompt"], r["metadata"]["source"]) for r in rows] == [("p", f"{path}:1"), ("q", f"{path}:3")]


BAD_COMPLETION_ROWS = [
    (
        {"prompt": "p"},
        "completion",
        "missing field 'completion' (a row needs 'prompt' and 'completion', or 'messages')",
    ),
    ({"completion": "c"}, "prompt", "missing field 'prompt'"),
    (
        {"prompt": "p", "completion": 5},
        "completion",
        "field 'completion': expected a string or a list of messages, got int",
    ),
    ({"prompt": None, "completion": "c"}, "prompt", "got null"),
    ({"prompt": "  ", "completion": "c"}, "prompt", "empty prompt"),
    ({"prompt": "p", "completion": " \n"}, "completion", "empty reply"),
    ({"prompt": [], "completion": "c"}, "prompt", "empty list"),
    ({"prompt": [assistant("x")], "completion": "c"}, "prompt", "no non-empty system or user message"),
    ({"prompt": "p", "completion": [user("p")]}, "completion[0].role", "must be the assistant reply"),
    ({"prompt": "p", "completion": [user("other"), assistant("c")]}, "completion", "differs from 'prompt'"),
    ({"messages": "hi"}, "messages", "expected a list of messages, got string"),
    ({"messages": [user("q"), assistant("a")], "prompt": "q"}, "messages", "not both"),
    ({"messages": [assistant("a")]}, "messages", "no system or user message"),
    ({"messages": [user(" "), assistant("a")]}, "messages", "no non-empty system or user message"),
    ({"messages": [user("q"), "a"]}, "messages[1]", "expected a message object, got string"),
    ({"messages": [user("q"), {"content": "a"}]}, "messages[1].role", "missing field 'messages[1].role'"),
    ({"messages": [user("q"), {"role": "assistant"}]}, "messages[1].content", "missing field"),
    (
        {"messages": [user("q"), assistant("a"), {"role": "tool", "content": "x"}]},
        "messages[2].role",
        "'tool'",
    ),
    (
        {"messages": [{"role": "user", "content": 3}, assistant("a")]},
        "messages[0].content",
        "expected a string, got int",
    ),
    ({"messages": [user("q"), assistant("a"), user("q2")]}, "messages[2].role", "got 'user'"),
    ({"messages": [user("q"), assistant("")]}, "messages[1].content", "empty reply"),
    ({"prompt": "p", "completion": "c", "metadata": [1]}, "metadata", "expected an object, got list"),
    (
        {"prompt": "p", "completion": "c", "metadata": {"id": 1}, "id": 2},
        "metadata.id",
        "also a top-level field",
    ),
]


@pytest.mark.parametrize(("row", "field", "text"), BAD_COMPLETION_ROWS)
def test_bad_completion_rows_name_file_line_and_field(tmp_path, row, field, text):
    path = write(tmp_path, {"prompt": "fine", "completion": "row"}, "", row, name="user data.jsonl")
    error = error_of(read_completion_rows, path)
    assert_located(error, path, 3, field)
    assert text in str(error)


# Preference rows


def test_preference_rows_in_their_common_shapes(tmp_path):
    conversation = [system("s"), user("q1"), assistant("a1"), user("q2")]
    path = write(
        tmp_path,
        {"prompt": "2+2=", "chosen": "4", "rejected": "5", "category": "math"},
        "",
        # prompt plus whole conversations, as in UltraFeedback-style data
        {"prompt": "q", "chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]},
        # no prompt: the shared conversation is the prompt, as in HH-style data
        {"chosen": [*conversation, assistant("good")], "rejected": [*conversation, assistant("bad")]},
        {"prompt": [user("q")], "chosen": [assistant("good")], "rejected": "bad"},
        {"chosen": [user("q"), assistant("good")], "rejected": "bad"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    )
    rows = read_preference_rows(path)
    assert rows[0] == {
        "prompt": "2+2=",
        "chosen": "4",
        "rejected": "5",
        "metadata": {"category": "math", "source": f"{path}:1"},
    }
    simplified = [(r["prompt"], r["chosen"], r["rejected"], r["metadata"]["source"]) for r in rows[1:]]
    assert simplified == [
        ("q", "good", "bad", f"{path}:3"),
        (conversation, "good", "bad", f"{path}:4"),
        ([user("q")], "good", "bad", f"{path}:5"),
        ([user("q")], "good", "bad", f"{path}:6"),
        ("q", "same", "same", f"{path}:7"),
    ]


BAD_PREFERENCE_ROWS = [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing field 'prompt'"),
    ({"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "empty reply"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
    ({"prompt": "p", "chosen": {"text": "a"}, "rejected": "b"}, "chosen", "got object"),
    (
        {"prompt": "p", "chosen": "a", "rejected": [user("p"), assistant("b"), user("?")]},
        "rejected[2].role",
        "got 'user'",
    ),
    ({"prompt": "p", "chosen": [assistant(" ")], "rejected": "b"}, "chosen[0].content", "empty reply"),
    (
        {"prompt": "p", "chosen": [user("other"), assistant("a")], "rejected": "b"},
        "chosen",
        "differs from 'prompt'",
    ),
    (
        {"chosen": [user("q"), assistant("a")], "rejected": [user("different"), assistant("b")]},
        "rejected",
        "differs from the one in 'chosen'",
    ),
    (
        {"chosen": [user("q"), assistant("a")], "rejected": [system("s"), user("q"), assistant("b")]},
        "rejected",
        "differs from the one in 'chosen'",
    ),
    (
        {"prompt": [system("s"), {"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"},
        "prompt[1].role",
        "'bot'",
    ),
]


@pytest.mark.parametrize(("row", "field", "text"), BAD_PREFERENCE_ROWS)
def test_bad_preference_rows_name_file_line_and_field(tmp_path, row, field, text):
    path = write(tmp_path, "", {"prompt": "fine", "chosen": "a", "rejected": "b"}, "", "", row)
    error = error_of(read_preference_rows, path)
    assert_located(error, path, 5, field)
    assert text in str(error)


def test_data_format_error_is_a_value_error():
    assert issubclass(DataFormatError, ValueError)


def test_prompt_rows_keep_metadata_and_locate_errors(tmp_path):
    from grape_lightning.data.jsonl import read_prompt_rows

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "2+2=", "answer": "4", "category": "math"}\n\n{"answer": "5"}\n')
    with pytest.raises(DataFormatError, match=r"prompts\.jsonl:3: missing field 'prompt'"):
        read_prompt_rows(path)
    path.write_text('{"prompt": "2+2=", "answer": "4", "category": "math"}\n')
    [row] = read_prompt_rows(path)
    assert row["prompt"] == "2+2="
    assert row["metadata"] == {"answer": "4", "category": "math", "source": f"{path}:1"}
