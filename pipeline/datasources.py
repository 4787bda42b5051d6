"""Ray Data plumbing: the readers of `pipeline.io` as datasources, and the atomic Parquet sink."""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import pyarrow as pa
from ray.data.block import Block, BlockAccessor, BlockMetadata
from ray.data.datasource import Datasink, Datasource, FileBasedDatasource, ReadTask

from pipeline import io as pio
from pipeline import output, storage


class FileDatasource(FileBasedDatasource):
    """A per-file reader of `pipeline.io` behind Ray Data's file listing and read tasks."""

    def __init__(self, path: str, *, fmt: str, prompt_column: str, file_extensions: Sequence[str]):
        fs, inner = storage.filesystem(path)  # s3:// with the configured endpoint, carried to read tasks
        super().__init__(inner, filesystem=fs, file_extensions=list(file_extensions))
        self._fmt, self._prompt_column, self._root = fmt, prompt_column, pio.normalize_root(path)

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if self._fmt == "parquet":  # the footer is at the end: Parquet needs a seekable file
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rel = pio.relative_name(path, self._root)
        yield from pio.read_file(self._fmt, f, rel, self._prompt_column)

    def get_name(self) -> str:
        return f"Read{self._fmt.upper()}"


class HFDatasource(Datasource):
    """A saved `datasets` directory, read in contiguous row ranges (one per read task)."""

    def __init__(self, path: str, min_rows_per_task: int = 1024):
        self._path = path
        self._rows = pio.hf_num_rows(path)
        self._min_rows = min_rows_per_task

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        n_tasks = max(1, min(parallelism, math.ceil(self._rows / self._min_rows)))
        bounds = [self._rows * i // n_tasks for i in range(n_tasks + 1)]
        path = self._path
        tasks = []
        for lo, hi in zip(bounds, bounds[1:]):
            meta = BlockMetadata(num_rows=hi - lo, size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(lambda lo=lo, hi=hi: pio.read_hf_range(path, lo, hi), meta,
                                  per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadHFDataset"


def read_dataset(cfg: Any, fmt: str):  # (InputConfig, str) -> ray.data.Dataset
    """The input as a Ray Dataset with the reader's row key (and INPUT_ERROR where a row is bad)."""
    import ray.data

    if fmt == "hf":
        return ray.data.read_datasource(HFDatasource(cfg.path))
    exts = [e.lstrip(".") for e in pio.EXTENSIONS[fmt]]
    return ray.data.read_datasource(FileDatasource(cfg.path, fmt=fmt, prompt_column=cfg.prompt_column,
                                                   file_extensions=exts))


class PartSink(Datasink):
    """Writes each write task's rows as Parquet parts of at most `rows_per_file` rows, each atomically,
    under deterministic names.

    Ray Data gathers blocks until a write task has at least `rows_per_file` rows (min_rows_per_write),
    so a task may hold more (its blocks are batch_size rows): it writes them as several parts.
    """

    def __init__(self, out_dir: str, run_id: str, rows_per_file: int | None = None):
        self._out_dir, self._run_id, self._rows_per_file = out_dir, run_id, rows_per_file
        self._endpoint = storage.endpoint()  # the driver's S3 endpoint, for write tasks on other hosts

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict:
        storage.use_endpoint(self._endpoint)
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"files": [], "rows": 0}
        table = pa.concat_tables(tables, promote_options="permissive")
        step = self._rows_per_file or table.num_rows
        names, rows = [], 0
        for piece, start in enumerate(range(0, table.num_rows, step)):
            names.append(output.part_name(self._run_id, ctx.task_idx, piece))
            rows += output.write_part(table.slice(start, step), self._out_dir, names[-1])
        return {"files": names, "rows": rows}

    @property
    def min_rows_per_write(self) -> int | None:
        return self._rows_per_file

    def get_name(self) -> str:
        return "WriteParts"
