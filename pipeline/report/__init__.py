"""Throughput and quality report of one jobs/generate.py output directory (Parquet + manifest),
and the comparison of several.

Reads only the columns it needs, file by file and batch by batch, and keeps integer histograms
(steps are small integers) instead of the rows, so large outputs fit in memory. One module per
concern, each importing only those before it:

- read.py: the parts and the manifest, through pipeline.output's listing and reader (the ones
  the job's resume uses), with the report's clear errors (ReportError);
- accumulate.py: record batches folded into totals and histograms;
- summary.py: the report dict (wall time from the manifest's runs, rates, steps, workers);
- formats.py: plain text and Markdown of a report or a comparison;
- scan.py: one streaming pass (scan_run) and its entry points (build_report, short_summary);
- plots.py: the PNG plots; write.py: report.json, report.md and plots into OUT/__report;
- compare.py: runs side by side and pair by pair.
"""
from pipeline.report.accumulate import add_counts, commit_third, quantile_from_counts
from pipeline.report.compare import (COMPARE_JSON, COMPARE_MD, compare_pair, compare_runs, scan_runs,
                                     write_comparison)
from pipeline.report.formats import format_comparison, format_report, format_short
from pipeline.report.plots import PLOT_FILES, write_plots
from pipeline.report.read import ReportError, ScoringError, check_columns, iter_batches, parquet_files, read_manifest
from pipeline.report.scan import STAT_COLUMNS, RunScan, build_report, resolve_scorer, scan_run, short_summary
from pipeline.report.summary import THIRDS, first_start, run_times, time_tick
from pipeline.report.write import REPORT_JSON, REPORT_MD, report_dir, write_report

__all__ = ["COMPARE_JSON", "COMPARE_MD", "PLOT_FILES", "REPORT_JSON", "REPORT_MD", "STAT_COLUMNS", "THIRDS",
           "ReportError", "RunScan", "ScoringError", "add_counts", "build_report", "check_columns",
           "commit_third", "compare_pair", "compare_runs", "first_start", "format_comparison", "format_report",
           "format_short", "iter_batches", "parquet_files", "quantile_from_counts", "read_manifest",
           "report_dir", "resolve_scorer", "run_times", "scan_run", "scan_runs", "short_summary", "time_tick",
           "write_comparison", "write_plots", "write_report"]
