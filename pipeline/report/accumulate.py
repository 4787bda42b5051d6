"""Folding record batches of an output directory into totals and integer histograms.

Steps are small integers, so histograms (index = value) stand in for the rows: a report of any
size fits in memory. The per-row keys a comparison joins on are kept only when asked.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import OK
from pipeline.scoring import Scorer

_MAX_ERROR_KINDS = 1000  # distinct error messages tracked; rows past the cap count as "other"


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


class Accumulator:
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
