"""Input readers (Parquet, JSONL, CSV, Hugging Face `datasets` directories) and row ids.

Every reader streams one file (or one shard of a saved dataset) in chunks and tags each row with
`<file>:<row>` (path relative to the input root, 0-based data row), which becomes the row id when
the input has no id column: stable across reruns, distinct for duplicate prompts. Rows a reader
cannot parse (a broken JSON line, invalid UTF-8, a non-string prompt) are kept, with a reason in
the INPUT_ERROR column, so they end as error rows instead of failing the file.

This module imports no Ray: `pipeline.datasources` wraps these generators for Ray Data, and the
driver uses them directly for its up-front checks.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import InputConfig, JobConfigError
from pipeline.schema import INPUT_ERROR, OUTPUT_COLUMNS, passthrough_name

ROW_KEY = "__prophet_row_key"   # "<file>:<row>", added by every reader
CHUNK_ROWS = 1024               # rows per chunk a reader yields
EXTENSIONS = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"),
              "csv": (".csv", ".csv.gz")}
HF_MARKERS = ("dataset_info.json", "state.json")


# ----------------------------------------------------------------------------- formats and files

def detect_format(cfg: InputConfig) -> str:
    """The input format: the configured one, or decided from the path ('hf' for a saved dataset)."""
    if cfg.format != "auto":
        return cfg.format
    if storage.is_remote(cfg.path):
        names = storage.list_files(cfg.path)
        if not names:
            raise JobConfigError(f"input.path: no files under {cfg.path}")
    else:
        path = Path(cfg.path)
        if path.is_dir() and any((path / m).is_file() for m in HF_MARKERS):
            return "hf"
        names = [str(p) for p in input_files_any(path)]
    for fmt, exts in EXTENSIONS.items():
        if names and all(n.endswith(exts) for n in names):
            return fmt
    raise JobConfigError(f"input.format: cannot tell the format of {cfg.path} from its file extensions "
                         f"({sorted({Path(n).suffix for n in names}) or 'no files'}); set input.format")


def input_files_any(path: Path) -> list[Path]:
    """Visible files of a file or directory path (names starting with '.' or '_' are skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise JobConfigError(f"input.path: no such file or directory {path}")
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))


def input_files(path: Path, fmt: str) -> list[Path]:
    """The files of a file-format input, in a stable order."""
    files = [p for p in input_files_any(path) if str(p).endswith(EXTENSIONS[fmt])]
    if not files:
        raise JobConfigError(f"input.path: no {fmt} files ({', '.join(EXTENSIONS[fmt])}) under {path}")
    return files


def relative_name(path: str, root: str) -> str:
    """Path of a file relative to the input root ('a/b.jsonl'); the file name for a single file."""
    root = root.rstrip("/")
    if path == root:
        return os.path.basename(path)
    if path.startswith(root + "/"):
        return path[len(root) + 1:]
    return os.path.basename(path)


def normalize_root(path: str) -> str:
    """The input root as Ray Data's file listing spells its paths (absolute, no scheme)."""
    return path.split("://", 1)[1] if "://" in path else os.path.abspath(path)


# ----------------------------------------------------------------------------- per-file readers

def _keys(rel: str, start: int, n: int) -> pa.Array:
    return pa.array([f"{rel}:{i}" for i in range(start, start + n)], pa.string())


def _with_keys(table: pa.Table, rel: str, start: int) -> pa.Table:
    return table.append_column(ROW_KEY, _keys(rel, start, table.num_rows))


def _table_from_rows(rows: list[dict], errors: list[str | None], prompt_column: str) -> pa.Table:
    """Rows parsed from JSON -> table; a non-string prompt becomes null with a reason."""
    for i, row in enumerate(rows):
        value = row.get(prompt_column)
        if value is not None and not isinstance(value, str) and errors[i] is None:
            errors[i] = f"{prompt_column} is a {type(value).__name__}, not a string"
            row[prompt_column] = None
    names = list(dict.fromkeys(k for row in rows for k in row))
    # Every column is text, so its type never depends on which lines share a chunk: chunks of
    # different files and blocks are concatenated downstream, and an int64 chunk beside a string
    # chunk failed the whole job. Strings stay as they are; any other JSON value becomes its JSON text.
    columns = {name: pa.array([_json_text(row.get(name)) for row in rows], pa.string()) for name in names}
    columns[INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(columns) if rows else pa.table({INPUT_ERROR: pa.array([], pa.string())})


def _json_text(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else json.dumps(value)


def _parse_json_line(raw: bytes, lineno: int) -> tuple[dict, str | None]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return {}, f"line {lineno}: invalid UTF-8 ({e.reason} at byte {e.start})"
    except json.JSONDecodeError as e:
        return {}, f"line {lineno}: invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(value, dict):
        return {}, f"line {lineno}: a JSON {type(value).__name__}, not an object"
    return value, None


def read_jsonl(f: IO[bytes], rel: str, prompt_column: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """JSON Lines -> tables of text columns (non-string values as JSON text); blank lines are skipped,
    broken lines become rows with a reason."""
    rows: list[dict] = []
    errors: list[str | None] = []
    start = 0
    for lineno, raw in enumerate(io.BufferedReader(f, 1 << 20), start=1):  # type: ignore[arg-type]
        if not raw.strip():
            continue
        row, err = _parse_json_line(raw, lineno)
        rows.append(row)
        errors.append(err)
        if len(rows) == chunk_rows:
            yield _with_keys(_table_from_rows(rows, errors, prompt_column), rel, start)
            start, rows, errors = start + len(rows), [], []
    if rows:
        yield _with_keys(_table_from_rows(rows, errors, prompt_column), rel, start)


def read_csv(f: IO[bytes], rel: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """CSV with a header row -> tables of strings (CSV has no types; every chunk gets one schema)."""
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad cell fails one row
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")  # type: ignore[arg-type]
    reader = csv.reader(text)
    header = next(reader, None)
    if header is None:
        return
    start = 0
    while True:
        chunk = [r for _, r in zip(range(chunk_rows), reader)]
        if not chunk:
            return
        yield _with_keys(_csv_table(header, chunk, start), rel, start)
        start += len(chunk)


def _csv_table(header: list[str], rows: list[list[str]], start: int) -> pa.Table:
    errors: list[str | None] = []
    for i, r in enumerate(rows):
        bad = len(r) != len(header)
        errors.append(f"row {start + i}: {len(r)} fields, header has {len(header)}" if bad else None)
        if any(_has_surrogates(v) for v in r):
            errors[-1] = f"row {start + i}: invalid UTF-8"
            rows[i] = [v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for v in r]
    columns = {h: pa.array([r[j] if j < len(r) else None for r in rows], pa.string())
               for j, h in enumerate(header)}
    columns[INPUT_ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def _has_surrogates(s: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in s)


def read_parquet(f: Any, rel: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Parquet file -> tables, row group by row group; rows of an unreadable row group become error rows.

    A corrupt data page passes the footer check and fails only when read: its row group's rows keep
    their '<file>:<row>' keys (the footer gives the count) with a reason, so nothing is silently lost.
    """
    pf = pq.ParquetFile(f)
    start = 0
    for group in range(pf.num_row_groups):
        end = start + pf.metadata.row_group(group).num_rows
        try:
            for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[group]):
                table = pa.Table.from_batches([batch])
                table = table.append_column(INPUT_ERROR, pa.nulls(table.num_rows, pa.string()))
                yield _with_keys(table, rel, start)
                start += table.num_rows
        except (pa.ArrowInvalid, OSError) as e:
            yield _unreadable_rows(pf.schema_arrow, rel, start, end - start, f"row group {group} unreadable: {e}")
        start = end


def _unreadable_rows(schema: pa.Schema, rel: str, start: int, n: int, reason: str) -> pa.Table:
    """n rows of all-null columns (so chunks share a schema) with a reason in INPUT_ERROR."""
    columns = {f.name: pa.nulls(n, f.type) for f in schema if f.name not in (INPUT_ERROR, ROW_KEY)}
    columns[INPUT_ERROR] = pa.array([" ".join(reason.split())] * n, pa.string())
    return _with_keys(pa.table(columns), rel, start)


def read_file(fmt: str, f: Any, rel: str, prompt_column: str) -> Iterator[pa.Table]:
    """Dispatch to the reader of `fmt`."""
    if fmt == "jsonl":
        return read_jsonl(f, rel, prompt_column)
    if fmt == "csv":
        return read_csv(f, rel)
    return read_parquet(f, rel)


def read_hf_range(path: str, start: int, stop: int, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """Rows [start, stop) of a saved `datasets` directory (memory-mapped, read chunk by chunk)."""
    import datasets

    ds = datasets.load_from_disk(path)
    for lo in range(start, stop, chunk_rows):
        hi = min(stop, lo + chunk_rows)
        table = pa.table(ds.with_format("arrow")[lo:hi])
        yield table.append_column(ROW_KEY, pa.array([str(i) for i in range(lo, hi)], pa.string()))


def hf_num_rows(path: str) -> int:
    """Rows of a saved `datasets` directory (a DatasetDict is refused: pick one split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises FileNotFoundError or its own errors
        raise JobConfigError(f"input.path: {path} is not a dataset saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise JobConfigError(f"input.path: {path} holds a DatasetDict with splits {list(ds)}; "
                             f"point input.path at one split's directory, e.g. {path}/{next(iter(ds))}")
    return len(ds)


# ----------------------------------------------------------------------------- driver-side checks

def peek(cfg: InputConfig, fmt: str, max_files: int = 64) -> pa.Schema:
    """Schema of the first non-empty chunk of the input, read without Ray (for up-front checks)."""
    return peek_rows(cfg, fmt, max_files).schema


def peek_rows(cfg: InputConfig, fmt: str, max_files: int = 64) -> pa.Table:
    """The first non-empty chunk of the input (up to CHUNK_ROWS rows), read without Ray."""
    if fmt == "hf":
        if hf_num_rows(cfg.path) == 0:
            raise JobConfigError(f"input.path: {cfg.path} has no rows")
        return next(read_hf_range(cfg.path, 0, 1))
    if fmt == "hf" and storage.is_remote(cfg.path):
        raise JobConfigError(f"input.path: a saved `datasets` directory must be local ({cfg.path}); "
                             "export it to Parquet for object storage")
    fs, files = _input_files_fs(cfg.path, fmt)
    for file in files[:max_files]:
        with fs.open_input_file(file) as fh:
            raw: Any = _maybe_gunzip(fh, Path(file))
            for table in read_file(fmt, raw, Path(file).name, cfg.prompt_column):
                if table.num_rows:
                    return table
    raise JobConfigError(f"input.path: {cfg.path} has no rows (looked at {min(len(files), max_files)} files)")


def _input_files_fs(path: str, fmt: str) -> tuple[Any, list[str]]:
    """(file system, the input's files of `fmt` as paths inside it), local or object storage."""
    if not storage.is_remote(path):
        return storage.filesystem(path)[0], [str(p) for p in input_files(Path(path), fmt)]
    files = [f for f in storage.list_files(path) if f.endswith(EXTENSIONS[fmt])]
    if not files:
        raise JobConfigError(f"input.path: no {fmt} files ({', '.join(EXTENSIONS[fmt])}) under {path}")
    return storage.filesystem(path)[0], files


def _maybe_gunzip(fh: IO[bytes], file: Path) -> IO[bytes]:
    import gzip

    return gzip.GzipFile(fileobj=fh) if file.suffix == ".gz" else fh  # type: ignore[return-value]


def check_columns(cfg: InputConfig, schema: pa.Schema) -> None:
    """The configured prompt/messages/id columns exist in the input; errors list what does."""
    have = [n for n in schema.names if n not in (ROW_KEY, INPUT_ERROR)]
    wanted = [("input.messages_column", cfg.messages_column) if cfg.messages_column
              else ("input.prompt_column", cfg.prompt_column)]
    if cfg.id_column:
        wanted.append(("input.id_column", cfg.id_column))
    for field, name in wanted:
        if name not in have:
            raise JobConfigError(f"{field}: the input has no column {name!r} (columns: {have})")


def check_parquet_files(cfg: InputConfig) -> pa.Schema:
    """Every Parquet input file has a readable footer, and their schemas agree; returns the union.

    A corrupt file, or a column whose type differs between files, is named before any work; a
    column missing from some files, or all-null in some, is fine (the union gives it one type).
    """
    schemas: dict[Path, pa.Schema] = {}
    fs, files = _input_files_fs(cfg.path, "parquet")
    for name in files:
        file = Path(name)
        try:
            schemas[file] = pq.read_schema(name, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise JobConfigError(f"input.path: {file} is not a readable Parquet file ({e}); "
                                 "remove or replace it") from None
    try:
        return pa.unify_schemas(list(schemas.values()), promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        raise JobConfigError(f"input.path: {_type_conflict(schemas)}; give the column one type in every "
                             "file") from None


def _type_conflict(schemas: dict[Path, pa.Schema]) -> str:
    """'column 'x' is int64 in a.parquet but string in b.parquet' for the first column that differs."""
    seen: dict[str, tuple[pa.DataType, Path]] = {}
    for file, schema in schemas.items():
        for f in schema:
            if pa.types.is_null(f.type):
                continue
            first = seen.setdefault(f.name, (f.type, file))
            try:
                pa.unify_schemas([pa.schema([pa.field(f.name, first[0])]), pa.schema([f])],
                                 promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return f"column {f.name!r} is {first[0]} in {first[1].name} but {f.type} in {file.name}"
    return "the files' schemas cannot be merged"


def conform_to(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """The batch with every column of `schema` in its type (missing ones as nulls), then the reader's own."""
    columns = [batch.column(f.name).cast(f.type) if f.name in batch.column_names else pa.nulls(len(batch), f.type)
               for f in schema]
    rest = [n for n in batch.column_names if n not in schema.names]
    return pa.Table.from_arrays(columns + [batch.column(n) for n in rest],
                                names=schema.names + rest)


def check_unique_ids(cfg: InputConfig, fmt: str, shown: int = 3) -> None:
    """A given id column holds no id twice (null/empty ids fall back to row keys, so they are exempt).

    Reads only the id column (Parquet, saved datasets) or parses the files once (JSONL, CSV): ids
    of every row end in one array, as resume's set of written ids does.
    """
    name = cfg.id_column
    if name is None:
        return
    ids = pa.chunked_array(list(_id_chunks(cfg, fmt, name)), pa.string())
    ids = ids.filter(pc.and_(pc.is_valid(ids), pc.not_equal(ids, "")))
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        examples = ", ".join(f"{v['values']!r} x{v['counts']}" for v in dup.to_pylist()[:shown])
        raise JobConfigError(f"input.id_column: {len(dup)} ids of column {name!r} appear more than once "
                             f"({examples}); every row needs its own id: fix the input, or unset "
                             "input.id_column to derive ids from file and row")


def _id_chunks(cfg: InputConfig, fmt: str, name: str) -> Iterator[pa.Array]:
    """The id column of the whole input as string arrays, chunk by chunk."""
    if fmt == "hf":
        import datasets

        column = datasets.load_from_disk(cfg.path).select_columns([name]).with_format("arrow")[:][name]
        yield from pc.cast(column, pa.string()).chunks
        return
    fs, files = _input_files_fs(cfg.path, fmt)
    for file in files:
        with fs.open_input_file(file) as fh:
            if fmt == "parquet":
                tables: Iterator[Any] = pq.ParquetFile(fh).iter_batches(columns=[name])
            else:
                tables = read_file(fmt, _maybe_gunzip(fh, Path(file)), Path(file).name, cfg.prompt_column)
            for t in tables:
                if name in t.schema.names:
                    column = pc.cast(t.column(name), pa.string())
                    yield from column.chunks if isinstance(column, pa.ChunkedArray) else [column]


# ----------------------------------------------------------------------------- ids

def assign_ids(batch: pa.Table, id_column: str | None) -> pa.Table:
    """Set the string `id` column: the input's id column, or the reader's '<file>:<row>' key.

    A null or empty input id falls back to the row key and marks the row as an input error, so
    the row still appears exactly once in the output. An input column called "id" that is not the
    id column is kept as a passthrough column ("input_id"), never overwritten.
    """
    if "id" in batch.column_names and id_column != "id":
        names = [passthrough_name("id", set(batch.column_names) | set(OUTPUT_COLUMNS)) if n == "id" else n
                 for n in batch.column_names]
        batch = batch.rename_columns(names)
    keys = batch.column(ROW_KEY)
    if id_column is None:
        ids = keys
    else:
        given = pc.cast(batch.column(id_column), pa.string())
        missing = pc.or_(pc.is_null(given), pc.equal(given, ""))
        missing = pc.fill_null(missing, True)
        ids = pc.if_else(missing, keys, given)
        reason = pa.array([f"{id_column} is null or empty" if m else None
                           for m in missing.to_pylist()], pa.string())
        errors = batch.column(INPUT_ERROR) if INPUT_ERROR in batch.column_names else pa.nulls(len(batch), pa.string())
        batch = _set(batch, INPUT_ERROR, pc.coalesce(errors, reason))
    return _set(batch, "id", ids)


SAMPLE_SEP = "#"  # output id of sample k of input id x: "x#k"


def expand_samples(batch: pa.Table, num_samples: int) -> pa.Table:
    """Each row `num_samples` times, with columns sample (0..n-1) and source_id (the input id) and
    the unique output id '<input id>#<sample>'; unchanged for one sample, so such outputs stay as before.

    The actor seeds a row from (job seed, output id), so every sample gets its own seed.
    """
    if num_samples == 1:
        return batch
    n = len(batch)
    take = pa.array([i for i in range(n) for _ in range(num_samples)], pa.int64())
    out = batch.take(take)
    sample = pa.array(list(range(num_samples)) * n, pa.int32())
    source = out.column("id")
    out = _set(out, "source_id", source)
    out = _set(out, "sample", sample)
    ids = pc.binary_join_element_wise(source, pc.cast(sample, pa.string()), SAMPLE_SEP)
    return _set(out, "id", ids)


def prompts_not_done(batch: pa.Table, id_column: str | None, done: pa.Array,
                     schema: pa.Schema | None = None, num_samples: int = 1) -> pa.Table:
    """The batch with its `id` column, less the input rows whose every sample's id is in `done`
    (written by earlier runs): --limit counts these prompts, each with all its samples.

    With `schema` (the union of the Parquet inputs' schemas) every batch gets the same columns and
    types first, so blocks of different files can be merged.
    """
    if schema is not None:
        batch = conform_to(batch, schema)
    batch = assign_ids(batch, id_column)
    if len(done) == 0:
        return batch
    ids = batch.column("id")
    if num_samples == 1:
        return batch.filter(pc.invert(pc.is_in(ids, value_set=done)))
    finished = pc.is_in(pc.binary_join_element_wise(ids, "0", SAMPLE_SEP), value_set=done)
    for k in range(1, num_samples):
        finished = pc.and_(finished, pc.is_in(pc.binary_join_element_wise(ids, str(k), SAMPLE_SEP), value_set=done))
    return batch.filter(pc.invert(finished))


def samples_not_done(batch: pa.Table, done: pa.Array, num_samples: int = 1) -> pa.Table:
    """One row per sample of each prompt (expand_samples), less the samples in `done` (a prompt that
    a killed run left half-sampled gets only its missing samples)."""
    if num_samples == 1:
        return batch  # prompts_not_done already dropped the done ids
    batch = expand_samples(batch, num_samples)
    if len(done) == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=done)))


def ids_not_done(batch: pa.Table, id_column: str | None, done: pa.Array,
                 schema: pa.Schema | None = None, num_samples: int = 1) -> pa.Table:
    """The batch with its `id` column, one row per sample, less the rows whose id is in `done`
    (prompts_not_done, then samples_not_done, without a --limit between them)."""
    return samples_not_done(prompts_not_done(batch, id_column, done, schema, num_samples), done, num_samples)


def _set(table: pa.Table, name: str, column: Any) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)
