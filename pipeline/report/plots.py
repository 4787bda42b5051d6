"""PNG plots of a report: steps histograms, throughput per worker over time, accuracy against steps."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from pipeline.report.scan import RunScan

PLOT_FILES = {"steps": "steps_used.png", "commit": "commit_step.png", "throughput": "throughput.png",
              "accuracy": "accuracy_vs_steps.png"}
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


def throughput_series(per_tick: Counter, tick: float, start: float, end: float,
                      bins: int = _TIME_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres in seconds since start, rows/s in each bin) from a floor(t / tick) -> rows counter."""
    width = max((end - start) / bins, tick)
    edges = start + width * np.arange(int(np.ceil((end - start) / width)) + 1)
    if len(edges) < 2:
        edges = np.array([start, start + width])
    keys = np.fromiter(per_tick.keys(), float, len(per_tick))
    rows = np.fromiter(per_tick.values(), float, len(per_tick))
    hist, _ = np.histogram((keys + 0.5) * tick, bins=edges, weights=rows)  # a tick counts at its middle
    return (edges[:-1] + edges[1:]) / 2 - start, hist / width


def plot_throughput(timeline: dict[str, Counter], tick: float, path: str | Path, start: float | None = None) -> Path:
    """Rows/s per worker over time since the job start (from each row's finished_at, binned by tick seconds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    times = [k * tick for c in timeline.values() for k in c]
    if times:
        t0 = min([start] + times) if start is not None else min(times)
        t1 = max(times) + tick
        for worker, per_tick in sorted(timeline.items()):
            x, y = throughput_series(per_tick, tick, t0, t1)
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


def write_plots(scan: RunScan, out_dir: str | Path) -> list[str]:
    """The steps-used and commit-step histograms and the per-worker throughput plot; their paths."""
    out, s = Path(out_dir), scan.report["steps"]
    return [str(p) for p in (
        plot_histogram(scan.steps_counts, out / PLOT_FILES["steps"], "Steps used (ok rows)",
                       "steps used", s["budget_mean"]),
        plot_histogram(scan.commit_counts, out / PLOT_FILES["commit"], "Commit step (rows committed early)",
                       "commit step", s["budget_mean"]),
        plot_throughput(scan.timeline, scan.tick, out / PLOT_FILES["throughput"], scan.start_time),
    )]
