"""Throughput and quality report of one jobs/generate.py output directory (Parquet + manifest).

Reads only the columns it needs, file by file and batch by batch, and keeps integer histograms
(steps are small integers) instead of the rows, so large outputs fit in memory.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import output
from pipeline.schema import MANIFEST, OK, REPORT_DIR
from pipeline.scoring import Scorer, ScorerError, get_scorer

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# Columns every report reads (names follow the output schema of jobs/generate.py).
STAT_COLUMNS = ("id", "status", "error", "worker_id", "generated_tokens", "steps_budget",
                "steps_used", "committed_early", "commit_step", "decode_s", "finished_at", "model",
                "settings_hash")
THIRDS = ("first", "middle", "last")
BATCH_ROWS = 65_536
TIMELINE_BINS = 500  # finish times are kept per bin of the job's span (bounded memory, fine enough to plot)
_MAX_ERROR_KINDS = 1000  # distinct error messages tracked; rows past the cap count as "other"


class ReportError(ValueError):
    """The output directory cannot be reported on; the message names the problem and the fix."""


class ScoringError(ReportError):
    """The chosen scorer cannot judge these rows (unknown task, a prompt that is not the task's)."""


# ---------------------------------------------------------------------------- reading

def _local(output_dir: str | Path) -> Path:
    """A local directory path; a URI (s3://...) is refused with what to do instead."""
    if "://" in str(output_dir):
        raise ReportError(f"{output_dir}: reports read local directories only; copy the output down first "
                          "(e.g. `aws s3 sync URI DIR`) and report on the copy")
    return Path(output_dir)


def parquet_files(output_dir: str | Path) -> list[Path]:
    """The visible Parquet parts of an output directory, sorted (pipeline.output.part_files), or a
    ReportError saying why there are none."""
    root = _local(output_dir)
    if not root.exists():
        raise ReportError(f"{root}: no such directory; pass the --output directory of a jobs/generate.py run")
    if not root.is_dir():
        raise ReportError(f"{root}: not a directory; pass the --output directory of a jobs/generate.py run")
    files = [Path(p) for p in output.part_files(str(root))]  # the rule resume uses, shared
    if not files:
        raise ReportError(f"{root}: no Parquet files; the job wrote nothing there yet (still running, failed "
                          "before writing, or the wrong directory): check the job's log or run jobs/generate.py "
                          f"--output {root}")
    return files


def read_manifest(output_dir: str | Path) -> dict:
    """The job manifest (config, decode settings, versions, times) of an output directory."""
    found = output.manifest_path(str(_local(output_dir)))  # .manifest.json, else an older manifest.json
    path = Path(found) if found else Path(output_dir) / MANIFEST
    if found is None:
        raise ReportError(f"{path}: missing; jobs/generate.py writes it when a job ends, so the job is still "
                          "running, crashed, or this is not its output directory: rerun the job into it "
                          "(it resumes) or pass the right directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); rerun the job into the directory to rewrite it") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path}: holds a {type(data).__name__}, expected a JSON object; rerun the job")
    return data


def _open(path: Path) -> pq.ParquetFile:
    """Open one Parquet file, turning a corrupt footer into a ReportError naming the file."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ReportError(f"{path}: not a readable Parquet file ({exc}); delete it and rerun the job into the "
                          "directory to regenerate its rows") from exc


def check_columns(files: list[Path], required: tuple[str, ...]) -> None:
    """Raise ReportError when a file lacks a required column (reads the footers only)."""
    for path in files:
        names = set(_open(path).schema_arrow.names)
        missing = [c for c in required if c not in names]
        if missing:
            raise ReportError(f"{path}: missing column(s) {missing}; a report needs the jobs/generate.py output "
                              f"schema (columns {list(required)}): rerun the job, or for answer/task columns "
                              "pass --answer-column/--task-column naming the right input column")


def iter_batches(files: list[Path], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Stream only the given columns of every file, batch by batch."""
    for path in files:
        try:
            yield from _open(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise ReportError(f"{path}: corrupt Parquet data ({exc}); delete it and rerun the job into the "
                              "directory to regenerate its rows") from exc


# ---------------------------------------------------------------------------- statistics

def add_counts(counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Histogram counts (index = value) with the non-negative integer values added."""
    new = np.bincount(values.astype(np.int64), minlength=len(counts)) if len(values) else counts * 0
    if len(counts) > len(new):
        new = np.pad(new, (0, len(counts) - len(new)))
    return new + np.pad(counts, (0, len(new) - len(counts)))


def quantile_from_counts(counts: np.ndarray, q: float) -> float | None:
    """The q-quantile of the values a histogram counts, as numpy's default (linear) percentile."""
    n = int(counts.sum())
    if n == 0:
        return None
    cum = np.cumsum(counts)
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    value = lambda rank: int(np.searchsorted(cum, rank, side="right"))  # value at 0-based rank
    return value(lo) + (value(hi) - value(lo)) * (pos - lo)


def commit_third(commit_step: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Which third of the budget (0, 1, 2) each 1-based commit step fell in, by Prophet's p = (step - 1) / budget."""
    # The rule's progress counts the deciding step from 0, the output column from 1.
    return np.clip(np.floor(3 * (commit_step - 1) / np.maximum(budget, 1)), 0, 2).astype(np.int64)


def _column(batch: pa.RecordBatch, name: str, fill) -> np.ndarray:
    """One column as numpy with nulls replaced by fill."""
    return np.asarray(pc.fill_null(batch.column(name), fill).to_numpy(zero_copy_only=False))


@dataclass
class WorkerStats:
    """Running totals for one worker."""

    rows: int = 0
    ok: int = 0
    generated_tokens: int = 0
    decode_s: float = 0.0          # summed over rows (rows overlap in a batch: not busy time)
    first_finished_at: float = math.inf
    last_finished_at: float = -math.inf
    per_tick: Counter = field(default_factory=Counter)  # floor(finished_at / tick) -> rows finished in it


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


class _Accumulator:
    """Folds record batches into totals, histograms and (optionally) per-row keys."""

    def __init__(self, scorer: Scorer | None, answer_column: str, task_column: str, keep_rows: bool,
                 tick: float = 1.0):
        self.scorer, self.answer_column, self.task_column = scorer, answer_column, task_column
        self.keep_rows, self.tick = keep_rows, tick
        self.rows = self.ok = self.tokens = self.budget_sum = self.steps_sum = 0
        self.steps_counts = np.zeros(0, np.int64)
        self.commit_counts = np.zeros(0, np.int64)
        self.thirds = np.zeros(3, np.int64)
        self.errors: Counter = Counter()
        self.workers: dict[str, WorkerStats] = {}
        self.correct = self.scored = self.scored_ok = 0
        self.by_task: dict[str, list[int]] = {}  # task -> [correct, scored]
        self.kept: list[pa.Table] = []
        self.distinct: dict[str, set] = {"model": set(), "settings_hash": set()}

    def add(self, batch: pa.RecordBatch) -> None:
        """Fold one batch in."""
        ok = _column(batch, "status", "") == OK
        tokens = np.where(ok, _column(batch, "generated_tokens", 0), 0)
        steps = _column(batch, "steps_used", 0)[ok]
        budget = _column(batch, "steps_budget", 0)[ok]
        early = _column(batch, "committed_early", False)[ok].astype(bool)
        commit = _column(batch, "commit_step", 0)[ok][early]
        self.rows += len(ok)
        self.ok += int(ok.sum())
        self.tokens += int(tokens.sum())
        self.steps_sum += int(steps.sum())
        self.budget_sum += int(budget.sum())
        self.steps_counts = add_counts(self.steps_counts, steps)
        self.commit_counts = add_counts(self.commit_counts, commit)
        self.thirds += np.bincount(commit_third(commit, budget[early]), minlength=3)
        self._add_errors(batch, ok)
        for name, seen in self.distinct.items():
            if len(seen) < 100:  # a directory mixing settings is flagged; listing them all is not needed
                seen.update(v for v in pc.unique(batch.column(name)).to_pylist() if v is not None)
        self._add_workers(batch, ok, tokens)
        correct = self._add_accuracy(batch, ok) if self.scorer else None
        if self.keep_rows:
            self._keep(batch, ok, correct)

    def _add_errors(self, batch: pa.RecordBatch, ok: np.ndarray) -> None:
        """Count error messages (first line, 200 chars) of non-ok rows."""
        for msg in batch.column("error").filter(pa.array(~ok)).to_pylist():
            key = (msg.splitlines() or ["(no message)"])[0][:200] if msg else "(no message)"
            if key not in self.errors and len(self.errors) >= _MAX_ERROR_KINDS:
                key = "(other)"
            self.errors[key] += 1

    def _add_workers(self, batch: pa.RecordBatch, ok: np.ndarray, tokens: np.ndarray) -> None:
        """Per-worker rows, tokens, decode seconds and finish times (grouped in Arrow, not per row)."""
        done = pc.cast(batch.column("finished_at"), pa.float64())
        t = pa.table({"w": pc.fill_null(pc.cast(batch.column("worker_id"), pa.string()), "unknown"),
                      "ok": ok.astype(np.int64), "tok": tokens.astype(np.int64),
                      "dec": pc.fill_null(pc.cast(batch.column("decode_s"), pa.float64()), 0.0),
                      "t": done, "bin": pc.cast(pc.floor(pc.divide(done, self.tick)), pa.int64())})
        g = t.group_by("w").aggregate([("ok", "count"), ("ok", "sum"), ("tok", "sum"), ("dec", "sum"),
                                       ("t", "min"), ("t", "max")]).to_pylist()
        for row in g:
            st = self.workers.setdefault(row["w"], WorkerStats())
            st.rows += row["ok_count"]
            st.ok += row["ok_sum"]
            st.generated_tokens += row["tok_sum"]
            st.decode_s += row["dec_sum"]
            if row["t_min"] is not None:
                st.first_finished_at = min(st.first_finished_at, row["t_min"])
                st.last_finished_at = max(st.last_finished_at, row["t_max"])
        for row in t.group_by(["w", "bin"]).aggregate([("bin", "count")]).to_pylist():
            if row["bin"] is not None:
                self.workers[row["w"]].per_tick[row["bin"]] += row["bin_count"]

    def _add_accuracy(self, batch: pa.RecordBatch, ok: np.ndarray) -> np.ndarray:
        """Score the batch; error rows count as wrong; rows without a reference are not scored."""
        sc = self.scorer
        wanted = {"completion": "completion", "answer": self.answer_column if sc.needs_answer else None,
                  "prompt": "prompt" if sc.needs_task else None,
                  "task": self.task_column if self.task_column in batch.schema.names else None}
        cols = {key: batch.column(name).to_pylist() for key, name in wanted.items() if name}
        ref = cols["answer"] if sc.needs_answer else cols["task"]
        scored = np.array([r is not None for r in ref], bool)
        todo = np.flatnonzero(ok & scored)  # error rows are wrong without asking the scorer
        correct = np.zeros(len(ok), bool)
        correct[todo] = sc.score_batch({k: [v[i] for i in todo] for k, v in cols.items()})
        self.scored += int(scored.sum())
        self.scored_ok += int((scored & ok).sum())
        self.correct += int(correct.sum())
        for task, s, c in zip(cols.get("task", ()), scored, correct):
            if s:
                pair = self.by_task.setdefault(str(task), [0, 0])
                pair[0] += int(c)
                pair[1] += 1
        return correct

    def _keep(self, batch: pa.RecordBatch, ok: np.ndarray, correct: np.ndarray | None) -> None:
        """Keep the per-row keys a comparison joins on (no token ids, texts only as hashes)."""
        texts = batch.column("completion").to_pylist()
        self.kept.append(pa.table({
            "id": pc.cast(batch.column("id"), pa.string()),
            "ok": pa.array(ok),
            "steps_used": pa.array(_column(batch, "steps_used", 0).astype(np.int64)),
            "correct": pa.array(correct if correct is not None else np.zeros(len(ok), bool)),
            "completion_hash": pa.array([hash(t) for t in texts], pa.int64()),
        }))


# ---------------------------------------------------------------------------- the report

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


def scan_run(output_dir: str | Path, scorer: str | None = None, answer_column: str = "answer",
             task_column: str = "task", keep_rows: bool = False) -> RunScan:
    """One streaming pass over an output directory: the report and the arrays behind it."""
    root = _local(output_dir)
    files = parquet_files(root)
    manifest = read_manifest(root)
    names = set(_open(files[0]).schema_arrow.names)
    try:
        sc = resolve_scorer(scorer, names, task_column)
    except ScorerError as exc:
        raise ReportError(str(exc)) from exc
    columns = _columns_for(sc, answer_column, task_column, names, keep_rows)
    check_columns(files, tuple(columns))
    acc = _Accumulator(sc, answer_column, task_column, keep_rows, time_tick(manifest))
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
    report = _summarize(acc, root, manifest, files, wall)
    report["wall_source"] = source
    rows = pa.concat_tables(acc.kept) if acc.kept else None
    timeline = {w: st.per_tick for w, st in acc.workers.items()}
    return RunScan(root, report, acc.steps_counts, acc.commit_counts, timeline, acc.tick, start, rows)


def _summarize(acc: _Accumulator, root: Path, manifest: dict, files: list[Path], wall: float | None) -> dict:
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


def _steps_summary(acc: _Accumulator) -> dict:
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


def _accuracy_summary(acc: _Accumulator) -> dict | None:
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


# ---------------------------------------------------------------------------- text

def _f(x, spec: str = ".2f") -> str:
    """Format a number, '-' for None."""
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _pct(x: float | None) -> str:
    """A share as a percentage, '-' for None."""
    return "-" if x is None else f"{100 * x:.1f}%"


def format_short(r: dict) -> str:
    """The short form of a report (a few plain lines)."""
    s, e, a = r["steps"], r["early_commit"], r["accuracy"]
    lines = [
        f"report {r['output']}: {r['rows']} rows ({r['ok']} ok, {r['errors']} errors), "
        f"{r['generated_tokens']} generated tokens in {_f(r['wall_s'], '.1f')} s",
        f"  throughput: {_f(r['rows_per_s'])} rows/s, {_f(r['tokens_per_s'], '.1f')} tokens/s "
        f"over {len(r['workers'])} worker(s)",
        f"  steps: mean {_f(s['mean'])} of budget {_f(s['budget_mean'], '.1f')} (p50 {_f(s['p50'], '.1f')}, "
        f"p90 {_f(s['p90'], '.1f')}, max {_f(s['max'])}), speed-up {_f(s['speedup'])}x; "
        f"early commit {_pct(e['share'])}",
    ]
    if a:
        lines.append(f"  accuracy ({a['scorer']}): {_pct(a['accuracy'])} ({a['correct']}/{a['scored']})")
    if r.get("accuracy_skipped"):
        lines.append(f"  accuracy: not scored ({r['accuracy_skipped']})")
    if len(r["settings_hashes"]) > 1:
        lines.append(f"  warning: rows from {len(r['settings_hashes'])} different decode settings are mixed here")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table as lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def format_report(r: dict) -> str:
    """The full report as Markdown (readable on a terminal too)."""
    s, e, a = r["steps"], r["early_commit"], r["accuracy"]
    lines = [f"# Report: {r['output']}", ""]
    lines += _md_table(["figure", "value"], [
        ["model", r["model"] or "-"],
        ["settings hash", ", ".join(r["settings_hashes"]) or "-"],
        ["rows (ok / error)", f"{r['rows']} ({r['ok']} / {r['errors']})"],
        ["generated tokens", r["generated_tokens"]],
        ["wall time (s)", f"{_f(r['wall_s'], '.1f')} ({r['wall_source']})"],
        ["job status", r["job_status"] or "-"],
        ["rows/s", _f(r["rows_per_s"], ".3f")],
        ["generated tokens/s", _f(r["tokens_per_s"], ".1f")],
        ["steps budget (mean)", _f(s["budget_mean"])],
        ["steps used mean / p50 / p90 / max",
         f"{_f(s['mean'])} / {_f(s['p50'], '.1f')} / {_f(s['p90'], '.1f')} / {_f(s['max'])}"],
        ["step speed-up (budget / mean steps)", f"{_f(s['speedup'])}x"],
        ["committed early", f"{e['rows']} ({_pct(e['share'])} of ok rows)"],
        ["... in first / middle / last third",
         " / ".join(f"{e['by_third'][t]} ({_pct(e['share_by_third'][t])})" for t in THIRDS)],
    ])
    if a:
        lines += ["", f"## Accuracy ({a['scorer']})", ""]
        rows = [["all", a["correct"], a["scored"], _pct(a["accuracy"])]]
        rows += [[t, v["correct"], v["scored"], _pct(v["accuracy"])] for t, v in a["by_task"].items()]
        lines += _md_table(["task", "correct", "scored", "accuracy"], rows)
        lines.append(f"\nError rows count as wrong; over ok rows only: {_pct(a['accuracy_ok'])}.")
    if r.get("accuracy_skipped"):
        lines += ["", f"Accuracy not scored: {r['accuracy_skipped']}"]
    lines += ["", "## Workers", ""]
    lines += _md_table(["worker", "rows", "ok", "generated tokens", "mean row decode s", "rows/s", "tokens/s"], [
        [w["worker_id"], w["rows"], w["ok"], w["generated_tokens"], _f(w["mean_decode_s"], ".3f"),
         _f(w["rows_per_s"], ".3f"), _f(w["tokens_per_s"], ".1f")] for w in r["workers"]])
    if r["error_kinds"]:
        lines += ["", "## Most common errors", ""]
        lines += _md_table(["count", "error"], [[n, m.replace("|", "\\|")] for m, n in r["error_kinds"].items()])
    if r.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- writing

PLOT_FILES = {"steps": "steps_used.png", "commit": "commit_step.png", "throughput": "throughput.png",
              "accuracy": "accuracy_vs_steps.png"}


def write_plots(scan: RunScan, out_dir: str | Path) -> list[str]:
    """The steps-used and commit-step histograms and the per-worker throughput plot; their paths."""
    from pipeline import plots

    out, s = Path(out_dir), scan.report["steps"]
    return [str(p) for p in (
        plots.plot_histogram(scan.steps_counts, out / PLOT_FILES["steps"], "Steps used (ok rows)",
                             "steps used", s["budget_mean"]),
        plots.plot_histogram(scan.commit_counts, out / PLOT_FILES["commit"], "Commit step (rows committed early)",
                             "commit step", s["budget_mean"]),
        plots.plot_throughput(scan.timeline, scan.tick, out / PLOT_FILES["throughput"], scan.start_time),
    )]


def _write_text(out: Path, name: str, text: str) -> None:
    """Write one file, turning a read-only or missing directory into a ReportError."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    except OSError as exc:
        raise ReportError(f"cannot write {out / name} ({exc}); pass --out a writable directory") from exc


def report_dir(output_dir: str | Path) -> Path:
    """Where reports go by default: OUT/__report, a name dataset readers skip (like .manifest.json),
    so that pandas/pyarrow/datasets still read OUT as one Parquet dataset after a report."""
    return Path(output_dir) / REPORT_DIR


def write_report(scan: RunScan, out_dir: str | Path | None = None, with_plots: bool = True) -> dict:
    """Write report.json, report.md and the plots (default: OUT/__report); the report."""
    out = Path(out_dir) if out_dir else report_dir(scan.output_dir)
    report = dict(scan.report)
    _write_text(out, REPORT_JSON, "")  # fail on an unwritable directory before plotting
    report["plots"] = write_plots(scan, out) if with_plots else []
    _write_text(out, REPORT_JSON, json.dumps(report, indent=2) + "\n")
    _write_text(out, REPORT_MD, format_report(report))
    return report


# ---------------------------------------------------------------------------- comparing runs

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is zero."""
    return a / b if a is not None and b else None


def _diff(b: float | None, a: float | None) -> float | None:
    """b - a, None when either is missing."""
    return b - a if a is not None and b is not None else None


def _common_rows(a: pa.Table, b: pa.Table) -> dict:
    """Figures over the ids both runs decoded ok: step speed-up, accuracies, identical completions."""
    joined = a.filter(a["ok"]).join(b.filter(b["ok"]), "id", join_type="inner", left_suffix="_a",
                                    right_suffix="_b")
    n = joined.num_rows
    steps_a = pc.sum(joined["steps_used_a"]).as_py() or 0
    steps_b = pc.sum(joined["steps_used_b"]).as_py() or 0
    acc = lambda col: pc.sum(pc.cast(joined[col], pa.int64())).as_py() / n if n else None
    same = pc.sum(pc.cast(pc.equal(joined["completion_hash_a"], joined["completion_hash_b"]), pa.int64())).as_py()
    return {"rows": n, "step_speedup": _ratio(steps_a, steps_b), "accuracy_a": acc("correct_a"),
            "accuracy_b": acc("correct_b"), "same_completion": (same or 0) / n if n else None}


def compare_pair(a: RunScan, b: RunScan) -> dict:
    """B against A: step and wall-clock speed-ups (A's cost / B's cost), accuracy difference (B - A)."""
    ra, rb = a.report, b.report
    acc_a = (ra["accuracy"] or {}).get("accuracy")
    acc_b = (rb["accuracy"] or {}).get("accuracy")
    common = _common_rows(a.rows, b.rows)
    if ra["accuracy"] is None or rb["accuracy"] is None:
        common["accuracy_a"] = common["accuracy_b"] = None
    common["accuracy_diff"] = _diff(common["accuracy_b"], common["accuracy_a"])
    return {
        "a": ra["label"], "b": rb["label"],
        "step_speedup": _ratio(ra["steps"]["mean"], rb["steps"]["mean"]),
        "rows_per_s_ratio": _ratio(rb["rows_per_s"], ra["rows_per_s"]),
        "tokens_per_s_ratio": _ratio(rb["tokens_per_s"], ra["tokens_per_s"]),
        "accuracy_a": acc_a, "accuracy_b": acc_b, "accuracy_diff": _diff(acc_b, acc_a),
        "common": common,
    }


def _unique_labels(scans: list[RunScan]) -> None:
    """Label runs by directory name, or by full path where names repeat."""
    names = [s.output_dir.name for s in scans]
    for s in scans:
        s.report["label"] = s.output_dir.name if names.count(s.output_dir.name) == 1 else str(s.output_dir)


def scan_runs(output_dirs: list[str | Path], scorer: str | None = None, answer_column: str = "answer",
              task_column: str = "task") -> list[RunScan]:
    """Scan several runs, keeping the per-row keys a comparison joins on."""
    scans = [scan_run(d, scorer, answer_column, task_column, keep_rows=True) for d in output_dirs]
    _unique_labels(scans)
    return scans


def compare_runs(scans: list[RunScan]) -> dict:
    """Runs side by side and every pair (earlier run as the baseline A)."""
    runs = [{k: s.report[k] for k in ("label", "output", "rows", "ok", "errors", "rows_per_s", "tokens_per_s")}
            | {"mean_steps": s.report["steps"]["mean"], "budget_mean": s.report["steps"]["budget_mean"],
               "step_speedup": s.report["steps"]["speedup"], "early_share": s.report["early_commit"]["share"],
               "accuracy": (s.report["accuracy"] or {}).get("accuracy")} for s in scans]
    pairs = [compare_pair(scans[i], scans[j]) for i in range(len(scans)) for j in range(i + 1, len(scans))]
    return {"runs": runs, "pairs": pairs}


def write_comparison(comparison: dict, out_dir: str | Path, with_plots: bool = True) -> dict:
    """Write compare.json, compare.md and the accuracy-vs-steps plot; the comparison with plot paths."""
    from pipeline import plots

    out = Path(out_dir)
    result = dict(comparison)
    _write_text(out, COMPARE_JSON, "")
    pts = [r for r in comparison["runs"] if r["accuracy"] is not None and r["mean_steps"] is not None]
    result["plots"] = []
    if with_plots and pts:
        path = plots.plot_accuracy_vs_steps([r["label"] for r in pts], [r["mean_steps"] for r in pts],
                                            [r["accuracy"] for r in pts], out / PLOT_FILES["accuracy"])
        result["plots"].append(str(path))
    _write_text(out, COMPARE_JSON, json.dumps(result, indent=2) + "\n")
    _write_text(out, COMPARE_MD, format_comparison(result))
    return result


def format_comparison(c: dict) -> str:
    """The comparison as Markdown: one table of runs, one of pairs."""
    lines = ["# Run comparison", ""]
    lines += _md_table(["run", "rows (ok)", "mean steps", "budget", "step speed-up", "early", "rows/s",
                        "tokens/s", "accuracy"], [
        [r["label"], f"{r['rows']} ({r['ok']})", _f(r["mean_steps"]), _f(r["budget_mean"], ".1f"),
         f"{_f(r['step_speedup'])}x", _pct(r["early_share"]), _f(r["rows_per_s"], ".3f"),
         _f(r["tokens_per_s"], ".1f"), _pct(r["accuracy"])] for r in c["runs"]])
    lines += ["", "## Pairs (B against baseline A)", ""]
    lines += _md_table(["A", "B", "step speed-up", "rows/s ratio", "accuracy B - A", "common ok rows",
                        "speed-up on common", "accuracy B - A on common", "same completion"], [
        [p["a"], p["b"], f"{_f(p['step_speedup'])}x", _f(p["rows_per_s_ratio"]),
         _pp(p["accuracy_diff"]), p["common"]["rows"], f"{_f(p['common']['step_speedup'])}x",
         _pp(p["common"]["accuracy_diff"]), _pct(p["common"]["same_completion"])] for p in c["pairs"]])
    if c.get("plots"):
        lines += ["", "![accuracy vs steps](" + Path(c["plots"][0]).name + ")"]
    return "\n".join(lines) + "\n"


def _pp(x: float | None) -> str:
    """A difference of shares in percentage points, '-' for None."""
    return "-" if x is None else f"{100 * x:+.1f} pp"
