"""GRAPE rubrics: per category, weighted items that are verified, judged by a critic, or scored
by a reward model. Loaded from YAML with errors that name the file, the line and the key.

    default_category: math          # for prompts whose metadata has no known "category"
    categories:
      math:
        - name: correct
          weight: 1.0
          kind: verifiable
          check: numeric_match      # exact_match | numeric_match | regex | json_schema | python | unit_tests
        - name: plain_answer
          weight: 0.3
          kind: judged
          critic: local             # a critic named in the module's `critics`
          question: Is the response only the final number, with nothing else?
        - name: preferred
          weight: 0.5
          kind: reward_model
          path: runs/reward_model/version_0/hf

Check parameters: ``regex`` takes ``pattern``; ``json_schema`` takes ``schema`` (a JSON-schema
object); ``python`` takes ``function`` ("package.module:function"); ``unit_tests`` takes ``tests``
(Python source run after the response's code; otherwise the metadata's ``tests``), ``timeout``
(seconds), ``memory_mb`` and ``allow_unsandboxed`` (see :class:`~grape_lightning.rewards.UnitTests`:
model output runs only inside an OS-level sandbox unless this is set); ``exact_match`` / ``numeric_match`` read ``answer_key`` (default "answer").
A ``reward_model`` item may name its ``tokenizer`` (default: the model's own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

ItemKind = Literal["verifiable", "judged", "reward_model"]
CHECKS = ("exact_match", "numeric_match", "regex", "json_schema", "python", "unit_tests")
_ITEM_KEYS = {
    "verifiable": {"check", "pattern", "schema", "function", "tests", "timeout", "memory_mb", "allow_unsandboxed", "answer_key", "tolerance"},
    "judged": {"critic", "question"},
    "reward_model": {"path", "tokenizer"},
}
_REQUIRED_PARAMS = {"regex": "pattern", "json_schema": "schema", "python": "function"}


class RubricError(ValueError):
    """A rubric file that does not validate; the message names the file, line and key."""


@dataclass(frozen=True)
class RubricItem:
    name: str
    weight: float
    kind: ItemKind
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def check(self) -> str | None:
        return self.params.get("check")


@dataclass
class Rubric:
    categories: dict[str, list[RubricItem]]
    default_category: str | None = None
    source: str = "<rubric>"

    def category_of(self, metadata: dict[str, Any]) -> str:
        category = metadata.get("category")
        if category in self.categories:
            return category
        if self.default_category is not None:
            return self.default_category
        raise KeyError(f"{self.source}: no rubric category {category!r} and no default_category")

    @property
    def item_keys(self) -> list[tuple[str, RubricItem]]:
        """Every (category, item) in file order: the columns of the score matrices."""
        return [(category, item) for category, items in self.categories.items() for item in items]


# -- loading ---------------------------------------------------------------------------------------
class _Located:
    """A parsed YAML value with the line of each key, for error messages."""

    def __init__(self, node: Node, path: str, where: str) -> None:
        self.node, self.path, self.where = node, path, where

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def error(self, message: str) -> RubricError:
        return RubricError(f"{self.path}:{self.line}: {self.where}: {message}")

    def mapping(self) -> dict[str, _Located]:
        if not isinstance(self.node, MappingNode):
            raise self.error("expected a mapping")
        out: dict[str, _Located] = {}
        for key_node, value_node in self.node.value:
            key = str(key_node.value)
            if key in out:
                raise RubricError(f"{self.path}:{key_node.start_mark.line + 1}: {self.where}.{key}: duplicate key")
            out[key] = _Located(value_node, self.path, f"{self.where}.{key}" if self.where else key)
        return out

    def sequence(self) -> list[_Located]:
        if not isinstance(self.node, SequenceNode):
            raise self.error("expected a list")
        return [_Located(node, self.path, f"{self.where}[{i}]") for i, node in enumerate(self.node.value)]

    def value(self) -> Any:
        if isinstance(self.node, ScalarNode):
            return SafeConstructor().construct_object(self.node)
        constructor = SafeConstructor()
        return constructor.construct_document(self.node)

    def string(self) -> str:
        value = self.value()
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"expected a non-empty string, got {value!r}")
        return value


def _item(located: _Located) -> RubricItem:
    fields = located.mapping()
    for required in ("name", "weight", "kind"):
        if required not in fields:
            raise located.error(f"missing key '{required}'")
    name = fields["name"].string()
    weight = fields["weight"].value()
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise fields["weight"].error(f"expected a number >= 0, got {weight!r}")
    kind = fields["kind"].value()
    if kind not in _ITEM_KEYS:
        raise fields["kind"].error(f"expected one of {sorted(_ITEM_KEYS)}, got {kind!r}")
    params: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("name", "weight", "kind"):
            continue
        if key not in _ITEM_KEYS[kind]:
            raise value.error(f"unknown key for a {kind} item (allowed: {sorted(_ITEM_KEYS[kind])})")
        params[key] = value.value()
    if kind == "verifiable":
        if params.get("check") not in CHECKS:
            where = fields.get("check", located)
            raise where.error(f"'check' must be one of {list(CHECKS)}, got {params.get('check')!r}")
        needed = _REQUIRED_PARAMS.get(params["check"])
        if needed and needed not in params:
            raise located.error(f"check '{params['check']}' needs '{needed}'")
    elif kind == "judged":
        for needed in ("critic", "question"):
            if needed not in params:
                raise located.error(f"a judged item needs '{needed}'")
    elif "path" not in params:
        raise located.error("a reward_model item needs 'path'")
    return RubricItem(name=name, weight=float(weight), kind=kind, params=params)


def load_rubric(path: str | Path) -> Rubric:
    """Parse and validate a rubric YAML file (see the module docstring for the format)."""
    path = str(path)
    if not Path(path).is_file():
        raise RubricError(f"{path}: file not found")
    try:
        root_node = yaml.compose(Path(path).read_text())
    except yaml.YAMLError as error:
        raise RubricError(f"{path}: invalid YAML ({error})") from error
    if root_node is None:
        raise RubricError(f"{path}: empty rubric")
    root = _Located(root_node, path, "").mapping()
    for key, value in root.items():
        if key not in ("categories", "default_category"):
            raise value.error("unknown top-level key (allowed: categories, default_category)")
    if "categories" not in root:
        raise RubricError(f"{path}:1: missing key 'categories'")
    categories: dict[str, list[RubricItem]] = {}
    for category, located_items in root["categories"].mapping().items():
        items = [_item(item) for item in located_items.sequence()]
        if not items:
            raise located_items.error("a category needs at least one item")
        names = [item.name for item in items]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise located_items.error(f"duplicate item name {duplicates[0]!r}")
        if sum(item.weight for item in items) <= 0:
            raise located_items.error("item weights must not all be 0")
        categories[category] = items
    default = root["default_category"].string() if "default_category" in root else None
    if default is not None and default not in categories:
        raise root["default_category"].error(f"{default!r} is not a category ({sorted(categories)})")
    return Rubric(categories=categories, default_category=default, source=path)
