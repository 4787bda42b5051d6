"""Scorers that judge a completion: exact match, GSM8K final number, the synthetic tasks' own."""
from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, Sequence

# A number as GSM8K writes it: optional sign, thousands commas, optional decimals.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


class ScorerError(ValueError):
    """A scorer was named that does not exist, or cannot run on this output."""


def normalize_text(text: str | None) -> str:
    """Whitespace-collapsed, stripped text ('' for None)."""
    return " ".join((text or "").split())


def exact_match(completion: str | None, answer: str | None) -> bool:
    """True when completion and answer agree after whitespace normalisation."""
    return answer is not None and normalize_text(completion) == normalize_text(answer)


def final_number(text: str | None) -> Decimal | None:
    """The last number in text (commas dropped), or None when there is none."""
    matches = _NUMBER.findall(text or "")
    for raw in reversed(matches):
        try:
            return Decimal(raw.replace(",", "").rstrip("."))
        except InvalidOperation:  # e.g. a lone "," run; try the number before it
            continue
    return None


def gsm8k_reference(answer: str | None) -> Decimal | None:
    """The reference number of a GSM8K answer: after '####' when present, else its last number."""
    if answer is None:
        return None
    _, sep, tail = str(answer).rpartition("####")
    return final_number(tail if sep else str(answer))


def gsm8k_match(completion: str | None, answer: str | None) -> bool:
    """True when the completion's final number equals the reference answer's number."""
    ref = gsm8k_reference(answer)
    got = final_number(completion)
    return ref is not None and got is not None and got == ref


@dataclass(frozen=True)
class Scorer:
    """A named scorer: which row fields it reads and a batch function returning one bool a row."""

    name: str
    needs_answer: bool   # reads the reference answer column
    needs_task: bool     # reads the per-row task column (and the prompt)
    score_batch: Callable[[dict[str, Sequence]], list[bool]]


def _pairwise(fn: Callable[[str | None, str | None], bool]) -> Callable[[dict[str, Sequence]], list[bool]]:
    """Lift a (completion, answer) -> bool function to a batch of columns."""
    return lambda cols: [fn(c, a) for c, a in zip(cols["completion"], cols["answer"])]


def _task_batch(cols: dict[str, Sequence]) -> list[bool]:
    """Score each row with the scorer of the synthetic task named in its task column."""
    from prophet.tasks import get_task  # the tasks package is optional until a task scorer is asked for

    cache: dict[str, object] = {}
    out = []
    for prompt, completion, task in zip(cols["prompt"], cols["completion"], cols["task"]):
        if task is None:
            out.append(False)
            continue
        if task not in cache:
            try:
                cache[task] = get_task(task)
            except (KeyError, ValueError) as exc:
                raise ScorerError(f"scorer 'task': row names task {task!r}, which prophet.tasks does not "
                                  f"know ({exc}); use --scorer exact or gsm8k, or fix the task column") from exc
        try:
            out.append(bool(cache[task].score(prompt, completion or "")))
        except ValueError as exc:  # the prompt is not one of this task's: the task column is wrong
            raise ScorerError(f"scorer 'task': task {task!r} cannot score prompt {prompt!r} ({exc}); "
                              "check the task column, or use --scorer exact/gsm8k/none") from exc
    return out


SCORERS: dict[str, Scorer] = {
    "exact": Scorer("exact", needs_answer=True, needs_task=False, score_batch=_pairwise(exact_match)),
    "gsm8k": Scorer("gsm8k", needs_answer=True, needs_task=False, score_batch=_pairwise(gsm8k_match)),
    "task": Scorer("task", needs_answer=False, needs_task=True, score_batch=_task_batch),
}


def get_scorer(name: str) -> Scorer:
    """The scorer called name; ScorerError lists the known ones otherwise."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ScorerError(f"unknown scorer {name!r}: choose one of {sorted(SCORERS)}") from None
