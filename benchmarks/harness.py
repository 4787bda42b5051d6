"""What every benchmark section shares: timing that load on a shared machine cannot skew, and tables.

Timing takes the best (least disturbed) of several runs, and where cases are compared their runs
are interleaved (a, b, a, b, ...) so that load from other processes hits every case alike; CPU
seconds of the process are kept beside wall seconds as the cross-check load cannot skew. On a
GPU a timing waits for the device (`sync`), not just for the launch.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Hashable, Mapping, Sequence, TypeVar

import torch

from prophet import DecodeConfig, DecodeResult, decode
from prophet.types import DLM

ROOT = Path(__file__).resolve().parents[1]
TINY_LLADA = ROOT / "checkpoints" / "tiny-llada"  # the shipped trained tiny LLaDA (jobs/train_tiny.py)

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Best wall seconds of fn() over `repeats` runs after `warmup` untimed ones, device work included."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@dataclass
class Timing(Generic[R]):
    """Best wall and process-CPU seconds of one case over the repeats, and its last result."""

    wall_s: float
    cpu_s: float
    result: R


def interleaved(cases: Mapping[K, Callable[[], R]], repeats: int) -> dict[K, Timing[R]]:
    """Run every case once per repeat, in order, and keep each one's best times and last result."""
    wall: dict[K, float] = {k: float("inf") for k in cases}
    cpu: dict[K, float] = {k: float("inf") for k in cases}
    last: dict[K, R] = {}
    for _ in range(repeats):
        for key, fn in cases.items():
            t0, c0 = time.perf_counter(), time.process_time()
            last[key] = fn()
            wall[key] = min(wall[key], time.perf_counter() - t0)
            cpu[key] = min(cpu[key], time.process_time() - c0)
    return {k: Timing(wall[k], cpu[k], last[k]) for k in cases}


def timed_pair(model: DLM, prompts: Sequence[Sequence[int]], a: DecodeConfig, b: DecodeConfig,
               repeats: int) -> list[tuple[float, float, DecodeResult]]:
    """Best wall and process-CPU seconds and the result of decoding the prompts under a and b, interleaved."""
    runs = interleaved({"a": lambda: decode(model, prompts, a), "b": lambda: decode(model, prompts, b)}, repeats)
    return [(t.wall_s, t.cpu_s, t.result) for t in runs.values()]


_SPEC = re.compile(r"([<>^]?)(\d*)")


class Table:
    """Fixed-width columns for a section's printed table, indented two spaces.

    Each column is (title, format spec of its cells): "<11" a left-aligned text, "8.2f" a number.
    Titles align as their cells do (numbers right); a None cell prints as a right-aligned "-".
    """

    def __init__(self, *columns: tuple[str, str]) -> None:
        self.columns = columns

    def header(self) -> str:
        """The line of titles."""
        cells = []
        for title, spec in self.columns:
            align, width = _SPEC.match(spec).groups()  # type: ignore[union-attr]
            cells.append(f"{title:{'<' if align == '<' else '>'}{width}}")
        return "  " + " ".join(cells)

    def row(self, *values: Any) -> str:
        """One line of cells, in the columns' order."""
        cells = []
        for (_, spec), value in zip(self.columns, values, strict=True):
            width = _SPEC.match(spec).group(2)  # type: ignore[union-attr]
            cells.append(f"{'-':>{width}}" if value is None else f"{value:{spec}}")
        return "  " + " ".join(cells)

    def print(self, rows: Sequence[Sequence[Any]]) -> None:
        """Print the header and every row."""
        print(self.header())
        for values in rows:
            print(self.row(*values))
