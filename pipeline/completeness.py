"""Does the output hold every input id? The proof a run needs before it says `complete`.

The manifest says what a run did; the part files say what the output holds. A part deleted by hand,
or objects lost under an S3 prefix, leave a manifest that still says `complete`, so a run checks the
parts themselves: the ids the job's reader gives the input (one per row, or one per (row, sample)
with num_samples) against the `id` column of every visible part (that column only, cheap).

An input row counts as present when the output holds its id or its reader key `<file>:<row>`: a
row whose given id cannot be read (a corrupt Parquet page) is written as an error row under its key,
and the driver, reading the id column alone, may still see the real id.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import io as pio
from pipeline import output, storage
from pipeline.config import InputConfig

SHOWN = 5  # missing ids named in a message


@dataclass(frozen=True)
class InputIds:
    """Every row's id as the job's reader assigns it, and its reader key (equal where no id column is given)."""

    ids: pa.Array
    keys: pa.Array

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class Completeness:
    """How many input ids the output holds against how many the input has."""

    input_ids: int                # ids the input gives (rows x num_samples)
    output_ids: int               # of those, how many the output's parts hold
    missing_ids: int              # input_ids - output_ids
    duplicate_rows: int           # rows of the output whose id an earlier row already has
    missing_examples: list[str] = field(default_factory=list)  # up to SHOWN of the missing ids

    @property
    def complete(self) -> bool:
        """Every input id is in the output."""
        return self.missing_ids == 0

    def to_dict(self) -> dict:
        """The counts for the summary JSON and the manifest."""
        return {k: v for k, v in asdict(self).items() if k != "missing_examples"}


def input_ids(cfg: InputConfig, fmt: str, num_samples: int = 1) -> InputIds:
    """The ids the job's reader gives every input row (with num_samples > 1, '<id>#<sample>').

    Parquet: row counts from the footers, plus the id column where one is given; saved datasets: the
    row count and the id column; JSONL and CSV: the files parsed once (as check_unique_ids does).
    """
    ids, keys = [], []
    for table in _key_tables(cfg, fmt):
        with_ids = pio.expand_samples(pio.assign_ids(table, cfg.id_column), num_samples)
        ids.append(with_ids.column("id"))
        keys.append(pio.expand_samples(_set_id(table, table.column(pio.ROW_KEY)), num_samples).column("id"))
    return InputIds(_one_array(ids), _one_array(keys))


def _set_id(table: pa.Table, ids: pa.Array) -> pa.Table:
    """The table with `ids` as its only `id` column (what expand_samples reads)."""
    table = table.drop_columns([n for n in table.column_names if n == "id"])
    return table.append_column("id", ids)


def _one_array(columns: list) -> pa.Array:
    chunks = [c for col in columns for c in (col.chunks if isinstance(col, pa.ChunkedArray) else [col])]
    return pa.chunked_array(chunks, pa.string()).combine_chunks() if chunks else pa.array([], pa.string())


def _key_tables(cfg: InputConfig, fmt: str) -> Iterator[pa.Table]:
    """Tables of the reader key (and the id column, where given) of every input row, file by file."""
    name = cfg.id_column
    if fmt == "hf":
        import datasets

        ds = datasets.load_from_disk(cfg.path)
        n = len(ds)
        columns = {pio.ROW_KEY: pa.array([str(i) for i in range(n)], pa.string())}
        if name is not None:
            columns[name] = pc.cast(ds.select_columns([name]).with_format("arrow")[:][name], pa.string())
        yield pa.table(columns)
        return
    fs, files = pio._input_files_fs(cfg.path, fmt)
    root = pio.normalize_root(cfg.path)
    for file in files:
        # the path as Ray Data's listing spells it (absolute, unresolved), so the keys match the reader's
        rel = pio.relative_name(file if storage.is_remote(cfg.path) else os.path.abspath(file), root)
        with fs.open_input_file(file) as fh:
            if fmt == "parquet":
                yield from _parquet_keys(fh, rel, name)
                continue
            for table in pio.read_file(fmt, pio._maybe_gunzip(fh, Path(file)), rel, cfg.prompt_column):
                keep = [n for n in (pio.ROW_KEY, name) if n is not None and n in table.column_names]
                yield table.select(keep)


def _parquet_keys(fh, rel: str, name: str | None) -> Iterator[pa.Table]:
    """Keys of a Parquet file from its footer; the id column row group by row group (an unreadable
    one gives null ids, which fall back to the keys as in the reader)."""
    pf = pq.ParquetFile(fh)
    start = 0
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        columns = {pio.ROW_KEY: pa.array([f"{rel}:{i}" for i in range(start, start + n)], pa.string())}
        if name is not None and name in pf.schema_arrow.names:
            try:
                columns[name] = pc.cast(pf.read_row_group(group, columns=[name]).column(name), pa.string())
            except (pa.ArrowInvalid, OSError):
                columns[name] = pa.nulls(n, pa.string())
        yield pa.table(columns)
        start += n


def check(expected: InputIds, out_dir: str) -> Completeness:
    """Which of the expected ids the output's parts hold (reads each part's id column)."""
    written = output.done_ids(out_dir)
    unique = pc.unique(written)
    present = pc.or_(pc.is_in(expected.ids, value_set=unique), pc.is_in(expected.keys, value_set=unique))
    missing = expected.ids.filter(pc.invert(present))
    return Completeness(input_ids=len(expected), output_ids=len(expected) - len(missing),
                        missing_ids=len(missing), duplicate_rows=len(written) - len(unique),
                        missing_examples=missing.slice(0, SHOWN).to_pylist())
