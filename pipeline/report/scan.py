"""One streaming pass over an output directory: the report dict and the arrays behind it.

`scan_run` reads only the columns the report needs (read.py), folds them batch by batch
(accumulate.py) and summarises (summary.py); `build_report` and `short_summary` are its plain
entry points, the latter for the end of a job.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.report.accumulate import Accumulator
from pipeline.report.formats import format_short
from pipeline.report.read import (ReportError, ScoringError, check_columns, iter_batches, local_dir, open_part,
                                  parquet_files, read_manifest)
from pipeline.report.summary import run_times, summarize, time_tick
from pipeline.scoring import Scorer, ScorerError, get_scorer

# Columns every report reads (names follow the output schema of jobs/generate.py).
STAT_COLUMNS = ("id", "status", "error", "worker_id", "generated_tokens", "steps_budget",
                "steps_used", "committed_early", "commit_step", "decode_s", "finished_at", "model",
                "settings_hash")


@dataclass
class RunScan:
    """What one pass over a run yields: the report dict plus the arrays the plots and comparisons need."""

    output_dir: Path
    report: dict
    steps_counts: np.ndarray        # histogram of steps_used over ok rows
    commit_counts: np.ndarray       # histogram of commit_step over rows that committed early
    timeline: dict[str, Counter]    # worker -> floor(finished_at / tick) -> rows finished
    tick: float                     # seconds per timeline bin
    start_time: float | None
    rows: pa.Table | None = None    # id, ok, steps_used, correct, completion hash (compare mode only)


def _columns_for(scorer: Scorer | None, answer_column: str, task_column: str, names: set[str],
                 keep_rows: bool) -> list[str]:
    """Which columns a scan reads."""
    cols = list(STAT_COLUMNS)
    if scorer or keep_rows:
        cols.append("completion")
    if scorer and scorer.needs_answer:
        cols.append(answer_column)
    if scorer and scorer.needs_task:
        cols += ["prompt", task_column]
    elif scorer and task_column in names:
        cols.append(task_column)  # for accuracy per task
    return list(dict.fromkeys(cols))


def resolve_scorer(name: str | None, names: set[str], task_column: str) -> Scorer | None:
    """The scorer to use: None/'none' = no accuracy; 'auto' = 'task' when a task column exists and prophet.tasks imports."""
    if name in (None, "none"):
        return None
    if name == "auto":
        if task_column not in names:
            return None
        try:
            import prophet.tasks  # noqa: F401  (auto falls back to no accuracy without the tasks package)
        except ImportError:
            return None
        return get_scorer("task")
    return get_scorer(name)


def scan_run(output_dir: str | Path, scorer: str | None = None, answer_column: str = "answer",
             task_column: str = "task", keep_rows: bool = False) -> RunScan:
    """One streaming pass over an output directory: the report and the arrays behind it."""
    root = local_dir(output_dir)
    files = parquet_files(root)
    manifest = read_manifest(root)
    names = set(open_part(files[0]).schema_arrow.names)
    try:
        sc = resolve_scorer(scorer, names, task_column)
    except ScorerError as exc:
        raise ReportError(str(exc)) from exc
    columns = _columns_for(sc, answer_column, task_column, names, keep_rows)
    check_columns(files, tuple(columns))
    acc = Accumulator(sc, answer_column, task_column, keep_rows, time_tick(manifest))
    try:
        for batch in iter_batches(files, columns):
            acc.add(batch)
    except ScorerError as exc:
        if scorer != "auto":
            raise ScoringError(str(exc)) from exc
        # 'auto' guessed from a column name; a task column of other tasks just means no accuracy.
        scan = scan_run(output_dir, None, answer_column, task_column, keep_rows)
        scan.report["accuracy_skipped"] = str(exc)
        return scan
    last = max((st.last_finished_at for st in acc.workers.values()), default=-math.inf)
    start, wall, source = run_times(manifest, last if math.isfinite(last) else None)
    report = summarize(acc, root, manifest, files, wall)
    report["wall_source"] = source
    rows = pa.concat_tables(acc.kept) if acc.kept else None
    timeline = {w: st.per_tick for w, st in acc.workers.items()}
    return RunScan(root, report, acc.steps_counts, acc.commit_counts, timeline, acc.tick, start, rows)


def build_report(output_dir: str | Path, scorer: str | None = None, answer_column: str = "answer",
                 task_column: str = "task") -> dict:
    """The report dict of one output directory (nothing written)."""
    return scan_run(output_dir, scorer, answer_column, task_column).report


def short_summary(output_dir: str | Path, scorer: str | None = "auto") -> str:
    """A few lines for the end of a job: rows, throughput, steps and speed-up, early commits, accuracy.

    Never raises a ReportError: a job that finished should not fail on its summary, so the problem
    is returned as the text instead.
    """
    try:
        return format_short(build_report(output_dir, scorer))
    except ReportError as exc:
        return f"report unavailable: {exc}"
