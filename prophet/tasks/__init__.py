"""Checkable synthetic tasks for the tiny trained DLMs: generators, scorers, stable splits.

    from prophet.tasks import get_task
    task = get_task("sudoku4")
    ex = task.examples("test", 100, seed=0)[0]
    task.score(ex.prompt, ex.answer)  # True
"""
from __future__ import annotations

from prophet.tasks.base import SPLITS, Budget, Example, Split, Task, bucket
from prophet.tasks.running_sums import RunningSums, running_parity
from prophet.tasks.sudoku import Sudoku4

TASKS: dict[str, Task] = {t.name: t for t in (Sudoku4(), running_parity())}

# Every character a task prompt or answer may hold; the char tokenizer covers these.
ALPHABET = "0123456789.:=SX"


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["ALPHABET", "SPLITS", "TASKS", "Budget", "Example", "RunningSums", "Split", "Task", "bucket", "get_task"]
