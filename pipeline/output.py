"""The output directory: atomic Parquet parts, the ids already written (resume), the manifest.

A part file becomes visible only complete: it is written under a hidden temporary name and
renamed into place (a rename is atomic on a local or network file system; an object store puts
a whole object at once). So every visible `*.parquet` holds complete rows, and a killed run
leaves at most hidden `.*.tmp` files, which the next run deletes. Resume reads the `id` column
of the visible files and skips those ids.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import JobConfigError
from pipeline.schema import LEGACY_MANIFEST, MANIFEST, OUTPUT_COLUMNS, OUTPUT_SCHEMA

TMP_SUFFIX = ".tmp"
PART_NAME = re.compile(r"part-.+-\d{6}\.parquet")  # what part_name() makes (and older runs' part-<run>-<task>)


def filesystem(out_dir: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of an output directory: a local path or a URI (s3://...)."""
    return storage.filesystem(out_dir)


def new_run_id() -> str:
    """A short id for one run of a job (part file names carry it)."""
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def part_name(run_id: str, task_idx: int, piece: int = 0) -> str:
    """File name of one piece of one write task's rows (deterministic, so a retried task overwrites, never adds)."""
    return f"part-{run_id}-{task_idx:06d}-{piece:06d}.parquet"


def conform(table: pa.Table) -> pa.Table:
    """The output columns in schema order and types, then the passthrough columns as they are."""
    rest = [n for n in table.column_names if n not in OUTPUT_COLUMNS]
    cols = [table.column(f.name).cast(f.type) for f in OUTPUT_SCHEMA] + [table.column(n) for n in rest]
    fields = list(OUTPUT_SCHEMA) + [table.schema.field(n) for n in rest]
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


class OutputWriteError(OSError):
    """A part could not be written (directory gone or read-only, disk full); no visible part was made."""


def write_part(table: pa.Table, out_dir: str, name: str) -> int:
    """Write one part atomically (hidden temp file, then rename); returns the rows written.

    On failure the temporary file is deleted where possible (a full disk gets its space back) and
    OutputWriteError names the directory; a leftover temp file is hidden and never counts as done.
    """
    fs, base = filesystem(out_dir)
    tmp, final = _join(base, f".{name}{TMP_SUFFIX}"), _join(base, name)
    try:
        with fs.open_output_stream(tmp) as sink:
            pq.write_table(conform(table), sink)
        fs.move(tmp, final)
    except OSError as e:
        _delete_quietly(fs, tmp)
        raise OutputWriteError(f"output.dir: cannot write {name} into {out_dir}: {e}") from e
    return table.num_rows


def what_is_kept(out_dir: str) -> str:
    """After a failed write, what the output still holds, checked now (not assumed), and what to do:
    a deleted bucket or directory took the parts written before the failure with it."""
    rerun = "Make output.dir writable (or free space) and rerun the same command: it "
    if storage.is_remote(out_dir):
        fs, base = filesystem(out_dir)
        bucket = base.split("/", 1)[0]
        try:
            gone = fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            return f"whether the parts written so far are kept cannot be checked now ({e}). {rerun}resumes"
        if gone:
            return (f"the bucket {bucket!r} is gone, and with it every part written so far: nothing of this "
                    "output is kept. Recreate the bucket and rerun the same command: it starts over")
    try:
        parts = part_files(out_dir)
    except (OSError, JobConfigError) as e:
        return (f"whether the parts written so far are kept cannot be checked now ({e}). {rerun}resumes with "
                "the rows its parts lack")
    if not parts:
        return f"{out_dir} holds no part now: nothing of this output is kept. {rerun}starts over"
    return (f"{len(parts)} complete parts written before the failure are kept in {out_dir}. {rerun}resumes "
            "with the missing rows")


def check_writable(out_dir: str) -> None:
    """Create the output directory and write and delete a probe file in it, before any work starts."""
    fs, base = filesystem(out_dir)
    probe = _join(base, f".probe-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"probe")
        fs.delete_file(probe)
    except OSError as e:
        raise JobConfigError(f"output.dir: cannot write to {out_dir} ({e}): choose a writable directory") from None


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass  # already gone, or the directory itself is unreachable: nothing more to free


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"  # pyarrow file systems take "/" paths everywhere


def _listing(out_dir: str) -> list[pafs.FileInfo]:
    fs, base = filesystem(out_dir)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise JobConfigError(f"output.dir: {out_dir} exists and is not a directory")
    return fs.get_file_info(pafs.FileSelector(base, recursive=False))


def part_files(out_dir: str) -> list[str]:
    """Visible Parquet files of the output directory (complete parts), sorted."""
    return sorted(i.path for i in _listing(out_dir)
                  if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                  and not i.base_name.startswith((".", "_")))


def remove_temp_files(out_dir: str) -> int:
    """Delete hidden temporary parts a killed run left behind; returns how many."""
    fs, _ = filesystem(out_dir)
    stale = [i.path for i in _listing(out_dir)
             if i.base_name.startswith(".") and i.base_name.endswith(TMP_SUFFIX)]
    for path in stale:
        fs.delete_file(path)
    return len(stale)


def done_ids(out_dir: str) -> pa.Array:
    """The ids already written (every visible part's `id` column), as one string array."""
    fs, _ = filesystem(out_dir)
    chunks = []
    for path in part_files(out_dir):
        try:
            chunks.append(pq.read_table(path, columns=["id"], filesystem=fs).column("id"))
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise JobConfigError(f"output.dir: {path} is not a readable part of this pipeline ({e}); "
                                 "move it away, or pass --overwrite to start over") from None
    if not chunks:
        return pa.array([], pa.string())
    return pa.chunked_array([c for col in chunks for c in col.chunks], pa.string()).combine_chunks()


def harmonize_parts(out_dir: str) -> int:
    """Give every part the union of the parts' columns (missing ones as nulls); returns parts rewritten.

    JSONL and CSV files may carry different keys, so parts can differ in their passthrough columns,
    and readers that take one schema for a directory (datasets.load_dataset) refuse that. Each
    rewrite is atomic (temp file, then rename over the old part), so a kill leaves the old part.
    """
    fs, _ = filesystem(out_dir)
    paths = part_files(out_dir)
    schemas = [pq.read_schema(p, filesystem=fs) for p in paths]
    if all(s.equals(schemas[0]) for s in schemas[1:]):
        return 0
    union = pa.unify_schemas(schemas, promote_options="permissive")  # ArrowTypeError where types clash
    rewritten = 0
    for path, schema in zip(paths, schemas):
        if schema.equals(union):
            continue
        table = pq.read_table(path, filesystem=fs)
        full = pa.Table.from_arrays([table.column(f.name).cast(f.type) if f.name in schema.names
                                     else pa.nulls(table.num_rows, f.type) for f in union], schema=union)
        write_part(full, out_dir, path.rsplit("/", 1)[-1])
        rewritten += 1
    return rewritten


def foreign_parquet(out_dir: str) -> list[str]:
    """Visible Parquet files of the output directory whose names this pipeline never writes."""
    return [p for p in part_files(out_dir) if not PART_NAME.fullmatch(p.rsplit("/", 1)[-1])]


def clear(out_dir: str) -> None:
    """Delete a job's output (its parts, temporary parts, manifest) for --overwrite; other files stay.

    Only files named like this pipeline's parts are deleted: an --overwrite pointed at a directory
    of someone's own Parquet data must not destroy it (prepare_output refuses such a directory).
    """
    fs, base = filesystem(out_dir)
    for path in part_files(out_dir):
        if PART_NAME.fullmatch(path.rsplit("/", 1)[-1]):
            fs.delete_file(path)
    remove_temp_files(out_dir)
    for name in (MANIFEST, LEGACY_MANIFEST):
        manifest = _join(base, name)
        if fs.get_file_info(manifest).type == pafs.FileType.File:
            fs.delete_file(manifest)


def manifest_path(out_dir: str) -> str | None:
    """Path of the manifest of an output directory: .manifest.json, else an older run's manifest.json;
    None where there is neither yet."""
    fs, base = filesystem(out_dir)
    for name in (MANIFEST, LEGACY_MANIFEST):
        path = _join(base, name)
        if fs.get_file_info(path).type == pafs.FileType.File:
            return path
    return None


class ManifestError(JobConfigError):
    """A manifest exists but is not a readable JSON object. `detail` names the file, the problem
    and the fix without the field prefix, for readers other than the job (jobs/report.py)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.detail = (f"{path}: {problem}; restore it from a copy, or rerun the job with --overwrite to "
                       "start the directory over")
        super().__init__(f"output.dir: {self.detail}")


def read_manifest(out_dir: str) -> dict | None:
    """The manifest of an output directory (see manifest_path), None where there is none yet.

    The one reader of manifests: the job's resume check and the report both call it. A manifest
    that is there but cannot be read, is not JSON or holds no JSON object raises ManifestError.
    """
    path = manifest_path(out_dir)
    if path is None:
        return None
    fs, _ = filesystem(out_dir)
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
    except OSError as e:
        raise ManifestError(path, f"cannot be read ({e})") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(path, f"not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ManifestError(path, f"holds a {type(data).__name__}, expected a JSON object")
    return data


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> None:
    """Write .manifest.json atomically (temp file, then rename); an older manifest.json is removed
    so that resume never reads a stale one."""
    fs, base = filesystem(out_dir)
    fs.create_dir(base, recursive=True)
    tmp, final = _join(base, f".{MANIFEST}{TMP_SUFFIX}"), _join(base, MANIFEST)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write((json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode())
        fs.move(tmp, final)
    except OSError:
        _delete_quietly(fs, tmp)  # the old manifest stays as it was
        raise
    _delete_quietly(fs, _join(base, LEGACY_MANIFEST))


def count_rows(out_dir: str, run_id: str | None = None) -> dict[str, int]:
    """Rows, ok/error counts and distinct ids over every visible part (reads two columns);
    run_rows/run_ok count the parts of run `run_id` only."""
    fs, _ = filesystem(out_dir)
    c = {"rows": 0, "ok": 0, "run_rows": 0, "run_ok": 0}
    ids = []
    for path in part_files(out_dir):
        t = pq.read_table(path, columns=["id", "status"], filesystem=fs)
        ok = pc.sum(pc.equal(t.column("status"), "ok")).as_py() or 0
        c["rows"], c["ok"] = c["rows"] + t.num_rows, c["ok"] + ok
        if run_id is not None and f"part-{run_id}-" in path:
            c["run_rows"], c["run_ok"] = c["run_rows"] + t.num_rows, c["run_ok"] + ok
        ids.append(t.column("id"))
    c["errors"] = c["rows"] - c["ok"]
    c["unique_ids"] = len(pa.chunked_array([c for col in ids for c in col.chunks], pa.string()).unique())
    c["files"] = len(ids)
    return c
