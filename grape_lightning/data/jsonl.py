"""Readers for user data in JSON Lines, with errors that point at the file, line and field.

Three row shapes are read:

- completion rows (SFT, rejection sampling, prompts for RL): ``{"prompt", "completion"}`` or a
  conversation ``{"messages": [...]}`` whose last message is the assistant reply;
- preference rows (DPO, reward models): ``{"prompt", "chosen", "rejected"}``, where chosen and
  rejected may also be whole conversations, as in common preference datasets;
- prompt rows (rollouts): ``{"prompt", ...}`` with every other field kept as metadata.

Both normalise to ``{"prompt": str | list[message], <replies as str>, "metadata": dict}``. A prompt
stays a string or becomes the list of messages before the reply, for a chat template to render.
Blank lines are skipped; anything else that does not fit raises ``DataFormatError`` rather than
being dropped or guessed at.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
_COMPLETION_HINT = "a row needs 'prompt' and 'completion', or 'messages'"
_PREFERENCE_HINT = (
    "a row needs 'prompt', 'chosen' and 'rejected'; 'prompt' may be left out when 'chosen' and "
    "'rejected' are whole conversations"
)
_TYPE_NAMES = {dict: "object", list: "list", str: "string", int: "int", float: "float", bool: "bool"}


class DataFormatError(ValueError):
    """A data file that cannot be read as rows; names the file, the 1-based line and the field.

    ``path``, ``line`` and ``field`` are kept as attributes (``line`` and ``field`` are None when
    the problem is with the whole file or the whole row).
    """

    def __init__(self, message: str, path: str, line: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


def read_completion_rows(path: str | os.PathLike) -> list[dict]:
    """Read prompt/completion rows from a JSONL file.

    A row is ``{"prompt": ..., "completion": ...}`` or ``{"messages": [...]}``. In the first form the
    prompt is a string or a list of messages and the completion a string, a one-message assistant
    list, or a whole conversation ending in the assistant reply (its earlier messages must then
    equal the prompt, or stand in for it when "prompt" is absent). In the second form the messages
    before the last (assistant) one become the prompt. Roles are "system", "user" and "assistant".

    Returns ``{"prompt", "completion", "metadata"}`` dicts; metadata holds the row's other fields
    (the keys of a "metadata" object field are merged in) and ``"source": "<path>:<line>"``; a row's
    own "source" field is kept as "row_source".
    """
    rows = []
    for row in _read_objects(path):
        if "messages" in row.data:
            if "prompt" in row.data or "completion" in row.data:
                raise row.error(
                    "messages", "a row has either 'messages' or 'prompt' and 'completion', not both"
                )
            messages = row.data["messages"]
            if not isinstance(messages, list):
                raise row.error("messages", f"expected a list of messages, got {_type_name(messages)}")
            completion, prompt = _reply(row, "messages", messages)
            if not prompt:
                raise row.error("messages", "no system or user message before the final assistant reply")
            used = ("messages",)
        else:
            prompt, replies = _prompt_and_replies(row, ("completion",), _COMPLETION_HINT)
            completion = replies["completion"]
            used = ("prompt", "completion")
        rows.append({"prompt": prompt, "completion": completion, "metadata": row.metadata(used)})
    return rows


def read_preference_rows(path: str | os.PathLike) -> list[dict]:
    """Read preference rows (a prompt, a chosen and a rejected reply) from a JSONL file.

    ``prompt`` is a string or a list of messages. ``chosen`` and ``rejected`` are each a string, a
    one-message assistant list, or a whole conversation ending in the assistant reply; the earlier
    messages of a whole conversation must equal the prompt (a string prompt counts as one user
    message). Without "prompt", the earlier messages are the prompt and must be the same in chosen
    and rejected. A row whose chosen equals its rejected is kept.

    Returns ``{"prompt", "chosen", "rejected", "metadata"}`` dicts with chosen and rejected as the
    reply strings; metadata as in ``read_completion_rows``.
    """
    rows = []
    for row in _read_objects(path):
        prompt, replies = _prompt_and_replies(row, ("chosen", "rejected"), _PREFERENCE_HINT)
        metadata = row.metadata(("prompt", "chosen", "rejected"))
        rows.append({"prompt": prompt, **replies, "metadata": metadata})
    return rows


def read_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """Read prompts for rollouts from a JSONL file: ``{"prompt": str | messages, ...}``.

    Every other field (a reference ``answer``, a ``category``, anything a reward needs) goes into
    metadata, as in ``read_completion_rows``; a "completion" field, if present, is kept there as the
    reference answer's text.

    Returns ``{"prompt", "metadata"}`` dicts.
    """
    rows = []
    for row in _read_objects(path):
        if "prompt" not in row.data:
            raise row.missing("prompt", "a prompt row needs 'prompt'; other fields become metadata")
        rows.append({"prompt": _prompt(row, row.data["prompt"]), "metadata": row.metadata(("prompt",))})
    return rows


class _Row:
    """One parsed JSON object with its position, for building located errors."""

    def __init__(self, path: str, line: int, data: dict) -> None:
        self.path = path
        self.line = line
        self.data = data

    def error(self, field: str, message: str) -> DataFormatError:
        return DataFormatError(
            f"{self.path}:{self.line}: field '{field}': {message}", self.path, self.line, field
        )

    def missing(self, field: str, hint: str) -> DataFormatError:
        return DataFormatError(
            f"{self.path}:{self.line}: missing field '{field}' ({hint})", self.path, self.line, field
        )

    def metadata(self, used: tuple[str, ...]) -> dict:
        """The row's fields other than ``used``, with a "metadata" object merged in, plus "source"."""
        extra = {key: value for key, value in self.data.items() if key not in used and key != "metadata"}
        nested = self.data.get("metadata", {})
        if not isinstance(nested, dict):
            raise self.error("metadata", f"expected an object, got {_type_name(nested)}")
        clashes = sorted(nested.keys() & extra.keys())
        if clashes:
            raise self.error(f"metadata.{clashes[0]}", f"'{clashes[0]}' is also a top-level field of the row")
        metadata = {**nested, **extra}
        if "source" in metadata:
            metadata["row_source"] = metadata.pop("source")
        metadata["source"] = f"{self.path}:{self.line}"
        return metadata


def _read_objects(path: str | os.PathLike) -> list[_Row]:
    """The JSON objects of a JSONL file, one per non-blank line, with their 1-based line numbers."""
    name = str(path)
    file = Path(path)
    if not file.exists():
        raise DataFormatError(f"{name}: file not found", name)
    if not file.is_file():
        raise DataFormatError(f"{name}: not a file", name)
    rows = []
    with file.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    f"{name}:{line_number}: not valid UTF-8 ({exc.reason})", name, line_number
                ) from None
            if not text.strip():
                continue
            try:
                data = json.loads(text, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as exc:
                message = f"{exc.msg} at column {exc.colno}"
                raise DataFormatError(
                    f"{name}:{line_number}: invalid JSON ({message})", name, line_number
                ) from None
            except _DuplicateKeyError as exc:
                raise DataFormatError(
                    f"{name}:{line_number}: invalid JSON ({exc})", name, line_number
                ) from None
            if not isinstance(data, dict):
                raise DataFormatError(
                    f"{name}:{line_number}: expected a JSON object, got {_type_name(data)}", name, line_number
                )
            rows.append(_Row(name, line_number, data))
    if not rows:
        raise DataFormatError(f"{name}: no rows", name)
    return rows


class _DuplicateKeyError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """Build a JSON object, refusing a repeated key (plain ``json`` would keep the last silently)."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise _DuplicateKeyError(f"key {key!r} appears twice in one object")
        data[key] = value
    return data


def _prompt_and_replies(
    row: _Row, reply_fields: tuple[str, ...], hint: str
) -> tuple[str | list[dict], dict[str, str]]:
    """Resolve the prompt and the reply strings of ``reply_fields`` (see the public readers)."""
    for field in reply_fields:
        if field not in row.data:
            raise row.missing(field, hint)
    replies: dict[str, str] = {}
    contexts: dict[str, list[dict]] = {}
    for field in reply_fields:
        replies[field], context = _reply(row, field, row.data[field])
        if context:
            contexts[field] = context
    if "prompt" in row.data:
        prompt = _prompt(row, row.data["prompt"])
        as_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        for field, context in contexts.items():
            if not _same_messages(context, as_messages):
                raise row.error(
                    field,
                    "the conversation before the final assistant reply differs from 'prompt' "
                    "(leave 'prompt' out to use the conversation as the prompt)",
                )
        return prompt, replies
    if not contexts:
        raise row.missing("prompt", hint)
    reference_field, prompt = next(iter(contexts.items()))
    for field, context in contexts.items():
        if not _same_messages(context, prompt):
            raise row.error(
                field,
                "the conversation before the final assistant reply differs from the one in "
                f"'{reference_field}'",
            )
    return prompt, replies


def _prompt(row: _Row, value: Any) -> str | list[dict]:
    """A non-empty prompt string, or a list of messages with a non-empty system or user message."""
    if isinstance(value, str):
        if not value.strip():
            raise row.error("prompt", "empty prompt")
        return value
    if isinstance(value, list):
        messages = _messages(row, "prompt", value)
        if not _has_instruction(messages):
            raise row.error("prompt", "no non-empty system or user message")
        return messages
    raise row.error("prompt", f"expected a string or a list of messages, got {_type_name(value)}")


def _reply(row: _Row, field: str, value: Any) -> tuple[str, list[dict]]:
    """The final assistant reply of ``value`` and the messages before it (empty for a bare reply)."""
    if isinstance(value, str):
        if not value.strip():
            raise row.error(field, "empty reply")
        return value, []
    if not isinstance(value, list):
        raise row.error(field, f"expected a string or a list of messages, got {_type_name(value)}")
    messages = _messages(row, field, value)
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise row.error(
            f"{field}[{last}].role",
            f"the last message must be the assistant reply, got {messages[last]['role']!r}",
        )
    if not messages[last]["content"].strip():
        raise row.error(f"{field}[{last}].content", "empty reply")
    context = messages[:last]
    if context and not _has_instruction(context):
        raise row.error(field, "no non-empty system or user message before the final assistant reply")
    return messages[last]["content"], context


def _messages(row: _Row, field: str, value: list) -> list[dict]:
    """Check a list of ``{"role", "content"}`` messages; returns shallow copies of them."""
    if not value:
        raise row.error(field, "expected at least one message, got an empty list")
    messages = []
    for index, message in enumerate(value):
        name = f"{field}[{index}]"
        if not isinstance(message, dict):
            raise row.error(name, f"expected a message object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise row.missing(f"{name}.{key}", "a message needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise row.error(
                f"{name}.role", f"expected one of {', '.join(map(repr, ROLES))}, got {message['role']!r}"
            )
        if not isinstance(message["content"], str):
            raise row.error(f"{name}.content", f"expected a string, got {_type_name(message['content'])}")
        messages.append(dict(message))
    return messages


def _has_instruction(messages: list[dict]) -> bool:
    return any(m["role"] != "assistant" and m["content"].strip() for m in messages)


def _same_messages(a: list[dict], b: list[dict]) -> bool:
    """Equal roles and contents, ignoring any other keys of the messages."""
    return [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)
