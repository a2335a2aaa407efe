"""SFT data: prompt/completion pairs from a built-in task or JSONL files, tokenised and optionally packed."""

from __future__ import annotations

from functools import partial

from lightning.pytorch.utilities import rank_zero_info

from grape_lightning.data.base import TokenizedDataModule
from grape_lightning.data.collate import collate_packed, collate_prompt_completion, pack_rows
from grape_lightning.data.formatting import encode_completion
from grape_lightning.data.jsonl import read_completion_rows
from grape_lightning.data.resumable_loader import ResumableDataLoader
from grape_lightning.data.tasks import Task


class SFTDataModule(TokenizedDataModule):
    """Prompt/completion pairs for :class:`~grape_lightning.algorithms.sft.SFTModule`.

    Sources: a built-in ``task`` (its demonstrations) or ``train_file`` / ``val_file`` JSONL with
    ``prompt``/``completion`` or chat ``messages`` rows; files win over the task when given.

    Truncation: a pair longer than ``max_length`` keeps its whole prompt and loses the end of its
    completion; a pair whose prompt alone fills ``max_length`` is skipped. Both are counted and
    reported (``num_truncated``, ``num_skipped``).

    Packing (``pack=True``) concatenates pairs into rows of ``max_length`` tokens with positions
    restarting per pair, so attention never crosses pairs and no compute goes to padding.

    Args:
        max_length: most tokens of a prompt/completion pair (or of a packed row).
        pack: pack pairs into rows of ``max_length`` tokens, attention kept within each pair.
    """

    reference_field = "completion"

    def __init__(
        self,
        task: Task | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        max_length: int = 512,
        pack: bool = False,
        tokenizer: str | None = None,
        chat_template: bool | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(task, train_file, val_file, tokenizer, chat_template, batch_size, val_batch_size, num_workers, seed)
        self.max_length = max_length
        self.pack = pack
        self.num_truncated = 0
        self.num_skipped = 0
        self.train_pairs: list[tuple[list[int], list[int]]] = []
        self.val_pairs: list[tuple[list[int], list[int]]] = []

    def _rows(self, split: str) -> list[dict]:
        return self.split_rows(split, read_completion_rows, lambda s: self.task.sft_rows(s))  # type: ignore[union-attr]

    def _encode(self, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
        pairs = []
        for row in rows:
            prompt_ids, completion_ids = encode_completion(self.tokenizer, row["prompt"], row["completion"], self.chat_template)
            self.note_lossy(row["prompt"], prompt_ids, row)
            self.note_lossy(row["completion"], completion_ids, row)
            if len(prompt_ids) >= self.max_length:
                self.num_skipped += 1
                continue
            if len(prompt_ids) + len(completion_ids) > self.max_length:
                self.num_truncated += 1
                completion_ids = completion_ids[: self.max_length - len(prompt_ids)]
            pairs.append((prompt_ids, completion_ids))
        return pairs

    def setup(self, stage: str | None = None) -> None:
        if self.train_pairs:
            return
        self.train_pairs = self._encode(self._rows("train"))
        self.val_pairs = self._encode(self._rows("val"))
        if not self.train_pairs:
            raise ValueError(f"no training pairs fit in max_length={self.max_length} ({self.num_skipped} skipped)")
        rank_zero_info(
            f"SFT data: {len(self.train_pairs)} train / {len(self.val_pairs)} val pairs; "
            f"{self.num_truncated} truncated, {self.num_skipped} skipped (max_length={self.max_length})"
        )
        self.report_lossy()

    def _loader(self, pairs: list[tuple[list[int], list[int]]], train: bool) -> ResumableDataLoader:
        pad = self.tokenizer.pad_token_id
        if self.pack:
            return self.make_loader(pack_rows(pairs, self.max_length), partial(collate_packed, pad_token_id=pad), train=train)
        return self.make_loader(pairs, partial(collate_prompt_completion, pad_token_id=pad), train=train)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_pairs, train=True)

    def val_dataloader(self) -> ResumableDataLoader | list:
        return self._loader(self.val_pairs, train=False) if self.val_pairs else []
