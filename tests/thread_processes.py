"""Threads standing in for processes, for checking cross-process reductions without a process group."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


class ThreadSum:
    """An all-reduce (sum) between threads standing in for processes: each deposits its tensor,
    all wait, every one adds them up in rank order."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.slots: dict[int, torch.Tensor] = {}

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[r] for r in sorted(self.slots))
            self.barrier.wait()
            return total

        return reduce


def run_ranks(world_size: int, work: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], object]) -> list:
    """``work(rank, sum_across)`` on ``world_size`` threads; their results in rank order."""
    reduce = ThreadSum(world_size)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(rank, reduce.for_rank(rank))
        except BaseException as error:  # noqa: BLE001  re-raised in the caller
            errors.append(error)
            reduce.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
