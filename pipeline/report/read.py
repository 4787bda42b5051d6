"""Reading an output directory for a report: its parts and manifest, through pipeline.output.

The listing of parts and the manifest reader are pipeline.output's, the ones the job's resume
uses, so a report sees exactly the rows and manifest a resumed job would. What this module adds
is the report's own refusals (a URI, a missing directory, a corrupt part) as ReportErrors that
name the file and the fix, and column-wise, batch-wise streaming of the parts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import output, storage
from pipeline.schema import MANIFEST

BATCH_ROWS = 65_536


class ReportError(ValueError):
    """The output directory cannot be reported on; the message names the problem and the fix."""


class ScoringError(ReportError):
    """The chosen scorer cannot judge these rows (unknown task, a prompt that is not the task's)."""


def local_dir(output_dir: str | Path) -> Path:
    """A local directory path; a URI (s3://...) is refused with what to do instead."""
    if storage.is_remote(str(output_dir)):
        raise ReportError(f"{output_dir}: reports read local directories only; copy the output down first "
                          "(e.g. `aws s3 sync URI DIR`) and report on the copy")
    return Path(output_dir)


def parquet_files(output_dir: str | Path) -> list[Path]:
    """The visible Parquet parts of an output directory, sorted (pipeline.output.part_files), or a
    ReportError saying why there are none."""
    root = local_dir(output_dir)
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
    """The job manifest (config, decode settings, versions, times) of an output directory
    (pipeline.output.read_manifest: .manifest.json, else an older run's manifest.json)."""
    root = local_dir(output_dir)
    try:
        data = output.read_manifest(str(root))
    except output.ManifestError as exc:
        raise ReportError(exc.detail) from exc
    if data is None:
        raise ReportError(f"{root / MANIFEST}: missing; jobs/generate.py writes it when a job ends, so the job is "
                          "still running, crashed, or this is not its output directory: rerun the job into it "
                          "(it resumes) or pass the right directory")
    return data


def open_part(path: Path) -> pq.ParquetFile:
    """Open one Parquet file, turning a corrupt footer into a ReportError naming the file."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ReportError(f"{path}: not a readable Parquet file ({exc}); delete it and rerun the job into the "
                          "directory to regenerate its rows") from exc


def check_columns(files: list[Path], required: tuple[str, ...]) -> None:
    """Raise ReportError when a file lacks a required column (reads the footers only)."""
    for path in files:
        names = set(open_part(path).schema_arrow.names)
        missing = [c for c in required if c not in names]
        if missing:
            raise ReportError(f"{path}: missing column(s) {missing}; a report needs the jobs/generate.py output "
                              f"schema (columns {list(required)}): rerun the job, or for answer/task columns "
                              "pass --answer-column/--task-column naming the right input column")


def iter_batches(files: list[Path], columns: list[str]) -> Iterator[pa.RecordBatch]:
    """Stream only the given columns of every file, batch by batch."""
    for path in files:
        try:
            yield from open_part(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise ReportError(f"{path}: corrupt Parquet data ({exc}); delete it and rerun the job into the "
                              "directory to regenerate its rows") from exc
