"""Preference pairs (prompt, chosen, rejected) for DPO and reward models."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from grape_lightning.data.base import TokenizedDataModule
from grape_lightning.data.collate import collate_prompt_completion
from grape_lightning.data.formatting import encode_completion
from grape_lightning.data.jsonl import read_preference_rows
from grape_lightning.data.resumable_loader import ResumableDataLoader
from grape_lightning.data.tasks import Task


def collate_pairs(items: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """One batch of 2B rows, the B chosen sequences first and then the B rejected ones, so a single
    forward pass scores both; ``pair_ids`` index the pairs in their split."""
    rows = [(i["prompt_ids"], i["chosen_ids"]) for i in items] + [(i["prompt_ids"], i["rejected_ids"]) for i in items]
    batch = collate_prompt_completion(rows, pad_token_id)
    batch["pair_ids"] = torch.tensor([item["pair_id"] for item in items])
    batch["margins"] = torch.tensor([item["margin"] for item in items], dtype=torch.float32)
    return batch


class PreferenceDataModule(TokenizedDataModule):
    """Pairs from a built-in ``task`` (its answer against a wrong answer) or JSONL files with
    ``prompt``/``chosen``/``rejected`` (strings or chat messages). The prompt/response boundary is
    exact under chat templates (see :mod:`grape_lightning.data.formatting`).

    Truncation, for a pair whose prompt plus longer response exceeds ``max_length``: the prompt
    keeps its last ``max_prompt_length`` tokens (those next to the response), then both responses
    are cut to the room left. A pair with no room left for any response token is skipped. Both
    are counted (``num_truncated``, ``num_skipped``) and reported.

    A row's optional numeric ``margin`` (in its metadata) is passed to margin-aware losses.

    Args:
        max_length: most tokens of prompt plus the longer response.
        max_prompt_length: most prompt tokens kept when a pair is too long (its last ones; None: no
            separate limit).
    """

    reference_field = "chosen"

    def __init__(
        self,
        task: Task | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
        tokenizer: str | None = None,
        chat_template: bool | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(task, train_file, val_file, tokenizer, chat_template, batch_size, val_batch_size, num_workers, seed)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length if max_prompt_length is not None else max_length // 2
        self.num_truncated = 0
        self.num_skipped = 0
        self.train_pairs: list[dict[str, Any]] = []
        self.val_pairs: list[dict[str, Any]] = []

    def _rows(self, split: str) -> list[dict]:
        return self.split_rows(split, read_preference_rows, lambda s: self.task.preference_rows(s))  # type: ignore[union-attr]

    def _encode(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        pairs = []
        for row in rows:
            prompt_ids, chosen_ids = encode_completion(self.tokenizer, row["prompt"], row["chosen"], self.chat_template)
            _, rejected_ids = encode_completion(self.tokenizer, row["prompt"], row["rejected"], self.chat_template)
            for text, ids in ((row["prompt"], prompt_ids), (row["chosen"], chosen_ids), (row["rejected"], rejected_ids)):
                self.note_lossy(text, ids, row)
            if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > self.max_length:
                prompt_ids = prompt_ids[-self.max_prompt_length :]
                room = self.max_length - len(prompt_ids)
                if room <= 0:
                    self.num_skipped += 1
                    continue
                self.num_truncated += 1
                chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            margin = float(row["metadata"].get("margin", 0.0))
            pairs.append({"pair_id": len(pairs), "prompt_ids": prompt_ids, "chosen_ids": chosen_ids,
                          "rejected_ids": rejected_ids, "margin": margin})
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs:
            return
        self.train_pairs = self._encode(self._rows("train"))
        self.val_pairs = self._encode(self._rows("val"))
        if not self.train_pairs:
            raise ValueError(f"no preference pairs fit in max_length={self.max_length} ({self.num_skipped} skipped)")
        rank_zero_info(
            f"Preference data: {len(self.train_pairs)} train / {len(self.val_pairs)} val pairs; "
            f"{self.num_truncated} truncated, {self.num_skipped} skipped (max_length={self.max_length}, "
            f"max_prompt_length={self.max_prompt_length})"
        )
        self.report_lossy()

    def _loader(self, pairs: list[dict[str, Any]], train: bool) -> ResumableDataLoader:
        return self.make_loader(pairs, partial(collate_pairs, pad_token_id=self.tokenizer.pad_token_id), train=train)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_pairs, train=True)

    def val_dataloader(self) -> ResumableDataLoader | list:
        return self._loader(self.val_pairs, train=False) if self.val_pairs else []
