"""The report dict: totals, steps against the budget, early commits by third, workers, accuracy.

Wall time and rates come from the manifest: a resumed job appends to its `runs`, and the rows in
the directory come from all of them. Every figure is JSON-able; formats.py renders it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from pipeline.report.accumulate import Accumulator, WorkerStats, quantile_from_counts

THIRDS = ("first", "middle", "last")
TIMELINE_BINS = 500  # finish times are kept per bin of the job's span (bounded memory, fine enough to plot)


def first_start(manifest: dict) -> float | None:
    """Unix seconds when the first run into the directory started (None when the manifest lacks it)."""
    return next((float(manifest[k]) for k in ("first_started_at", "started_at")
                 if isinstance(manifest.get(k), (int, float))), None)


def run_times(manifest: dict, last_finished_at: float | None) -> tuple[float | None, float | None, str]:
    """(first start in unix seconds, wall seconds, where the wall time came from) of all runs into a directory.

    A resumed job appends to manifest["runs"]; the rows in the directory come from all of them, so the
    wall time is the sum of the runs' recorded times. Without any (a job still running), it is estimated
    as the last finish time minus the first start.
    """
    runs = [r for r in manifest.get("runs", []) if isinstance(r, dict)]
    start = first_start(manifest)
    walls = [float(r["wall_s"]) for r in runs if isinstance(r.get("wall_s"), (int, float))]
    if walls:
        return start, sum(walls), "manifest runs" if len(walls) > 1 else "manifest"
    if isinstance(manifest.get("wall_s"), (int, float)):
        return start, float(manifest["wall_s"]), "manifest"
    if start is not None and last_finished_at is not None:
        return start, max(last_finished_at - start, 0.0), "estimated: last finished_at - start"
    return start, None, "unknown"


def time_tick(manifest: dict, bins: int = TIMELINE_BINS) -> float:
    """Seconds per timeline bin: the job's span (first start to end, or to now) over `bins`, at least 10 ms."""
    start = first_start(manifest)
    if start is None:
        return 1.0
    end = manifest.get("ended_at") if isinstance(manifest.get("ended_at"), (int, float)) else time.time()
    return max((end - start) / bins, 0.01)


def _rate(x: float, seconds: float | None) -> float | None:
    """x per second, None without a positive time."""
    return x / seconds if seconds and seconds > 0 else None


def summarize(acc: Accumulator, root: Path, manifest: dict, files: list[Path], wall: float | None) -> dict:
    """The report dict (JSON-able) from a finished accumulator."""
    early = int(acc.commit_counts.sum())
    return {
        "output": str(root),
        "label": root.name,
        "model": ", ".join(sorted(acc.distinct["model"])) or None,
        "settings_hashes": sorted(acc.distinct["settings_hash"]),
        "files": len(files),
        "job_status": manifest.get("status"),
        "runs": max(len(manifest.get("runs", [])), 1),
        "rows": acc.rows, "ok": acc.ok, "errors": acc.rows - acc.ok,
        "error_kinds": dict(acc.errors.most_common(5)),
        "generated_tokens": acc.tokens,
        "wall_s": wall,
        "rows_per_s": _rate(acc.rows, wall),
        "tokens_per_s": _rate(acc.tokens, wall),
        "steps": _steps_summary(acc),
        "early_commit": {
            "rows": early,
            "share": early / acc.ok if acc.ok else None,
            "by_third": {t: int(n) for t, n in zip(THIRDS, acc.thirds)},
            "share_by_third": {t: (int(n) / acc.ok if acc.ok else None) for t, n in zip(THIRDS, acc.thirds)},
        },
        "workers": [_worker_summary(w, st, wall) for w, st in sorted(acc.workers.items())],
        "accuracy": _accuracy_summary(acc),
    }


def _steps_summary(acc: Accumulator) -> dict:
    """Steps used against the budget over ok rows."""
    c = acc.steps_counts
    return {
        "budget_mean": acc.budget_sum / acc.ok if acc.ok else None,
        "mean": acc.steps_sum / acc.ok if acc.ok else None,
        "p50": quantile_from_counts(c, 0.5),
        "p90": quantile_from_counts(c, 0.9),
        "max": int(np.flatnonzero(c)[-1]) if c.any() else None,
        "total": acc.steps_sum,
        "speedup": acc.budget_sum / acc.steps_sum if acc.steps_sum else None,
    }


def _worker_summary(worker: str, st: WorkerStats, wall: float | None) -> dict:
    """One worker's row: rates are over the job's wall time, so they add up to the overall rate."""
    finite = math.isfinite(st.first_finished_at)
    return {
        "worker_id": worker, "rows": st.rows, "ok": st.ok, "generated_tokens": st.generated_tokens,
        "mean_decode_s": st.decode_s / st.rows if st.rows else None,
        "rows_per_s": _rate(st.rows, wall), "tokens_per_s": _rate(st.generated_tokens, wall),
        "first_finished_at": st.first_finished_at if finite else None,
        "last_finished_at": st.last_finished_at if finite else None,
    }


def _accuracy_summary(acc: Accumulator) -> dict | None:
    """Accuracy over scored rows (errors count wrong) and over scored ok rows; per task when known."""
    if acc.scorer is None:
        return None
    return {
        "scorer": acc.scorer.name,
        "correct": acc.correct, "scored": acc.scored, "scored_ok": acc.scored_ok,
        "accuracy": acc.correct / acc.scored if acc.scored else None,
        "accuracy_ok": acc.correct / acc.scored_ok if acc.scored_ok else None,
        "by_task": {t: {"correct": c, "scored": n, "accuracy": c / n} for t, (c, n) in sorted(acc.by_task.items())},
    }
