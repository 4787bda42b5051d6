"""The report and the comparison as text: a few plain lines, or Markdown (readable on a terminal too).

Pure functions of the JSON-able dicts (summary.py, compare.py): nothing here reads or writes files.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.report.summary import THIRDS


def _f(x, spec: str = ".2f") -> str:
    """Format a number, '-' for None."""
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def _pct(x: float | None) -> str:
    """A share as a percentage, '-' for None."""
    return "-" if x is None else f"{100 * x:.1f}%"


def _pp(x: float | None) -> str:
    """A difference of shares in percentage points, '-' for None."""
    return "-" if x is None else f"{100 * x:+.1f} pp"


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


def md_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table as lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def format_report(r: dict) -> str:
    """The full report as Markdown (readable on a terminal too)."""
    s, e, a = r["steps"], r["early_commit"], r["accuracy"]
    lines = [f"# Report: {r['output']}", ""]
    lines += md_table(["figure", "value"], [
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
        lines += md_table(["task", "correct", "scored", "accuracy"], rows)
        lines.append(f"\nError rows count as wrong; over ok rows only: {_pct(a['accuracy_ok'])}.")
    if r.get("accuracy_skipped"):
        lines += ["", f"Accuracy not scored: {r['accuracy_skipped']}"]
    lines += ["", "## Workers", ""]
    lines += md_table(["worker", "rows", "ok", "generated tokens", "mean row decode s", "rows/s", "tokens/s"], [
        [w["worker_id"], w["rows"], w["ok"], w["generated_tokens"], _f(w["mean_decode_s"], ".3f"),
         _f(w["rows_per_s"], ".3f"), _f(w["tokens_per_s"], ".1f")] for w in r["workers"]])
    if r["error_kinds"]:
        lines += ["", "## Most common errors", ""]
        lines += md_table(["count", "error"], [[n, m.replace("|", "\\|")] for m, n in r["error_kinds"].items()])
    if r.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r["plots"]]
    return "\n".join(lines) + "\n"


def format_comparison(c: dict) -> str:
    """The comparison as Markdown: one table of runs, one of pairs."""
    lines = ["# Run comparison", ""]
    lines += md_table(["run", "rows (ok)", "mean steps", "budget", "step speed-up", "early", "rows/s",
                        "tokens/s", "accuracy"], [
        [r["label"], f"{r['rows']} ({r['ok']})", _f(r["mean_steps"]), _f(r["budget_mean"], ".1f"),
         f"{_f(r['step_speedup'])}x", _pct(r["early_share"]), _f(r["rows_per_s"], ".3f"),
         _f(r["tokens_per_s"], ".1f"), _pct(r["accuracy"])] for r in c["runs"]])
    lines += ["", "## Pairs (B against baseline A)", ""]
    lines += md_table(["A", "B", "step speed-up", "rows/s ratio", "accuracy B - A", "common ok rows",
                        "speed-up on common", "accuracy B - A on common", "same completion"], [
        [p["a"], p["b"], f"{_f(p['step_speedup'])}x", _f(p["rows_per_s_ratio"]),
         _pp(p["accuracy_diff"]), p["common"]["rows"], f"{_f(p['common']['step_speedup'])}x",
         _pp(p["common"]["accuracy_diff"]), _pct(p["common"]["same_completion"])] for p in c["pairs"]])
    if c.get("plots"):
        lines += ["", "![accuracy vs steps](" + Path(c["plots"][0]).name + ")"]
    return "\n".join(lines) + "\n"
