"""Built-in procedural tasks, generated offline and deterministically from a seed."""

from __future__ import annotations

from grape_lightning.data.tasks.arithmetic import ArithmeticTask
from grape_lightning.data.tasks.base import Example, Task
from grape_lightning.data.tasks.reverse import ReverseTask
from grape_lightning.data.tasks.sort import SortTask
from grape_lightning.data.tasks.word_problem import WordProblemTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (ArithmeticTask, ReverseTask, SortTask, WordProblemTask)
}


def build_task(name: str, **kwargs) -> Task:
    """Instantiate the built-in task registered as ``name`` with ``kwargs`` (seed, sizes, options)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "ArithmeticTask", "Example", "ReverseTask", "SortTask", "Task", "WordProblemTask", "build_task"]
