"""Parquet helpers for the data stages: atomic writes, streaming reads."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write a table so that a crash never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        pq.write_table(table, tmp_path, compression="zstd")
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


class ParquetSink:
    """Append record batches to a Parquet file that appears under its final name only on `close()`."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = path.with_name(f".{path.name}.partial")
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            self._writer.write_table(table.cast(self.schema))
            self.rows += batch.num_rows

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ParquetSink:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_parquet(path: Path, batch_rows: int, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file in record batches, so inputs larger than memory work."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)


@dataclass(frozen=True)
class Rows:
    """A table a stage streams, as often as it needs: a Parquet file, or an in-memory table (tests, benches),
    in record batches of at most `batch_rows`."""

    schema: pa.Schema
    num_rows: int
    batch_rows: int
    _open: Callable[[list[str] | None], Iterator[pa.RecordBatch]]

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        return self._open(columns)

    @classmethod
    def of_file(cls, path: Path, batch_rows: int) -> Rows:
        metadata = pq.ParquetFile(path).metadata
        return cls(pq.read_schema(path), metadata.num_rows, batch_rows, lambda columns: iter_parquet(path, batch_rows, columns))

    @classmethod
    def of_table(cls, table: pa.Table, batch_rows: int) -> Rows:
        def open_table(columns: list[str] | None) -> Iterator[pa.RecordBatch]:
            yield from (table.select(columns) if columns is not None else table).to_batches(max_chunksize=batch_rows)

        return cls(table.schema, table.num_rows, batch_rows, open_table)


def copy_into(sink: ParquetSink, paths: list[Path], batch_rows: int) -> None:
    """Append the rows of each Parquet file to `sink`, in order, a batch at a time."""
    for path in paths:
        for batch in iter_parquet(path, batch_rows):
            sink.write(batch)


def batch_rows_within(path: Path, column: str, budget_bytes: int, most: int) -> int:
    """Rows per batch so that `column` (encoded images) takes about `budget_bytes` a batch, at most `most`."""
    metadata = pq.ParquetFile(path).metadata
    if not metadata.num_rows:
        return most
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    size = sum(metadata.row_group(i).column(index).total_uncompressed_size for i in range(metadata.num_row_groups))
    return max(1, min(most, budget_bytes * metadata.num_rows // max(size, 1)))
