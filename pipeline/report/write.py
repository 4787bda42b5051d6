"""Writing a report: report.json, report.md and the plots, by default into OUT/__report."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.report.formats import format_report
from pipeline.report.plots import write_plots
from pipeline.report.read import ReportError
from pipeline.report.scan import RunScan
from pipeline.schema import REPORT_DIR

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def write_text(out: Path, name: str, text: str) -> None:
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
    write_text(out, REPORT_JSON, "")  # fail on an unwritable directory before plotting
    report["plots"] = write_plots(scan, out) if with_plots else []
    write_text(out, REPORT_JSON, json.dumps(report, indent=2) + "\n")
    write_text(out, REPORT_MD, format_report(report))
    return report
