"""What every DataModule of the library shares: the tokenizer link to the model and resumable loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from grape_lightning.data.tasks import Task

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from grape_lightning.data.formatting import uses_chat_template
from grape_lightning.data.resumable_loader import ResumableDataLoader
from grape_lightning.models.spec import trained_model_spec


class TokenizedDataModule(L.LightningDataModule):
    """Base DataModule.

    Data comes from a built-in ``task`` or from ``train_file`` / ``val_file`` (JSONL).
    The ``grape`` command links ``tokenizer`` and ``chat_template`` to the trained model's spec, so
    one field of the YAML (the model's) sets both. In Python, ``tokenizer=None`` takes the tokenizer
    (and chat-template choice) of the LightningModule being trained; a name loads that tokenizer,
    or takes the trained module's own when it is the one the module's spec names.
    Loaders shuffle by (seed, epoch), shard by rank, and resume mid-epoch from a checkpoint.

    Args:
        task: a built-in procedural task (``ArithmeticTask``, ``ReverseTask``) supplying the data.
        train_file: JSONL file of training rows (replaces the task's training data).
        val_file: JSONL file of validation rows.
        tokenizer: tokenizer to load (None: the trained module's; the ``grape`` command links it to
            the trained model's).
        chat_template: None: the module's choice; True: format prompts with the chat template; False:
            plain text (the ``grape`` command links it to the trained model's spec).
        batch_size: rows (prompts for rollouts) per training batch and process.
        val_batch_size: rows per validation batch (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling order (shuffled afresh each epoch by (seed, epoch)).
    """

    reference_field: str | None = None
    """The reply of a row that can serve as its reference answer (``reference_rows``), if any."""

    def __init__(
        self,
        task: Task | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        tokenizer: str | None = None,
        chat_template: bool | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task is None and train_file is None:
            raise ValueError(f"{type(self).__name__} needs a built-in 'task' or a 'train_file'")
        self.task = task
        self.train_file = train_file
        self.val_file = val_file
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer_name = tokenizer
        self.chat_template_choice = chat_template
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._chat_template: bool | None = None
        self._reference_rows: dict[str, list[dict[str, Any]]] = {}
        self.num_lossy = 0  # texts that do not decode back to themselves (see ``note_lossy``)
        self._first_lossy: str | None = None

    def split_rows(
        self, split: str, read_file: Callable[[str], list[dict[str, Any]]], task_rows: Callable[[str], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Rows of ``split``: read from ``train_file`` / ``val_file`` when given, else the built-in
        task's. Validation comes from the task only when no ``train_file`` replaces it."""
        path = self.train_file if split == "train" else self.val_file
        if path is not None:
            return read_file(path)
        if self.task is not None and (split == "train" or self.train_file is None):
            return task_rows(split)
        return []

    def from_task(self, split: str) -> bool:
        """Whether the built-in task (rather than a file) supplies the rows of ``split``."""
        path = self.train_file if split == "train" else self.val_file
        return self.task is not None and path is None and (split == "train" or self.train_file is None)

    def _rows(self, split: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def reference_rows(self, split: str = "val") -> list[dict[str, Any]]:
        """The rows of ``split`` as ``{"prompt", "metadata"}`` for greedy evaluation, with the
        reference answer in ``metadata["answer"]``: the row's own ``answer`` field when it has one,
        else its reply named by ``reference_field`` (an SFT completion, a preferred response)."""
        if split not in self._reference_rows:
            rows = self._rows(split)
            default = (lambda row: {"answer": row[self.reference_field]}) if self.reference_field else (lambda row: {})
            self._reference_rows[split] = [{"prompt": row["prompt"], "metadata": {**default(row), **row["metadata"]}} for row in rows]
        return self._reference_rows[split]

    def set_tokenizer(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool | None = None) -> None:
        """Use this tokenizer (for code that drives the DataModule without a Trainer)."""
        self._tokenizer = tokenizer
        self._chat_template = uses_chat_template(tokenizer, chat_template)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._resolve_tokenizer()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def chat_template(self) -> bool:
        if self._chat_template is None:
            self._resolve_tokenizer()
        return bool(self._chat_template)

    def _resolve_tokenizer(self) -> None:
        module = self.trainer.lightning_module if self.trainer is not None else None
        trained = getattr(module, "tokenizer", None)
        spec = trained_model_spec(module.hparams) if module is not None else None
        # The trained module's own tokenizer when it is the one named (as the ``grape`` command links
        # it): loaded once, with the spec's revision and trust_remote_code.
        same = trained is not None and spec is not None and spec.tokenizer_name == self.tokenizer_name
        if self.tokenizer_name is not None and not same:
            from grape_lightning.models.loading import load_tokenizer

            self.set_tokenizer(load_tokenizer(self.tokenizer_name), self.chat_template_choice)
            return
        if trained is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: give 'tokenizer', attach it to a Trainer with a "
                "grape_lightning module, or call set_tokenizer()"
            )
        choice = self.chat_template_choice
        if choice is None and spec is not None:
            choice = spec.chat_template
        self.set_tokenizer(trained, choice)

    def note_lossy(self, text: Any, ids: list[int], row: dict[str, Any]) -> None:
        """Count ``text`` if its ids do not decode back to it: characters outside the tokenizer's
        vocabulary are lost (a tab or non-ASCII text under the character tokenizer). Plain-text
        prompts and replies only; a chat template rewrites the text anyway."""
        if not isinstance(text, str) or self.chat_template:
            return
        eos = self.tokenizer.eos_token_id
        body = ids[:-1] if ids and ids[-1] == eos and not text.endswith(str(self.tokenizer.eos_token)) else ids
        if self.tokenizer.decode(body) != text:
            self.num_lossy += 1
            self._first_lossy = self._first_lossy or f"{row['metadata'].get('source', 'task row')}: {text[:60]!r}"

    def report_lossy(self) -> None:
        if self.num_lossy:
            rank_zero_warn(
                f"{type(self).__name__}: {self.num_lossy} texts lose characters in tokenization (first: "
                f"{self._first_lossy}); the model never sees those characters"
            )

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def make_loader(
        self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any], *, train: bool
    ) -> ResumableDataLoader:
        world_size, rank = self._world()
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size if train else self.val_batch_size,
            collate_fn=collate_fn,
            shuffle=train,
            seed=self.seed,
            num_replicas=world_size,
            rank=rank,
            num_workers=self.num_workers,
        )
