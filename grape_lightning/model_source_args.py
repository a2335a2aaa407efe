"""Pointing a config at another model from the command line replaces the model's source.

A :class:`~grape_lightning.models.spec.ModelSpec` takes its weights from exactly one of
``name_or_path`` and ``config`` (a model built from scratch, with a ``tokenizer`` of its own).
jsonargparse merges a command-line value into the YAML's, so

    grape fit --config configs/sft.yaml --model.init_args.policy '{"name_or_path": "Qwen/Qwen2.5-0.5B"}'

would keep the YAML's ``config`` and ``tokenizer`` next to the new ``name_or_path``. Naming one
source on the command line therefore clears the other, and a new ``name_or_path`` also clears the
``tokenizer`` (it then follows the model), unless the same argument sets them. Every other field
(``dtype``, ``lora``, ...) still merges as usual.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import yaml

_OTHER_SOURCE = {"name_or_path": ("config", "tokenizer"), "config": ("name_or_path",)}


def _cleared(fields: set[str]) -> list[str]:
    """The fields a value naming ``fields`` clears."""
    for source, others in _OTHER_SOURCE.items():
        if source in fields and not ({"name_or_path", "config"} - {source}) & fields:
            return [other for other in others if other not in fields]
    return []


def replace_model_sources(argv: Sequence[str]) -> list[str]:
    """``argv`` with the model-source rule above applied to mapping values (``--x.policy '{...}'``)
    and dotted flags (``--x.policy.name_or_path ...``)."""
    out: list[str] = []
    args = list(argv)
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("--"):
            out.append(arg)
            continue
        key, has_inline, value = arg.partition("=")
        original = [arg]
        if not has_inline:
            if index >= len(args) or args[index].startswith("--"):
                out.append(arg)
                continue
            value = args[index]
            original.append(value)
            index += 1
        prefix, _, last = key.rpartition(".")
        if last in _OTHER_SOURCE and prefix and value.strip() not in ("null", "None", "~", ""):
            out += [key, value] + [item for other in _cleared({last}) for item in (f"{prefix}.{other}", "null")]
            continue
        if value.lstrip().startswith("{"):
            try:
                mapping = yaml.safe_load(value)
            except yaml.YAMLError:
                mapping = None
            if isinstance(mapping, dict) and _cleared(set(mapping)):
                mapping.update({other: None for other in _cleared(set(mapping))})
                out += [key, json.dumps(mapping)]
                continue
        out += original  # untouched, as written: ``--print_config=comments`` must keep its "="
    return out
