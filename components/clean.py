"""Stage `clean`: normalise text, mask PII, drop duplicates, split train/val/test so that nothing leaks.

Text is split one of three ways (`clean.text_split.by`):
- `source`: by a hash of the whole (canonical) source record;
- `group`: by a group, so no group has rows in two splits: a record attribute (`text_split.group`, or the
  records' entity key such as `name`), or the user's group column (`ingest.text.group_column`). Groups that
  share a source are one group, so no source is in two splits either;
- `given`: the user's own split (`ingest.text.split_column` or `ingest.text.split_files`), row by row;
  duplicates are only dropped within a split, and a train row whose source is in the given val or test
  split is set aside (with its reason), so the user's held-out rows stay and are never trained on.
`auto` (the default) takes the user's split when there is one, else their group column, else the entity
key of structured sources, else the source hash. Images split by a hash of their pixels.

Every validated row ends in `<out>/<name>.parquet` (with its `split`) or in `<out>/removed/<name>.parquet`
(with the reason: exact duplicate, near duplicate, empty after cleaning). Also writes `metrics/data.json`,
merging the validation counts, so one DVC metric shows the whole data half of the DAG, and
`<out>/split.json`, how the text was split (the evaluation reports it).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import logging
from collections import Counter
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
    SPLIT_FILE,
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
from components.records import canonical_source, is_entity_key, parse_source, serialise
from components.tables import write_parquet_atomic

log = logging.getLogger(__name__)

EMAIL = r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
# Two separators or a leading +country code: masks 555-123-4567, (020) 7946 0958, +44 20 7946 0958, but
# leaves prices, years and model numbers alone.
PHONE = r"(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)|\d{2,4})[\s.\-]\d{3,4}[\s.\-]\d{3,5}|\+\d{9,14}\b"
HTML_TAG = r"<(?:[A-Za-z/!][^<>]{0,500})>"
CONTROL = r"[\p{Cc}\p{Cf}]"


SPLIT_METHODS = ("auto", "source", "group", "given")


@dataclass(frozen=True)
class TextSplit:
    by: str = "auto"
    group: str | None = None  # a record attribute; None: the group column, else the records' entity key

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str) -> TextSplit:
        by = require(section, "by", str, prefix)
        if by not in SPLIT_METHODS:
            raise ConfigError(f"params key '{prefix}.by' must be one of {list(SPLIT_METHODS)}, got {by!r}")
        group = section.get("group")
        if group is not None and (not isinstance(group, str) or not group):
            raise ConfigError(f"params key '{prefix}.group' must be a record attribute name or null, got {group!r}")
        return cls(by, group)


@dataclass(frozen=True)
class CleanConfig:
    seed: int
    mask_pii: bool
    near_duplicates: bool
    splits: dict[str, float]
    restore_splits: dict[str, float]
    text_split: TextSplit = TextSplit()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CleanConfig:
        return cls(
            seed=require(params["base"], "seed", int, "base"),
            mask_pii=require(params, "mask_pii", bool, "clean"),
            near_duplicates=require(params, "near_duplicates", bool, "clean"),
            splits=_fractions(require(params, "splits", dict, "clean"), "clean.splits"),
            restore_splits=_fractions(require(params, "restore_splits", dict, "clean"), "clean.restore_splits"),
            text_split=TextSplit.from_params(require(params, "text_split", dict, "clean"), "clean.text_split"),
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
    split: dict[str, Any] | None = None  # how text was split (split.json)


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

    given = _given_splits(table)
    by = cfg.text_split.by
    if by == "auto":
        by = "given" if given is not None else "group"
    # With the user's split, a row that repeats one of another split stays: their test set is not ours to edit.
    within = [given] if by == "given" and given is not None else []
    exact_first = first_occurrence([table.column("source_key"), table.column("reference"), *within])
    removed.append(_removed(table, ~exact_first, "exact duplicate"))
    table = table.filter(pa.array(exact_first))
    near_count = 0
    if cfg.near_duplicates:
        # The source key is already canonical (attributes sorted); only the reference needs the loose key.
        within = [_given_splits(table)] if within else []
        near_first = first_occurrence([table.column("source_key"), near_duplicate_key(table.column("reference")), *within])
        near_count = int((~near_first).sum())
        removed.append(_removed(table, ~near_first, "near duplicate"))
        table = table.filter(pa.array(near_first))

    split, description = split_text(table, cfg, by)
    table = table.append_column("split", split)
    seen_in_training = 0
    if description["by"] == "given":
        # The user's val and test rows stay; a train row whose source they hold would be scored as unseen.
        held_out = pc.is_in(table.column("split"), pa.array(["val", "test"]))
        held_keys = pc.unique(table.column("source_key").filter(held_out))
        leak = pc.and_(pc.equal(table.column("split"), "train"), pc.is_in(table.column("source_key"), held_keys))
        leak_mask = leak.to_numpy(zero_copy_only=False)
        seen_in_training = int(leak_mask.sum())
        removed.append(_removed(table.drop_columns(["split"]), leak_mask, "train row of a source in the given val or test split"))
        table = table.filter(pa.array(~leak_mask))
        description["train_rows_dropped"] = seen_in_training
    removed_table = pa.concat_tables(removed, promote_options="default")
    counts = {
        "duplicates_removed": int((~exact_first).sum()) + near_count + seen_in_training,
        "exact_duplicates_removed": int((~exact_first).sum()),
        "near_duplicates_removed": near_count,
        "emptied_by_cleaning": int(empty.sum()),
        "sources": len(dictionary(table.column("source_key")).dictionary),
        "split_by": description["by"],
        **{f"split_{k}": v for k, v in description.items() if k != "by"},
    }
    return CleanResult(table, removed_table, counts, description)


def _given_splits(table: pa.Table) -> pa.Array | None:
    """The user's split per row (rows without one, such as landed files, train), or None when nobody gave one."""
    if "given_split" not in table.column_names or table.column("given_split").null_count == table.num_rows:
        return None
    return pc.fill_null(table.column("given_split"), "train").combine_chunks()


def entity_attribute(sources: list[str]) -> str | None:
    """The entity key (`records.is_entity_key`) most records have, or None (free prompts, no such key)."""
    keys: Counter[str] = Counter()
    for source in sources:
        record = parse_source(source)
        keys.update(key for key in (record.keys() if record is not None else ()) if is_entity_key(key))
    return keys.most_common(1)[0][0] if keys else None


def connected_groups(groups: list[str], sources: list[str]) -> list[str]:
    """Per row, its group merged with every group it shares a source with (union-find): the unit the split
    hashes, so neither a group nor a source lands in two splits. Named by its smallest member group."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for group, source in zip(groups, sources, strict=True):
        a, b = find("g:" + group), find("s:" + source)
        if a != b:
            parent[max(a, b)] = min(a, b)
    smallest: dict[str, str] = {}
    for group in groups:
        root = find("g:" + group)
        smallest[root] = min(smallest.get(root, group), group)
    return [smallest[find("g:" + group)] for group in groups]


def split_text(table: pa.Table, cfg: CleanConfig, by: str) -> tuple[pa.Array, dict[str, Any]]:
    """The split of every row, and how it was made (see the module docstring)."""
    keys = dictionary(table.column("source_key"))
    distinct_sources = keys.dictionary.to_pylist()
    if by == "given":
        given = _given_splits(table)
        if given is None:
            raise ConfigError(
                "clean: params key 'clean.text_split.by' is 'given' but the data has no split: set "
                "'ingest.text.split_column' or 'ingest.text.split_files'"
            )
        shared = (
            table.select(["source_key"])
            .append_column("split", given)
            .group_by("source_key")
            .aggregate([("split", "count_distinct")])
        )
        in_two = int(pc.sum(pc.greater(shared.column("split_count_distinct"), 1)).as_py() or 0)
        if in_two:
            log.warning("text: %d sources occur in more than one of the given splits: those scores include seen sources", in_two)
        return given, {"by": "given", "sources_in_two_splits": in_two}
    if by == "group":
        has_column = "group" in table.column_names and table.column("group").null_count < table.num_rows
        attribute = cfg.text_split.group
        if attribute is None and not has_column:
            attribute = entity_attribute(distinct_sources)
        if attribute is not None:
            values = [parse_source(s) for s in distinct_sources]
            group_of_source = [(r.as_dict().get(attribute) if r is not None else None) for r in values]
            found = sum(g is not None for g in group_of_source)
            if cfg.text_split.group is not None and not found:
                raise ConfigError(f"clean: params key 'clean.text_split.group' names '{attribute}', which no source record has")
            groups = pc.take(pa.array(group_of_source, pa.string()), keys.indices)
            label = attribute
        elif has_column:
            groups, label = table.column("group").combine_chunks(), "column"
        else:
            if cfg.text_split.by == "group":
                raise ConfigError(
                    "clean: params key 'clean.text_split.by' is 'group' but there is no group: set 'clean.text_split.group' "
                    "to a record attribute or 'ingest.text.group_column' to a column"
                )
            by = "source"
        if by == "group":
            # A row without a group value is a group of its own source. Group values that differ only in case
            # or spacing ("The Eagle", "the  eagle") are one group.
            spelled = [
                f"={g}" if g is not None else f"#{s}"
                for g, s in zip(groups.to_pylist(), table.column("source_key").to_pylist(), strict=True)
            ]
            group_values = [f"={' '.join(g[1:].casefold().split())}" if g[0] == "=" else g for g in spelled]
            spelling: dict[str, str] = {}  # a unit is hashed by its first spelling in sort order
            for value, original in zip(group_values, spelled, strict=True):
                spelling[value] = min(spelling.get(value, original), original)
            units = [spelling[u] for u in connected_groups(group_values, table.column("source_key").to_pylist())]
            split = pa.array(assign_splits(units, cfg.splits, cfg.seed), pa.string())
            return split, {"by": "group", "group": label, "groups": len(set(units))}
    split_of_key = pa.array(assign_splits(distinct_sources, cfg.splits, cfg.seed), pa.string())
    return pc.take(split_of_key, keys.indices), {"by": "source"}


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
        if result.split is not None:
            write_json(result.split, out_dir / SPLIT_FILE)
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
