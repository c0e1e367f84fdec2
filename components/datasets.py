"""Readers for every input the ingest stage accepts: the embedded defaults and the user's own files.

Each reader yields plain Python rows in batches, matching the raw schemas below. A problem with one row
(undecodable bytes, a corrupt image, a path that escapes the data folder) becomes that row's
`ingest_error`, so validation quarantines it and no row is lost; a problem with a whole file (missing
columns, no rows) raises DataError naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from components.common import SPLIT_NAMES, DataError, resolve_inside
from components.image_io import encode_png

log = logging.getLogger(__name__)

TEXT_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("source", pa.string()),
        ("reference", pa.string()),
        ("origin", pa.string()),
        ("ingest_error", pa.string()),
        ("group", pa.string()),  # the user's group column (ingest.text.group_column), else null
        ("given_split", pa.string()),  # train / val / test from the user's split column or split files, else null
    ]
)

IMAGE_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("mode", pa.string()),
        ("channels", pa.int32()),
        ("format", pa.string()),
        ("image", pa.binary()),
        ("origin", pa.string()),
        ("ingest_error", pa.string()),
    ]
)

TEXT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

BUILTIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "motorcycle_left",
    "retina",
    "immunohistochemistry",
    "china",
    "flower",
)
"""Natural photographs shipped inside scikit-image and scikit-learn: nothing is downloaded."""


# --- text -------------------------------------------------------------------------------------------


def list_files(root: Path, suffixes: set[str] | dict[str, str]) -> list[Path]:
    """Files under root (or root itself) with one of the suffixes, sorted so ingestion is deterministic."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"input path does not exist: {root}")
    # Symlinks are listed too: each is checked against the root by the reader and quarantined if it escapes.
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and (p.is_file() or p.is_symlink()))


def _decode_column(values: pa.Array, column: str) -> tuple[list[str | None], list[str | None]]:
    """Decode a binary column to text; invalid UTF-8 is replaced and reported per row, never dropped."""
    try:
        return values.cast(pa.string()).to_pylist(), [None] * len(values)
    except pa.ArrowInvalid:
        texts: list[str | None] = []
        errors: list[str | None] = []
        for raw in values.to_pylist():
            if raw is None:
                texts.append(None)
                errors.append(None)
                continue
            try:
                texts.append(raw.decode("utf-8"))
                errors.append(None)
            except UnicodeDecodeError as err:
                texts.append(raw.decode("utf-8", errors="replace"))
                errors.append(f"invalid UTF-8 in column '{column}' at byte {err.start}")
        return texts, errors


def _merge_errors(*columns: list[str | None]) -> list[str | None]:
    return ["; ".join(e for e in row if e) or None for row in zip(*columns, strict=True)]


def _require_columns(available: list[str], wanted: dict[str, str], path: Path) -> None:
    missing = [f"{role} column '{name}'" for role, name in wanted.items() if name not in available]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; the file has columns {available}")


def given_splits(values: list[Any], column: str) -> tuple[list[str | None], list[str | None]]:
    """A split column's values as train / val / test (SPLIT_NAMES, any case), and per row the error of a
    value that names no split."""
    splits: list[str | None] = []
    errors: list[str | None] = []
    for value in values:
        name = SPLIT_NAMES.get(str(value).strip().casefold()) if value is not None else None
        splits.append(name)
        errors.append(
            None
            if name is not None
            else f"split column '{column}' has {'no value' if value is None else repr(value)}; use train, val or test"
        )
    return splits, errors


def _text_batch(
    records: dict[str, list[Any]], ids: list[str], origin: str, errors: list[str | None], given_split: str | None = None
) -> pa.RecordBatch:
    n = len(ids)
    return pa.RecordBatch.from_pydict(
        {
            "record_id": ids,
            "source": records["source"],
            "reference": records["reference"],
            "origin": [origin] * n,
            "ingest_error": errors,
            "group": records.get("group", [None] * n),
            "given_split": records.get("split", [given_split] * n),
        },
        schema=TEXT_SCHEMA,
    )


def read_text_file(
    path: Path, root: Path, columns: dict[str, str | None], batch_rows: int, given_split: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream one CSV / JSONL / Parquet file as raw text rows.

    Args:
        path: the file.
        root: the configured input folder; ids and origins are relative to it.
        columns: `source`, `reference` and optionally `id`, `group` and `split` -> the user's column names.
        batch_rows: rows per yielded batch.
        given_split: the split every row of the file belongs to (a split file), if any.
    """
    kind = TEXT_SUFFIXES[path.suffix.lower()]
    relative = path.relative_to(root).as_posix() if path != root else path.name
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    wanted = {"source": columns["source"], "reference": columns["reference"]}
    for role in ("id", "group", "split"):
        if columns.get(role):
            wanted[role] = columns[role]
    reader = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}[kind]
    row = 0
    for batch in reader(path, wanted, batch_rows):
        n = len(batch["source"])
        if "id" in wanted:
            ids = [f"{relative}#{v}" if v is not None else f"{relative}:{row + i + 1}" for i, v in enumerate(batch["id"])]
        else:
            ids = [f"{relative}:{row + i + 1}" for i in range(n)]
        errors = batch["errors"]
        if "split" in wanted:
            batch["split"], split_errors = given_splits(batch["split"], wanted["split"])
            # A malformed row's split is unknown too; its own error says more.
            errors = [e or s for e, s in zip(errors, split_errors, strict=True)]
        yield _text_batch(batch, ids, relative, errors, given_split)
        row += n
    if row == 0:
        raise DataError(f"{path}: the file has a header but no rows")


def _csv_batches(path: Path, wanted: dict[str, str], batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    with path.open("rb") as fh:
        header = fh.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
    available = next(csv.reader([header]), [])
    _require_columns(available, wanted, path)
    # Read text as bytes: one invalid UTF-8 row must not fail the whole file. Only an empty cell is missing:
    # Arrow's default null strings (NULL, NaN, NA, n/a, ...) are real text a reference or an id may be.
    convert = pacsv.ConvertOptions(
        column_types={name: pa.binary() for name in wanted.values()},
        include_columns=list(dict.fromkeys(wanted.values())),
        strings_can_be_null=True,
        null_values=[""],
    )
    read = pacsv.ReadOptions(block_size=1 << 22)
    malformed: list[Any] = []

    def skip_and_keep(row: Any) -> str:
        malformed.append(row)  # becomes a row with an ingest_error, so validation quarantines it
        return "skip"

    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip_and_keep)
    try:
        reader = pacsv.open_csv(path, read_options=read, convert_options=convert, parse_options=parse)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    while True:
        try:
            record_batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowInvalid as err:
            raise DataError(f"{path}: not a readable CSV file ({err})") from None
        for start in range(0, record_batch.num_rows, batch_rows):
            part = record_batch.slice(start, batch_rows)
            out: dict[str, list[Any]] = {}
            errs = []
            for role, name in wanted.items():
                out[role], col_errors = _decode_column(part.column(name), name)
                errs.append(col_errors)
            out["errors"] = _merge_errors(*errs)
            yield out
        if malformed:  # the rows this batch's parse skipped, after its good rows
            yield _malformed_rows(malformed, wanted)
            malformed.clear()


def _malformed_rows(rows: list[Any], wanted: dict[str, str]) -> dict[str, list[Any]]:
    """Rows the CSV parser could not split into the header's columns, kept whole as the source text."""
    out: dict[str, list[Any]] = {role: [None] * len(rows) for role in wanted}
    out["source"] = [row.text for row in rows]
    out["errors"] = [
        f"malformed CSV row{f' {row.number}' if row.number else ''}: {row.actual_columns} fields, "
        f"the header has {row.expected_columns}"
        for row in rows
    ]
    return out


def _jsonl_batches(path: Path, wanted: dict[str, str], batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    # Line by line so one malformed line becomes one quarantined row instead of a failed file.
    def empty() -> dict[str, list[Any]]:
        return {**{role: [] for role in wanted}, "errors": []}

    out = empty()
    seen_columns: set[str] = set()
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            error = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("line is not a JSON object")
            except UnicodeDecodeError as err:
                obj, error = {}, f"invalid UTF-8 on line {line_no} at byte {err.start}"
            except ValueError as err:
                obj, error = {}, f"invalid JSON on line {line_no}: {err}"
            seen_columns.update(obj)
            for role, name in wanted.items():
                value = obj.get(name)
                if role == "source" and isinstance(value, dict):
                    value = json.dumps(value, ensure_ascii=False)  # a JSON-object source (components.records)
                elif value is not None and not isinstance(value, str):
                    value = str(value) if not (isinstance(value, float) and np.isnan(value)) else None
                out[role].append(value)
            out["errors"].append(error)
            if len(out["errors"]) >= batch_rows:
                yield out
                out = empty()
    # A column no line has is a wrong file, not bad rows (lines that are not JSON objects tell nothing).
    if seen_columns:
        _require_columns(sorted(seen_columns), wanted, path)
    if out["errors"]:
        yield out


def _parquet_batches(path: Path, wanted: dict[str, str], batch_rows: int) -> Iterator[dict[str, list[Any]]]:
    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from err
    _require_columns(parquet.schema_arrow.names, wanted, path)
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys(wanted.values()))):
        out: dict[str, list[Any]] = {}
        errs = []
        for role, name in wanted.items():
            column = batch.column(name)
            if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                out[role], col_errors = _decode_column(column, name)
            else:
                out[role], col_errors = column.cast(pa.string()).to_pylist(), [None] * batch.num_rows
            errs.append(col_errors)
        out["errors"] = _merge_errors(*errs)
        yield out


def read_text_folder(
    root: Path, columns: dict[str, str | None], batch_rows: int, given_split: str | None = None
) -> Iterator[pa.RecordBatch]:
    """Every CSV / JSONL / Parquet file under root, as raw text rows (all of split `given_split`, if given)."""
    files = list_files(root, TEXT_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no .csv, .jsonl or .parquet files found")
    base = root if root.is_dir() else root.parent
    for path in files:
        if resolve_inside(base, path.relative_to(base)) is None:
            relative = path.relative_to(base).as_posix()
            yield _text_batch(
                {"source": [None], "reference": [None]},
                [f"{relative}:0"],
                relative,
                [f"path escapes the data folder {base}: {path} -> {path.resolve()}"],
                given_split,
            )
            continue
        yield from read_text_file(path, base, columns, batch_rows, given_split)


def generated_text(num_records: int, refs_per_record: int, seed: int) -> Iterator[pa.RecordBatch]:
    """The embedded default: rows from components.textgen."""
    from components.textgen import generate

    for chunk in generate(num_records, refs_per_record, seed):
        n = len(chunk)
        yield _text_batch(
            {"source": [row[1] for row in chunk], "reference": [row[2] for row in chunk]},
            [f"generated:{row[0]}:{i}" for i, row in enumerate(chunk)],
            "generated",
            [None] * n,
        )


# --- images -----------------------------------------------------------------------------------------


def describe_image(data: bytes) -> dict[str, Any]:
    """Fully decode encoded image bytes and describe them; a failure is described, not raised."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel: truncated files fail here, not later in training
            return {
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "channels": len(image.getbands()),
                "format": image.format,
                "ingest_error": None,
            }
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return {
            "width": None,
            "height": None,
            "mode": None,
            "channels": None,
            "format": None,
            "ingest_error": f"undecodable image: {type(err).__name__}: {err}",
        }


def _image_row(record_id: str, label: str | None, data: bytes | None, origin: str, error: str | None = None) -> dict[str, Any]:
    described = (
        describe_image(data)
        if data is not None and error is None
        else {"width": None, "height": None, "mode": None, "channels": None, "format": None, "ingest_error": error}
    )
    return {"record_id": record_id, "label": label, "image": data, "origin": origin, **described}


def _batches(rows: Iterator[dict[str, Any]], batch_rows: int) -> Iterator[pa.RecordBatch]:
    buffer: list[dict[str, Any]] = []
    for row in rows:
        buffer.append(row)
        if len(buffer) >= batch_rows:
            yield pa.RecordBatch.from_pylist(buffer, schema=IMAGE_SCHEMA)
            buffer = []
    if buffer:
        yield pa.RecordBatch.from_pylist(buffer, schema=IMAGE_SCHEMA)


def builtin_digits(batch_rows: int) -> Iterator[pa.RecordBatch]:
    """scikit-learn's 1 797 handwritten digits (8x8, values 0-16), as 8-bit grey PNGs labelled 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 -> 0..255 is the only change: the intensity scale, exactly invertible.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rows = (
        _image_row(f"digits:{i}", str(int(digits.target[i])), encode_png(pixels[i]), "sklearn:digits") for i in range(len(pixels))
    )
    yield from _batches(rows, batch_rows)


def _load_photo(name: str) -> np.ndarray:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    import skimage.data

    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def builtin_photos(batch_rows: int, names: tuple[str, ...] = BUILTIN_PHOTOS) -> Iterator[pa.RecordBatch]:
    """The natural photographs bundled with scikit-image and scikit-learn, as RGB PNGs."""

    def rows() -> Iterator[dict[str, Any]]:
        for name in names:
            pixels = _load_photo(name)
            if pixels.ndim == 3 and pixels.shape[2] == 4:
                pixels = pixels[..., :3]
            yield _image_row(f"photo:{name}", None, encode_png(np.ascontiguousarray(pixels)), f"builtin:{name}")

    yield from _batches(rows(), batch_rows)


def image_folder(root: Path, labelled: bool, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Images under root: one sub-folder per class when labelled, a flat folder otherwise.

    The original bytes are kept as they are (a JPEG stays a JPEG); each is decoded once to check it.
    """
    if not root.is_dir():
        raise DataError(f"image folder does not exist: {root}")
    files = list_files(root, IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no .png / .jpg / .jpeg images found")

    def rows() -> Iterator[dict[str, Any]]:
        for path in files:
            relative = path.relative_to(root)
            label = None
            if labelled:
                if len(relative.parts) != 2:
                    yield _image_row(
                        relative.as_posix(),
                        None,
                        None,
                        relative.as_posix(),
                        "not inside a class sub-folder (expected <root>/<label>/<file>)",
                    )
                    continue
                label = relative.parts[0]
            if resolve_inside(root, relative) is None:
                yield _image_row(
                    relative.as_posix(),
                    label,
                    None,
                    relative.as_posix(),
                    f"path escapes the data folder {root}: -> {path.resolve()}",
                )
                continue
            yield _image_row(relative.as_posix(), label, path.read_bytes(), relative.as_posix())

    yield from _batches(rows(), batch_rows)
