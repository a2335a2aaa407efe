"""Prompt batches for on-policy algorithms: each prompt with its metadata, repeated per group."""

from __future__ import annotations

from functools import partial
from typing import Any

from lightning.pytorch.utilities import rank_zero_info
import torch

from grape_lightning.data.base import TokenizedDataModule
from grape_lightning.data.formatting import Prompt, encode_prompt
from grape_lightning.data.jsonl import read_prompt_rows
from grape_lightning.data.resumable_loader import ResumableDataLoader
from grape_lightning.data.tasks import Task


def prompt_text(prompt: Prompt) -> str:
    """What reward functions see as the prompt: the string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    user_turns = [message["content"] for message in prompt if message.get("role") == "user"]
    return user_turns[-1] if user_turns else prompt[-1]["content"]


def collate_prompts(items: list[dict[str, Any]], group_size: int) -> dict[str, Any]:
    """Repeat every prompt ``group_size`` times, consecutively; ``groups[i]`` names i's prompt."""
    repeated = [item for item in items for _ in range(group_size)]
    return {
        "prompt_ids": [item["prompt_ids"] for item in repeated],
        "prompts": [item["prompt_text"] for item in repeated],
        "metadata": [item["metadata"] for item in repeated],
        "groups": torch.arange(len(items)).repeat_interleave(group_size),
    }


class RolloutDataModule(TokenizedDataModule):
    """Prompts from a built-in ``task`` or JSONL files (``{"prompt": ..., <metadata>}`` rows).

    A training batch holds ``batch_size`` prompts, each repeated ``group_size`` times (G samples
    per prompt for GRPO, GRAPE, RLOO, best-of-n). Validation batches hold each validation prompt
    once (evaluated with greedy decoding by the algorithm). Prompts longer than
    ``max_prompt_length`` tokens are skipped and counted (``num_skipped``).

    Metadata carries everything a reward needs: for built-in tasks the reference ``answer``, the
    ``task`` and its ``category``; for JSONL rows every field but ``prompt``.

    Args:
        group_size: responses sampled per prompt (G).
        max_prompt_length: prompts longer than this many tokens are skipped and counted.
        max_val_prompts: validate on at most this many prompts (None: all).
    """

    def __init__(
        self,
        task: Task | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        group_size: int = 1,
        max_prompt_length: int = 256,
        max_val_prompts: int | None = None,
        tokenizer: str | None = None,
        chat_template: bool | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(task, train_file, val_file, tokenizer, chat_template, batch_size, val_batch_size, num_workers, seed)
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.max_prompt_length = max_prompt_length
        self.max_val_prompts = max_val_prompts
        self.num_skipped = 0
        self.train_items: list[dict[str, Any]] = []
        self.val_items: list[dict[str, Any]] = []

    def _rows(self, split: str) -> list[dict[str, Any]]:
        return self.split_rows(split, read_prompt_rows, self._task_prompts)

    def _task_prompts(self, split: str) -> list[dict[str, Any]]:
        return [{"prompt": e.prompt, "metadata": dict(e.metadata)} for e in self.task.examples(split)]  # type: ignore[union-attr]

    def _encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = []
        for row in rows:
            ids = encode_prompt(self.tokenizer, row["prompt"], self.chat_template)
            self.note_lossy(row["prompt"], ids, row)
            if len(ids) > self.max_prompt_length:
                self.num_skipped += 1
                continue
            items.append({"prompt_ids": ids, "prompt_text": prompt_text(row["prompt"]), "metadata": row["metadata"]})
        return items

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        self.train_items = self._encode(self._rows("train"))
        self.val_items = self._encode(self._rows("val"))[: self.max_val_prompts]
        if not self.train_items:
            raise ValueError(f"no training prompts fit in max_prompt_length={self.max_prompt_length}")
        rank_zero_info(
            f"Rollout prompts: {len(self.train_items)} train / {len(self.val_items)} val, "
            f"{self.num_skipped} skipped as longer than {self.max_prompt_length} tokens; group size {self.group_size}"
        )
        self.report_lossy()

    def train_dataloader(self) -> ResumableDataLoader:
        return self.make_loader(self.train_items, partial(collate_prompts, group_size=self.group_size), train=True)

    def draw_prompts(self, count: int, generator: torch.Generator) -> dict[str, Any]:
        """``count`` training prompts drawn uniformly with ``generator`` (without replacement up to
        the size of the training set), each repeated ``group_size`` times, as a training batch: the
        fresh prompts of dynamic sampling's extra rounds (:mod:`grape_lightning.rollout.dynamic_sampling`).
        The draw depends on the generator alone, not on the loader's position."""
        if not self.train_items:
            raise RuntimeError("draw_prompts: the DataModule is not set up (no training prompts)")
        size = len(self.train_items)
        order = torch.cat([torch.randperm(size, generator=generator) for _ in range(-(-count // size))])[:count]
        return collate_prompts([self.train_items[i] for i in order.tolist()], self.group_size)

    def val_dataloader(self) -> ResumableDataLoader | list:
        if not self.val_items:
            return []
        return self.make_loader(self.val_items, partial(collate_prompts, group_size=1), train=False)
