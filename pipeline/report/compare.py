"""Runs side by side: step and wall-clock speed-ups, accuracy differences, and the same figures
over the ids every pair decoded ok (joined on the per-row keys a scan with keep_rows keeps)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.report.formats import format_comparison
from pipeline.report.plots import PLOT_FILES, plot_accuracy_vs_steps
from pipeline.report.scan import RunScan, scan_run
from pipeline.report.write import write_text

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
    out = Path(out_dir)
    result = dict(comparison)
    write_text(out, COMPARE_JSON, "")
    pts = [r for r in comparison["runs"] if r["accuracy"] is not None and r["mean_steps"] is not None]
    result["plots"] = []
    if with_plots and pts:
        path = plot_accuracy_vs_steps([r["label"] for r in pts], [r["mean_steps"] for r in pts],
                                      [r["accuracy"] for r in pts], out / PLOT_FILES["accuracy"])
        result["plots"].append(str(path))
    write_text(out, COMPARE_JSON, json.dumps(result, indent=2) + "\n")
    write_text(out, COMPARE_MD, format_comparison(result))
    return result
