"""Throughput and quality report of jobs/generate.py output; several directories are compared side by side.

  python jobs/report.py OUTPUT_DIR [--scorer task|exact|gsm8k|auto|none]
  python jobs/report.py FULL_DIR HALF_DIR PROPHET_DIR --scorer task --out cmp/

Prints a table for people and one JSON object on the last stdout line; writes report.json,
report.md and PNG plots into OUTPUT_DIR/__report/ (or --out), compare.json/compare.md and
accuracy_vs_steps.png when comparing. (`__report` is a name Parquet readers skip, so OUTPUT_DIR stays
readable as one dataset.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.report import (ReportError, compare_runs, format_comparison, format_report, report_dir,  # noqa: E402
                             scan_run, scan_runs, write_comparison, write_report)
from pipeline.scoring import SCORERS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="output directory of a jobs/generate.py run; "
                   "give several to compare them (the first is the baseline)")
    p.add_argument("--scorer", default="auto", choices=["auto", "none", *sorted(SCORERS)],
                   help="how to judge completions: 'task' = the prophet.tasks scorer named in each row's task "
                        "column, 'exact' = exact match with the answer column, 'gsm8k' = final-number match; "
                        "'auto' = 'task' when a task column exists, else no accuracy (default: auto)")
    p.add_argument("--answer-column", default="answer", help="reference answer column (default: answer)")
    p.add_argument("--task-column", default="task", help="per-row task name column (default: task)")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write reports and plots (default: the first run's directory/__report)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Report on one run or compare several; print the table, then one JSON line."""
    args = parse_args(argv)
    try:
        if len(args.runs) == 1:
            scan = scan_run(args.runs[0], args.scorer, args.answer_column, args.task_column)
            result = write_report(scan, args.out, with_plots=not args.no_plots)
            print(format_report(result))
        else:
            scans = scan_runs(args.runs, args.scorer, args.answer_column, args.task_column)
            out = args.out or report_dir(args.runs[0])
            result = write_comparison(compare_runs(scans), out, with_plots=not args.no_plots)
            print(format_comparison(result))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
