"""PNG plots of a report: steps histograms, throughput per worker over time, accuracy against steps."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

_TIME_BINS = 60  # throughput plot resolution: at most this many bins over the run


def _pyplot():
    """matplotlib.pyplot on the Agg backend (imported lazily: reports without plots never pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write a figure as PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    _pyplot().close(fig)
    return path


def plot_histogram(counts: np.ndarray, path: str | Path, title: str, xlabel: str,
                   budget: float | None = None) -> Path:
    """Bar histogram of integer values from their counts (index = value), budget and its thirds marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    values = np.arange(len(counts))
    ax.bar(values, counts, width=1.0, color="tab:blue", edgecolor="none")
    if budget:
        ax.axvline(budget, color="tab:red", linestyle="--", label=f"budget {budget:g}")
        for k in (1, 2):  # a 1-based step s lies in third floor(3 (s - 1) / budget): edges at budget k/3 + 1/2
            ax.axvline(budget * k / 3 + 0.5, color="grey", linestyle=":", label="thirds" if k == 1 else None)
        ax.legend(fontsize="small")
    if not counts.any():
        ax.text(0.5, 0.5, "no rows", transform=ax.transAxes, ha="center", va="center")
    ax.set(title=title, xlabel=xlabel, ylabel="rows")
    return _save(fig, Path(path))


def throughput_series(per_second: Counter, start: float, end: float, bins: int = _TIME_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres in seconds since start, rows/s in each bin) from a second -> rows counter."""
    width = max((end - start) / bins, 1.0)
    edges = np.arange(start, end + width, width)
    if len(edges) < 2:
        edges = np.array([start, start + width])
    secs = np.fromiter(per_second.keys(), float, len(per_second))
    rows = np.fromiter(per_second.values(), float, len(per_second))
    hist, _ = np.histogram(secs + 0.5, bins=edges, weights=rows)  # +0.5: a second counts at its middle
    return (edges[:-1] + edges[1:]) / 2 - start, hist / width


def plot_throughput(timeline: dict[str, Counter], path: str | Path, start: float | None = None) -> Path:
    """Rows/s per worker over time since the job start (from each row's finished_at)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    seconds = [s for c in timeline.values() for s in c]
    if seconds:
        t0 = min([start] + seconds) if start is not None else min(seconds)
        t1 = max(seconds) + 1
        for worker, per_second in sorted(timeline.items()):
            x, y = throughput_series(per_second, t0, t1)
            ax.step(x, y, where="mid", label=str(worker))
        ax.legend(title="worker", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no finish times", transform=ax.transAxes, ha="center", va="center")
    ax.set(title="Throughput per worker", xlabel="seconds since start", ylabel="rows/s")
    return _save(fig, Path(path))


def plot_accuracy_vs_steps(labels: Sequence[str], mean_steps: Sequence[float], accuracy: Sequence[float],
                           path: str | Path) -> Path:
    """One point per run: mean steps used (x) against accuracy (y), labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(mean_steps, [100 * a for a in accuracy], "o", color="tab:blue")
    for label, x, y in zip(labels, mean_steps, accuracy):
        ax.annotate(label, (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.set(title="Accuracy against mean steps", xlabel="mean steps used", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
