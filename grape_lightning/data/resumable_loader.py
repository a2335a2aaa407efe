"""A DataLoader whose order depends only on (seed, epoch, rank) and whose position is checkpointed.

Lightning stores ``state_dict()`` of every training DataLoader in the checkpoint and calls
``load_state_dict()`` on resume, so a run stopped mid-epoch continues with the first batch it had
not yet trained on, in the same order, instead of starting the epoch over.

The position is stored as the number of examples all ranks together have taken from the epoch's
permutation (rank r of W takes positions r, r + W, r + 2W, ...: after k batches of B each, the
ranks together have taken the first k B W). A run resumed on another number of processes, or
with another batch size, therefore continues right after the examples already trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle seeded by seed + epoch, one shard per rank) that can start mid-epoch.

    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of replacing it.
    """

    def __init__(
        self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)  # type: ignore[arg-type]
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start_index :]
        self.start_index = 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """Counts the batches it has handed out this epoch; restores that count from a checkpoint.

    Lightning fetches no batch ahead from a loader whose length is known, so "handed out" equals
    "trained on" when the checkpoint is written.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        sampler = ResumableSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            drop_last=drop_last,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        self._batches_done = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._batches_done, self._resume_at = self._resume_at, 0
        self.sampler.start_index = self._batches_done * self.batch_size  # type: ignore[attr-defined, operator]
        for batch in super().__iter__():
            self._batches_done += 1
            yield batch

    def rewind(self, batches: int) -> None:
        """Count ``batches`` fewer batches as handed out (more if negative): a checkpoint written while
        a batch was being trained, before it changed anything, then resumes with that batch."""
        self._batches_done -= batches

    def state_dict(self) -> dict[str, int]:
        replicas = self.sampler.num_replicas  # type: ignore[attr-defined]
        return {
            "epoch": self.sampler.epoch,  # type: ignore[attr-defined]
            "batches_done": self._batches_done,
            "examples_done": self._batches_done * self.batch_size * replicas,  # type: ignore[operator]
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Written by a run with the same world size and batch size, both counts agree; otherwise the
        # examples taken by all ranks decide, rounded down to whole batches of this run (a few
        # examples may then be seen twice, none skipped).
        examples = state.get("examples_done")
        per_batch = self.batch_size * self.sampler.num_replicas  # type: ignore[operator, attr-defined]
        batches = state["batches_done"] if examples is None else examples // per_batch
        # A checkpoint written at the end of an epoch resumes at the start of the next one.
        self._resume_at = batches if batches < len(self) else 0
