"""Parquet helpers for the data stages: atomic writes, streaming reads, row digests."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


class DigestSpill:
    """(n, 2) uint64 digests appended a batch at a time to a scratch file, read back as a memmap: a stage keeps
    per-row digests of millions of rows on disk, not in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0

    def append(self, digests: np.ndarray) -> None:
        # Opened per batch: no handle outlives a failed stage.
        with self.path.open("ab") as scratch:
            scratch.write(np.ascontiguousarray(digests, dtype=np.uint64).tobytes())
        self.rows += len(digests)

    def array(self) -> np.ndarray:
        """Every appended digest."""
        if not self.rows:
            return np.zeros((0, 2), dtype=np.uint64)
        return np.memmap(self.path, dtype=np.uint64, mode="r", shape=(self.rows, 2))


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
    """Stream a Parquet file in record batches, so inputs larger than memory work. Without pre-buffering: on a
    local file it gains nothing, and its cache of read-ahead column chunks grew with every row group read
    (97 -> 192 MB over a 1.6 M-row file; 70 MB flat without)."""
    yield from pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=batch_rows, columns=columns)


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


IMAGE_BATCH_BYTES = 64 << 20
"""Encoded image bytes a data stage reads per batch: a batch of large photos stays far below a batch of text."""


def image_batch_rows(path: Path, most: int) -> int:
    """Rows per batch of an image table: about IMAGE_BATCH_BYTES of encoded images, at most `most`."""
    return batch_rows_within(path, "image", IMAGE_BATCH_BYTES, most)


def batch_rows_within(path: Path, column: str, budget_bytes: int, most: int) -> int:
    """Rows per batch so that `column` (encoded images) takes about `budget_bytes` a batch, at most `most`."""
    metadata = pq.ParquetFile(path).metadata
    if not metadata.num_rows:
        return most
    paths = [metadata.schema.column(i).path for i in range(metadata.num_columns)]
    if column not in paths:
        raise ValueError(f"{path}: no column {column!r}")
    index = paths.index(column)
    size = sum(metadata.row_group(i).column(index).total_uncompressed_size for i in range(metadata.num_row_groups))
    return max(1, min(most, budget_bytes * metadata.num_rows // max(size, 1)))


DIGEST_SEEDS = (0x6A09E667, 0xBB67AE85)


def row_digests(columns: list[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """(n, 2) uint64: each row's values hashed by polars with two seeds. Millions of rows dedupe in a few dozen
    MB where their strings would take GBs; two different rows share both halves with odds of about 2**-128."""
    import polars as pl

    frame = pl.from_arrow(pa.table({f"c{i}": column for i, column in enumerate(columns)}))
    return np.stack([frame.hash_rows(seed=seed).to_numpy() for seed in DIGEST_SEEDS], axis=1)


@dataclass(frozen=True)
class Distinct:
    """The distinct digests of a column of rows: `ids` numbers each row's digest (0.. in digest order),
    `first` is the row where each first occurs."""

    ids: np.ndarray
    first: np.ndarray

    @property
    def count(self) -> int:
        return len(self.first)

    def first_rows(self) -> np.ndarray:
        """Boolean mask: True on the first row of each distinct digest."""
        mask = np.zeros(len(self.ids), dtype=bool)
        mask[self.first] = True
        return mask


PART_ROWS = 1 << 22
"""Rows a distinct() sorts at once: a larger set is split by the digests' top bits into parts of about this
many (for spread digests: one digest repeated millions of times stays in one part), sorted one at a time, so
the sort buffers do not grow with the number of rows."""


def distinct(digests: np.ndarray, rows: np.ndarray | None = None, part_rows: int = PART_ROWS) -> Distinct:
    """Group rows by digest: ids 0.. in digest order, and the row where each first occurs.

    `digests` may be a memmap (DigestSpill.array); `rows` (sorted row numbers) restricts it to those rows, whose
    positions in `rows` the result numbers. Above `part_rows` rows, the rows are split by the top bits of their
    first digest half; every part holds a range of digests, so numbering the parts in turn gives the same ids and
    first rows as one sort of the whole.
    """
    count = len(digests) if rows is None else len(rows)
    parts = 1 << max(0, math.ceil(math.log2(max(1, count) / part_rows)))
    if parts == 1:
        return _distinct_in_memory(np.asarray(digests if rows is None else digests[rows], dtype=np.uint64))
    shift = np.uint64(64 - int(math.log2(parts)))
    part_of = np.empty(count, dtype=np.uint16)
    for start in range(0, count, part_rows):
        chunk = slice(start, start + part_rows)
        first_half = digests[chunk, 0] if rows is None else digests[rows[chunk], 0]
        part_of[chunk] = np.asarray(first_half, dtype=np.uint64) >> shift
    ids = np.empty(count, dtype=np.int64)
    firsts, offset = [], 0
    for part in range(parts):
        members = np.flatnonzero(part_of == part)
        local = _distinct_in_memory(np.asarray(digests[members if rows is None else rows[members]], dtype=np.uint64))
        ids[members] = local.ids + offset
        firsts.append(members[local.first])
        offset += local.count
    return Distinct(ids, np.concatenate(firsts))


def _distinct_in_memory(digests: np.ndarray) -> Distinct:
    """distinct() of an in-memory (n, 2) array: one stable 64-bit sort (the second half settles a rare
    first-half tie)."""
    order = np.argsort(digests[:, 0], kind="stable")
    ordered = digests[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = ordered[1:, 0] != ordered[:-1, 0]
    tied = ~new[1:]
    if (ordered[1:, 1][tied] != ordered[:-1, 1][tied]).any():
        order = np.lexsort((digests[:, 1], digests[:, 0]))  # stable too: first occurrences stay first
        ordered = digests[order]
        new[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return Distinct(ids, order[new])
