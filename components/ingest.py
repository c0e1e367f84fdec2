"""Stage `ingest`: bring every dataset into Arrow/Parquet under the output folder, streaming, source untouched.

Outputs `<out>/text.parquet`, `<out>/images.parquet` (labelled images to generate) and
`<out>/restore.parquet` (photos to restore), each in the raw schema of components.datasets.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from components import datasets
from components.common import (
    SPLIT_NAMES,
    ConfigError,
    DataError,
    load_params,
    progress,
    require,
    run_main,
    write_json,
)
from components.tables import ParquetSink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSource:
    path: Path | None
    num_records: int
    refs_per_record: int
    source_column: str
    reference_column: str
    id_column: str | None
    group_column: str | None = None  # carried into the `group` column: clean's text_split can group by it
    split_column: str | None = None  # train / val / test per row: clean's text_split `given` keeps them
    split_files: dict[str, Path] | None = None  # split -> file or folder, instead of `path`


@dataclass(frozen=True)
class IngestConfig:
    seed: int
    batch_rows: int
    text: TextSource
    images_path: Path | None
    restore_path: Path | None
    # Snapshots of the landing folder (monitoring/landing.py): each one's text/, images/<label>/, restore/ is
    # added to the input. The landing folder itself is never read: what is not versioned is not reproducible.
    landed: Path | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IngestConfig:
        """Validate the `ingest` section (and `base.seed`) before anything is written."""
        seed = require(params["base"], "seed", int, "base")
        batch_rows = require(params, "batch_rows", int, "ingest", low=1)
        text = require(params, "text", dict, "ingest")
        num_records = require(text, "num_records", int, "ingest.text", low=1)
        refs = require(text, "refs_per_record", int, "ingest.text", low=1, high=20)
        optional_columns = {}
        for key in ("id_column", "group_column", "split_column"):
            value = text.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"params key 'ingest.text.{key}' must be a column name or null, got {value!r}")
            optional_columns[key] = value
        split_files = _split_files(text.get("split_files"))
        path = _optional_path(text.get("path"), "ingest.text.path")
        if split_files is not None and path is not None:
            raise ConfigError("params keys 'ingest.text.path' and 'ingest.text.split_files' are both set: keep one")
        if split_files is not None and optional_columns["split_column"]:
            raise ConfigError("params keys 'ingest.text.split_files' and 'ingest.text.split_column' are both set: keep one")
        return cls(
            seed=seed,
            batch_rows=batch_rows,
            text=TextSource(
                path=path,
                num_records=num_records,
                refs_per_record=refs,
                source_column=require(text, "source_column", str, "ingest.text"),
                reference_column=require(text, "reference_column", str, "ingest.text"),
                id_column=optional_columns["id_column"],
                group_column=optional_columns["group_column"],
                split_column=optional_columns["split_column"],
                split_files=split_files,
            ),
            images_path=_optional_path(require(params, "images", dict, "ingest").get("path"), "ingest.images.path"),
            restore_path=_optional_path(require(params, "restore", dict, "ingest").get("path"), "ingest.restore.path"),
            landed=_optional_path(params.get("landed"), "ingest.landed"),
        )


CONFIG = IngestConfig


def _optional_path(value: Any, key: str) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"params key '{key}' must be a path or null, got {value!r}")
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"params key '{key}': {path} does not exist")
    return path


def _split_files(value: Any) -> dict[str, Path] | None:
    """`ingest.text.split_files`: {train: path, val: path, test: path} (val optional; any SPLIT_NAMES name)."""
    if value is None:
        return None
    key = "ingest.text.split_files"
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"params key '{key}' must map train / val / test to a file or folder, or be null, got {value!r}")
    files: dict[str, Path] = {}
    for name, path in value.items():
        split = SPLIT_NAMES.get(str(name).strip().casefold())
        if split is None or split in files:
            raise ConfigError(f"params key '{key}': {name!r} is not a split name (or repeats one); use train, val and test")
        if path is None:
            raise ConfigError(f"params key '{key}.{name}' must be a file or folder path")
        files[split] = _optional_path(path, f"{key}.{name}") or Path(path)
    if not {"train", "test"} <= set(files):
        raise ConfigError(f"params key '{key}' needs at least a train and a test entry, got {list(value)}")
    return files


def landed_folders(cfg: IngestConfig, name: str) -> list[tuple[str, Path]]:
    """(snapshot, folder) of each landed snapshot holding files of dataset `name`, in snapshot-name order."""
    if cfg.landed is None:
        return []
    folders = [(snapshot.name, snapshot / name) for snapshot in sorted(cfg.landed.iterdir()) if snapshot.is_dir()]
    return [(snapshot, folder) for snapshot, folder in folders if folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))]


def with_landed(
    primary: Iterator[pa.RecordBatch], cfg: IngestConfig, name: str, read: Callable[[Path], Iterator[pa.RecordBatch]]
) -> Iterator[pa.RecordBatch]:
    """The primary input, then every snapshot's files; their ids are prefixed with `landed/<snapshot>/`, so
    they never collide with the input's or with each other's."""
    yield from primary
    for snapshot, folder in landed_folders(cfg, name):
        for batch in read(folder):
            ids = pa.array([f"landed/{snapshot}/{i}" for i in batch.column("record_id").to_pylist()], pa.string())
            yield batch.set_column(batch.schema.get_field_index("record_id"), "record_id", ids)


def text_batches(cfg: IngestConfig) -> Iterator[pa.RecordBatch]:
    """The configured text input (the user's files, or the embedded generator), then landed files."""
    columns = {
        "source": cfg.text.source_column,
        "reference": cfg.text.reference_column,
        "id": cfg.text.id_column,
        "group": cfg.text.group_column,
        "split": cfg.text.split_column,
    }
    if cfg.text.split_files is not None:
        primary = split_file_batches(cfg.text.split_files, columns, cfg.batch_rows)
    elif cfg.text.path is None:
        primary = datasets.generated_text(cfg.text.num_records, cfg.text.refs_per_record, cfg.seed)
    else:
        primary = datasets.read_text_folder(cfg.text.path, columns, cfg.batch_rows)
    return with_landed(primary, cfg, "text", lambda folder: datasets.read_text_folder(folder, columns, cfg.batch_rows))


def split_file_batches(files: dict[str, Path], columns: dict[str, str | None], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Each split's file(s), every row marked with its split; ids are prefixed with the split, so two files
    of the same name in different folders never share one."""
    for split, path in files.items():
        for batch in datasets.read_text_folder(path, columns, batch_rows, given_split=split):
            ids = pa.array([f"{split}/{i}" for i in batch.column("record_id").to_pylist()], pa.string())
            yield batch.set_column(batch.schema.get_field_index("record_id"), "record_id", ids)


def image_batches(cfg: IngestConfig) -> Iterator[pa.RecordBatch]:
    if cfg.images_path is None:
        primary = datasets.builtin_digits(cfg.batch_rows)
    else:
        primary = datasets.image_folder(cfg.images_path, labelled=True, batch_rows=cfg.batch_rows)
    return with_landed(
        primary, cfg, "images", lambda folder: datasets.image_folder(folder, labelled=True, batch_rows=cfg.batch_rows)
    )


def restore_batches(cfg: IngestConfig) -> Iterator[pa.RecordBatch]:
    if cfg.restore_path is None:
        primary = datasets.builtin_photos(cfg.batch_rows)
    else:
        primary = datasets.image_folder(cfg.restore_path, labelled=False, batch_rows=cfg.batch_rows)
    return with_landed(
        primary, cfg, "restore", lambda folder: datasets.image_folder(folder, labelled=False, batch_rows=cfg.batch_rows)
    )


def ingest_dataset(batches: Iterator[pa.RecordBatch], schema: pa.Schema, out: Path, name: str) -> dict[str, int]:
    """Stream batches into `out`; return row counts. Nothing is written under the final name on failure."""
    errors = 0
    with ParquetSink(out, schema) as sink:
        for batch in progress(batches, desc=f"ingest {name}", unit="batch"):
            errors += batch.num_rows - batch.column("ingest_error").null_count
            sink.write(batch)
    if sink.rows == 0:
        out.unlink(missing_ok=True)
        raise DataError(f"{name}: the input has no rows")
    log.info("%s: %d rows ingested, %d with ingest errors (validation will quarantine them)", name, sink.rows, errors)
    return {"rows": sink.rows, "rows_with_ingest_errors": errors}


def ingest(cfg: IngestConfig, out_dir: Path) -> dict[str, dict[str, int]]:
    """Ingest all three datasets into out_dir; return per-dataset counts."""
    return {
        "text": ingest_dataset(text_batches(cfg), datasets.TEXT_SCHEMA, out_dir / "text.parquet", "text"),
        "images": ingest_dataset(image_batches(cfg), datasets.IMAGE_SCHEMA, out_dir / "images.parquet", "images"),
        "restore": ingest_dataset(restore_batches(cfg), datasets.IMAGE_SCHEMA, out_dir / "restore.parquet", "restore"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.ingest", description=__doc__)
    parser.add_argument("out", type=Path, help="output folder (data/raw)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        cfg = IngestConfig.from_params(load_params("ingest", args.params))
        counts = ingest(cfg, args.out)
        write_json(counts, args.out / "summary.json")

    run_main(body)


if __name__ == "__main__":
    main()
