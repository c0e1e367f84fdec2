"""Stage `clean`: normalise text, mask PII, drop duplicates, split train/val/test by a hash of the source.

Every validated row ends in `<out>/<name>.parquet` (with its `split`) or in `<out>/removed/<name>.parquet`
(with the reason: exact duplicate, near duplicate, empty after cleaning). Also writes `metrics/data.json`,
merging the validation counts, so one DVC metric shows the whole data half of the DAG.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.common import (
    DATASETS,
    SPLITS,
    ConfigError,
    DataError,
    assign_splits,
    load_params,
    require,
    run_main,
    write_json,
)
from components.image_io import decode_image, encode_png
from components.records import canonical_source, parse_source, serialise
from components.tables import write_parquet_atomic

log = logging.getLogger(__name__)

EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
# Two separators or a leading +country code: masks 555-123-4567, (020) 7946 0958, +44 20 7946 0958, but
# leaves prices, years and model numbers alone.
PHONE = r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)|\d{2,4})[\s.\-]\d{3,4}[\s.\-]\d{3,5}|\+\d{9,14}\b"
HTML_TAG = r"<(?:[A-Za-z/!][^<>]{0,500})>"
CONTROL = r"[\p{Cc}\p{Cf}]"


@dataclass(frozen=True)
class CleanConfig:
    seed: int
    mask_pii: bool
    near_duplicates: bool
    splits: dict[str, float]
    restore_splits: dict[str, float]

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CleanConfig:
        return cls(
            seed=require(params["base"], "seed", int, "base"),
            mask_pii=require(params, "mask_pii", bool, "clean"),
            near_duplicates=require(params, "near_duplicates", bool, "clean"),
            splits=_fractions(require(params, "splits", dict, "clean"), "clean.splits"),
            restore_splits=_fractions(require(params, "restore_splits", dict, "clean"), "clean.restore_splits"),
        )


CONFIG = CleanConfig


def _fractions(section: dict[str, Any], key: str) -> dict[str, float]:
    if set(section) != set(SPLITS):
        raise ConfigError(f"params key '{key}' must have exactly the keys {list(SPLITS)}, got {list(section)}")
    fractions = {}
    for name in SPLITS:
        fractions[name] = float(require(section, name, (int, float), key, low=0.0, high=1.0))
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConfigError(f"params key '{key}' fractions must sum to 1, got {sum(fractions.values())}")
    if fractions["train"] <= 0 or fractions["test"] <= 0:
        raise ConfigError(f"params key '{key}': train and test fractions must be > 0")
    return fractions


def _rewrite_where(values: pa.Array, mask: pa.Array, rewrite: Callable[[pa.Array], pa.Array]) -> pa.Array:
    """Apply `rewrite` only to the rows where mask is true: most rows have no tag, e-mail or digit."""
    if not pc.any(mask).as_py():
        return values
    return pc.replace_with_mask(values, mask, rewrite(values.filter(mask)))


def normalise_text(values: pa.ChunkedArray | pa.Array, mask_pii: bool) -> pa.Array:
    """NFC, HTML tags and entities removed, control characters removed, whitespace collapsed, PII masked."""
    values = pc.utf8_normalize(values, "NFC")
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    values = _rewrite_where(values, pc.match_substring(values, "<"), lambda v: pc.replace_substring_regex(v, HTML_TAG, " "))
    values = _rewrite_where(
        values,
        pc.match_substring_regex(values, r"&(?:#\d+|#x[0-9A-Fa-f]+|[A-Za-z]+);"),
        lambda v: pc.utf8_normalize(pa.array([html.unescape(x) for x in v.to_pylist()], pa.string()), "NFC"),
    )
    # Whitespace controls (tab, newline, ...) become spaces before the other controls are dropped.
    values = pc.replace_substring_regex(values, r"[\s\v]+", " ")
    values = _rewrite_where(
        values,
        pc.match_substring_regex(values, CONTROL),
        lambda v: pc.replace_substring_regex(pc.replace_substring_regex(v, CONTROL, ""), r"\s{2,}", " "),
    )
    values = pc.utf8_trim_whitespace(values)
    if mask_pii:
        values = _rewrite_where(
            values, pc.match_substring(values, "@"), lambda v: pc.replace_substring_regex(v, EMAIL, "[EMAIL]")
        )
        values = _rewrite_where(
            values, pc.match_substring_regex(values, r"\d{3}|\+\d"), lambda v: pc.replace_substring_regex(v, PHONE, "[PHONE]")
        )
    return values


def clean_sources(values: pa.ChunkedArray | pa.Array, mask_pii: bool) -> pa.Array:
    """Each distinct source cleaned once. A record is cleaned value by value and written back in its own
    syntax (one spelling per syntax: the service writes prompts the same way), so cleaning never breaks its
    syntax (an `&quot;` inside a JSON string, a tag inside `key[...]`); pairs left empty are dropped. A free
    prompt is cleaned as a whole."""
    encoded = dictionary(values)
    distinct = encoded.dictionary.to_pylist()
    records = [parse_source(source) for source in distinct]
    flat = [value for record in records if record is not None for _, value in record.pairs]
    prompts = [i for i, record in enumerate(records) if record is None]

    def cleaned(texts: list[str]) -> list[str]:
        return normalise_text(pa.array(texts, pa.string()), mask_pii).to_pylist() if texts else []

    cleaned_values = iter(cleaned(flat))
    cleaned_prompts = cleaned([distinct[i] for i in prompts])
    out: list[str | None] = [None] * len(distinct)
    for i, record in enumerate(records):
        if record is not None:
            values = [next(cleaned_values) for _ in record.pairs]
            pairs = [(key, value) for (key, _), value in zip(record.pairs, values, strict=True) if value]
            out[i] = serialise(pairs, record.syntax, record.literal_keys) if pairs else ""
    for i, prompt in zip(prompts, cleaned_prompts, strict=True):
        out[i] = prompt
    return pc.take(pa.array(out, pa.string()), encoded.indices)


def near_duplicate_key(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Case-folded text with everything but letters and digits removed: rows equal under it are near duplicates."""
    return pc.replace_substring_regex(pc.utf8_lower(values), r"[^\p{L}\p{N}]+", "")


def dictionary(values: pa.ChunkedArray | pa.Array) -> pa.DictionaryArray:
    """One dictionary-encoded array: distinct values once, plus an int32 code per row."""
    encoded = pc.dictionary_encode(values)
    return encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded


def first_occurrence(keys: list[pa.ChunkedArray | pa.Array]) -> np.ndarray:
    """Boolean mask: True on the first row of each distinct key tuple.

    Each key column is dictionary-encoded first, so the group-by hashes int32 codes instead of copying strings.
    """
    n = len(keys[0])
    codes = {f"k{i}": dictionary(key).indices for i, key in enumerate(keys)}
    table = pa.table(codes | {"_row": pa.array(np.arange(n))})
    firsts = table.group_by(list(codes), use_threads=False).aggregate([("_row", "min")])
    mask = np.zeros(n, dtype=bool)
    mask[firsts.column("_row_min").to_numpy()] = True
    return mask


@dataclass
class CleanResult:
    kept: pa.Table
    removed: pa.Table
    counts: dict[str, Any]


def _removed(table: pa.Table, mask: np.ndarray, reason: str) -> pa.Table:
    picked = table.filter(pa.array(mask))
    return picked.append_column("removed_because", pa.array([reason] * picked.num_rows, pa.string()))


def clean_text(table: pa.Table, cfg: CleanConfig) -> CleanResult:
    """Clean, deduplicate and split the validated text rows."""
    # Arrow kernels release the GIL: the references clean while the sources do.
    with ThreadPoolExecutor(max_workers=1) as pool:
        references = pool.submit(normalise_text, table.column("reference"), cfg.mask_pii)
        source = clean_sources(table.column("source"), cfg.mask_pii)
        reference = references.result()
    table = table.set_column(table.schema.get_field_index("source"), "source", source)
    table = table.set_column(table.schema.get_field_index("reference"), "reference", reference)

    empty = pc.equal(pc.utf8_length(source), 0).to_numpy(zero_copy_only=False) | pc.equal(pc.utf8_length(reference), 0).to_numpy(
        zero_copy_only=False
    )
    removed = [_removed(table, empty, "empty after cleaning")]
    table = table.filter(pa.array(~empty))

    # Per distinct source, not per row: a record has several references, and Python work is the slow part.
    sources = dictionary(table.column("source"))
    canonical = pa.array([canonical_source(s) for s in sources.dictionary.to_pylist()], pa.string())
    table = table.append_column("source_key", pc.take(canonical, sources.indices))

    exact_first = first_occurrence([table.column("source_key"), table.column("reference")])
    removed.append(_removed(table, ~exact_first, "exact duplicate"))
    table = table.filter(pa.array(exact_first))
    near_count = 0
    if cfg.near_duplicates:
        # The source key is already canonical (attributes sorted); only the reference needs the loose key.
        near_first = first_occurrence([table.column("source_key"), near_duplicate_key(table.column("reference"))])
        near_count = int((~near_first).sum())
        removed.append(_removed(table, ~near_first, "near duplicate"))
        table = table.filter(pa.array(near_first))

    keys = dictionary(table.column("source_key"))
    split_of_key = pa.array(assign_splits(keys.dictionary.to_pylist(), cfg.splits, cfg.seed), pa.string())
    table = table.append_column("split", pc.take(split_of_key, keys.indices))
    removed_table = pa.concat_tables(removed, promote_options="default")
    counts = {
        "duplicates_removed": int((~exact_first).sum()) + near_count,
        "exact_duplicates_removed": int((~exact_first).sum()),
        "near_duplicates_removed": near_count,
        "emptied_by_cleaning": int(empty.sum()),
        "sources": len(keys.dictionary),
    }
    return CleanResult(table, removed_table, counts)


def pixel_digest(data: bytes) -> str:
    """Hash of the decoded pixels: the same picture saved twice (or as PNG and as lossless copy) matches."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return hashlib.blake2b(image.mode.encode() + repr(image.size).encode() + image.tobytes(), digest_size=16).hexdigest()


def clean_images(table: pa.Table, fractions: dict[str, float], seed: int) -> CleanResult:
    """Drop exact pixel duplicates (per label) and split by a hash of the pixels."""
    digests = pa.array([pixel_digest(b) for b in table.column("image").to_pylist()], pa.string())
    labels = pc.fill_null(table.column("label"), "")
    first = first_occurrence([labels, digests])
    removed = _removed(table, ~first, "exact duplicate")
    table = table.filter(pa.array(first))
    kept_digests = digests.filter(pa.array(first))
    splits = assign_splits(kept_digests.to_pylist(), fractions, seed)
    table = table.append_column("split", pa.array(splits, pa.string()))
    counts = {
        "duplicates_removed": int((~first).sum()),
        "exact_duplicates_removed": int((~first).sum()),
        "near_duplicates_removed": 0,
        "emptied_by_cleaning": 0,
        "split_by": "image",
    }
    return CleanResult(table, removed, counts)


MIN_BAND = 32
"""The narrowest band (pixels) band_split cuts: room for a scale-4 border and SSIM's 11-pixel window."""


def band_sizes(length: int, fractions: dict[str, float]) -> dict[str, int]:
    """Pixels of each split's band along a side of `length` (>= 2 * MIN_BAND): test and train get at least
    MIN_BAND; a val band that would be narrower gives its pixels to test."""
    test = max(round(length * fractions["test"]), MIN_BAND)
    val = round(length * fractions["val"])
    if val < MIN_BAND or length - test - val < MIN_BAND:
        test, val = test + val, 0
    train = length - test - val
    if train < MIN_BAND:
        train, test = MIN_BAND, length - MIN_BAND
    return {"train": train, "val": val, "test": test}


def band_split(result: CleanResult, fractions: dict[str, float]) -> CleanResult:
    """Too few photos for a train and a test photo: each photo is cut into disjoint bands along its longer
    side, one band per split (sizes by the split fractions, see band_sizes), so no test pixel is ever
    trained on (the splits still share photos, which `split_by: band` in the data metrics says)."""
    rows = []
    for row in result.kept.to_pylist():
        pixels = decode_image(row["image"])
        axis = 0 if pixels.shape[0] >= pixels.shape[1] else 1
        length = pixels.shape[axis]
        if length < 2 * MIN_BAND:
            raise DataError(
                f"restore: {result.kept.num_rows} photo(s) are too few to keep whole photos apart, and {row['record_id']} "
                f"({pixels.shape[1]}x{pixels.shape[0]}) is under {2 * MIN_BAND} px along its longer side, too small to "
                "cut into train and test bands; add photos (at least 3) or larger ones"
            )
        start = 0
        for name, size in band_sizes(length, fractions).items():
            if not size:
                continue
            band = pixels[start : start + size] if axis == 0 else pixels[:, start : start + size]
            start += size
            rows.append({**row, "image": encode_png(np.ascontiguousarray(band)), "width": band.shape[1],
                         "height": band.shape[0], "mode": "L" if band.ndim == 2 else "RGB",
                         "channels": 1 if band.ndim == 2 else 3, "format": "PNG", "split": name})  # fmt: skip
    log.warning("restore: %d photo(s), too few for whole-photo splits: each is cut into bands", result.kept.num_rows)
    kept = pa.Table.from_pylist(rows, schema=result.kept.schema)
    return CleanResult(kept, result.removed, {**result.counts, "split_by": "band"})


def clean(cfg: CleanConfig, valid_dir: Path, out_dir: Path, validation_report: Path, metrics_path: Path) -> dict[str, Any]:
    """Clean every dataset, write the kept and removed rows, and the data metrics."""
    if not validation_report.is_file():
        raise DataError(f"missing {validation_report}: run the validate stage first")
    validated = json.loads(validation_report.read_text(encoding="utf-8"))["datasets"]
    metrics: dict[str, Any] = {}
    for name in DATASETS:
        path = valid_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"missing input {path}: run the validate stage first")
        table = pq.read_table(path)
        if table.num_rows == 0:
            raise DataError(f"{name}: no rows passed validation; see the quarantine folder")
        result = (
            clean_text(table, cfg)
            if name == "text"
            else clean_images(table, cfg.restore_splits if name == "restore" else cfg.splits, cfg.seed)
        )
        if name == "restore" and not {"train", "test"} <= set(result.kept.column("split").to_pylist()):
            result = band_split(result, cfg.restore_splits)
        # Rows are records: a photo cut into bands (band_split) is still one record, in several splits.
        kept_records = len(set(result.kept.column("record_id").to_pylist()))
        assert kept_records + result.removed.num_rows == table.num_rows, f"clean lost rows of {name}"
        write_parquet_atomic(result.kept, out_dir / f"{name}.parquet")
        write_parquet_atomic(result.removed, out_dir / "removed" / f"{name}.parquet")
        split_sizes = {s: int(pc.sum(pc.equal(result.kept.column("split"), s)).as_py() or 0) for s in SPLITS}
        metrics[name] = {
            "rows_in": validated[name]["rows_in"],
            "rows_valid": validated[name]["rows_valid"],
            "rows_quarantined": validated[name]["rows_quarantined"],
            "rows_clean": kept_records,
            **result.counts,
            "splits": split_sizes,
        }
        log.info("%s: %d clean rows, %s; splits %s", name, result.kept.num_rows, result.counts, split_sizes)
    write_json(metrics, metrics_path)
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.clean", description=__doc__)
    parser.add_argument("valid", type=Path, help="validated data folder (data/validated)")
    parser.add_argument("out", type=Path, help="output folder (data/clean)")
    parser.add_argument("--validation-report", type=Path, required=True, help="validate's report.json")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics file to write (metrics/data.json)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: clean(
            CleanConfig.from_params(load_params("clean", args.params)), args.valid, args.out, args.validation_report, args.metrics
        )
    )


if __name__ == "__main__":
    main()
