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
import contextlib
import hashlib
import html
import io
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    load_params,
    progress,
    require,
    run_main,
    split_codes,
    unit_interval,
    write_json,
)
from components.image_io import decode_image, encode_png
from components.records import canonical_record, is_entity_key, parse_source, serialise
from components.tables import (
    DigestSpill,
    Distinct,
    ParquetSink,
    Rows,
    copy_into,
    distinct,
    image_batch_rows,
    iter_parquet,
    row_digests,
    write_parquet_atomic,
)
from components.workers import Workers, data_workers_from_params, workers_for

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
    batch_rows: int = 65_536
    # Processes for pass 1 (components.workers); the output is the same for any count. Built in code (tests,
    # benches) it is the caller's one process; from params, `base.data_workers` (default: one per core).
    workers: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CleanConfig:
        return cls(
            seed=require(params["base"], "seed", int, "base"),
            mask_pii=require(params, "mask_pii", bool, "clean"),
            near_duplicates=require(params, "near_duplicates", bool, "clean"),
            splits=_fractions(require(params, "splits", dict, "clean"), "clean.splits"),
            restore_splits=_fractions(require(params, "restore_splits", dict, "clean"), "clean.restore_splits"),
            text_split=TextSplit.from_params(require(params, "text_split", dict, "clean"), "clean.text_split"),
            batch_rows=require(params, "batch_rows", int, "clean", low=1),
            workers=data_workers_from_params(params.get("base", {})),
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


@dataclass
class CleanResult:
    kept: pa.Table
    removed: pa.Table
    counts: dict[str, Any]
    split: dict[str, Any] | None = None  # how text was split (split.json)


@dataclass
class Outcome:
    """What a streamed clean wrote: counts for the data metrics, how text was split, rows per split."""

    counts: dict[str, Any]
    split: dict[str, Any] | None
    split_sizes: dict[str, int]
    kept_rows: int
    removed_rows: int


KEPT, EXACT, NEAR, SEEN = 0, 1, 2, 3
REASONS = {EXACT: "exact duplicate", NEAR: "near duplicate", SEEN: "train row of a source in the given val or test split"}
EMPTY_REASON = "empty after cleaning"


def _with_reason(table: pa.Table, reason: str) -> pa.Table:
    return table.append_column("removed_because", pa.array([reason] * table.num_rows, pa.string()))


def _has_values(rows: Rows, column: str) -> bool:
    """Whether any row has a value in `column`: one column is read, not the table."""
    if column not in rows.schema.names:
        return False
    return any(batch.column(0).null_count < batch.num_rows for batch in rows.batches([column]))


def _split_codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    codes = pc.index_in(pc.fill_null(values, "train"), pa.array(SPLITS))
    if codes.null_count:
        raise DataError(f"clean: a given split outside {list(SPLITS)}: run the validate stage first")
    return codes.to_numpy(zero_copy_only=False).astype(np.int8)


@dataclass
class _TextKeys:
    """Pass 1's facts per cleaned row, aligned with the rows of the intermediate file."""

    # Digests of the exact-duplicate key, the near-duplicate key and the source, on disk: 48 bytes a row.
    exact: DigestSpill
    near: DigestSpill
    source: DigestSpill
    given: list[np.ndarray] = field(default_factory=list)
    position: list[np.ndarray] = field(default_factory=list)  # unit_interval of the source key, for a split by source
    entity: list[np.ndarray] = field(default_factory=list)  # index into entities, for a split by a record attribute
    group: list[np.ndarray] = field(default_factory=list)  # index into groups (-1: none), for a split by the group column
    # (entity keys, values a group split may use) of each distinct record; 0: a free prompt.
    entities: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], int] = field(default_factory=lambda: {((), ()): 0})
    groups: dict[str, int] = field(default_factory=dict)
    emptied: int = 0


@dataclass(frozen=True)
class _PassOne:
    """What cleaning one batch needs (components.workers: unpickled once per worker)."""

    mask_pii: bool
    near_duplicates: bool
    within_given: bool
    needs: frozenset[str]
    seed: int
    group_attribute: str | None


@dataclass
class _CleanedBatch:
    """Pass 1's result for one batch. Entity and group ids are the batch's own (first appearance in the
    batch); the parent renumbers them in batch order, so the ids are the same for any number of workers."""

    cleaned: pa.Table
    emptied: pa.Table
    exact: np.ndarray
    near: np.ndarray | None
    source: np.ndarray
    given: np.ndarray | None
    position: np.ndarray | None
    entities: list[tuple[tuple[str, ...], tuple[tuple[str, str], ...]] | None]  # None: a free prompt (entity 0)
    entity_of_row: np.ndarray | None
    groups: list[str]
    group_of_row: np.ndarray | None  # -1: none


def _clean_batch(context: _PassOne, table: pa.Table) -> _CleanedBatch:
    """Clean one batch, split off the rows it empties, key the rest by canonical source, and compute the
    digests and the codes the split needs per row."""
    # Arrow kernels release the GIL: the references clean while the sources do.
    with ThreadPoolExecutor(max_workers=1) as pool:
        references = pool.submit(normalise_text, table.column("reference"), context.mask_pii)
        source = clean_sources(table.column("source"), context.mask_pii)
        reference = references.result()
    table = table.set_column(table.schema.get_field_index("source"), "source", source)
    table = table.set_column(table.schema.get_field_index("reference"), "reference", reference)
    empty = pc.or_(pc.equal(pc.utf8_length(source), 0), pc.equal(pc.utf8_length(reference), 0))
    empty_rows = table.filter(empty)
    emptied = _with_reason(empty_rows, EMPTY_REASON).append_column("source_key", pa.nulls(empty_rows.num_rows, pa.string()))
    table = table.filter(pc.invert(empty))
    # Per distinct source, not per row: a record has several references, and Python work is the slow part.
    sources = dictionary(table.column("source"))
    indices = sources.indices.to_numpy(zero_copy_only=False)
    canonical = [canonical_record(s) for s in sources.dictionary.to_pylist()]
    source_key = pc.take(pa.array([key for key, _ in canonical], pa.string()), sources.indices)
    table = table.append_column("source_key", source_key)
    # With the user's split, a row that repeats one of another split stays: their test set is not ours to edit.
    within = [pc.fill_null(table.column("given_split"), "train")] if context.within_given else []
    result = _CleanedBatch(
        cleaned=table,
        emptied=emptied,
        exact=row_digests([source_key, table.column("reference"), *within]),
        # The source key is already canonical (attributes sorted); only the reference needs the loose key.
        near=row_digests([source_key, near_duplicate_key(table.column("reference")), *within])
        if context.near_duplicates
        else None,
        source=row_digests([source_key]),
        given=_split_codes(table.column("given_split")) if context.within_given else None,
        # Two spellings of one record share a key, so the same key may come twice here: both give the same.
        position=np.array([unit_interval(k, context.seed) for k, _ in canonical], dtype=np.float64)[indices]
        if "position" in context.needs
        else None,
        entities=[],
        entity_of_row=None,
        groups=[],
        group_of_row=None,
    )
    if "entity" in context.needs:
        for _, record in canonical:
            values = (
                ()
                if record is None
                else tuple((k, v) for k, v in record.as_dict().items() if is_entity_key(k) or k == context.group_attribute)
            )
            result.entities.append(None if record is None else (tuple(k for k in record.keys() if is_entity_key(k)), values))
        result.entity_of_row = indices.astype(np.int32)
    if "group" in context.needs:
        groups = dictionary(table.column("group"))
        result.groups = groups.dictionary.to_pylist()
        # typed: a batch emptied by cleaning has none
        result.group_of_row = pc.fill_null(groups.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return result


def _clean_pass(
    rows: Rows, cfg: CleanConfig, by: str, group_column: bool, cleaned: Path, emptied: Path, workers: int
) -> _TextKeys:
    """Pass 1: clean each batch (in `workers` processes), set aside the rows left empty, write the rest with
    their source key, and keep only digests and the small codes the split `by` needs, per row."""
    if by == "source":
        needs = {"position"}
    elif by == "group":
        # A named attribute, else the group column, else the records' entity key (or, without one, the source).
        needs = {"entity"} if cfg.text_split.group else {"group"} if group_column else {"entity", "position"}
    else:
        needs = set()
    keys = _TextKeys(*(DigestSpill(cleaned.parent / f"{name}.digests") for name in ("exact", "near", "source")))
    cleaned_schema = rows.schema.append(pa.field("source_key", pa.string()))
    removed_schema = rows.schema.append(pa.field("removed_because", pa.string())).append(pa.field("source_key", pa.string()))
    context = _PassOne(cfg.mask_pii, cfg.near_duplicates, by == "given", frozenset(needs), cfg.seed, cfg.text_split.group)
    batches = progress(rows.batches(), desc="clean text", unit="batch", total=-(-rows.num_rows // cfg.batch_rows))
    with (
        Workers(workers) as pool,
        ParquetSink(cleaned, cleaned_schema) as cleaned_sink,
        ParquetSink(emptied, removed_schema) as emptied_sink,
    ):
        for batch in pool.map(_clean_batch, context, (pa.Table.from_batches([b]) for b in batches)):
            keys.emptied += batch.emptied.num_rows
            emptied_sink.write(batch.emptied)
            cleaned_sink.write(batch.cleaned)
            keys.exact.append(batch.exact)
            keys.source.append(batch.source)
            if batch.near is not None:
                keys.near.append(batch.near)
            for facts, part in ((keys.given, batch.given), (keys.position, batch.position)):
                if part is not None:
                    facts.append(part)
            if batch.entity_of_row is not None:
                # In the batch's order of first appearance: the ids a single process gives.
                ids = [0 if e is None else keys.entities.setdefault(e, len(keys.entities)) for e in batch.entities]
                keys.entity.append(np.array(ids, dtype=np.int32)[batch.entity_of_row])
            if batch.group_of_row is not None:
                ids = [keys.groups.setdefault(g, len(keys.groups)) for g in batch.groups]
                lookup = np.array([*ids, -1], dtype=np.int64)  # -1 indexes the appended "none"
                keys.group.append(lookup[batch.group_of_row])
    return keys


def _concat(parts: list[np.ndarray], dtype: Any = np.int64, width: int = 0) -> np.ndarray:
    if parts:
        return np.concatenate(parts)
    return np.zeros((0, width) if width else 0, dtype=dtype)


def _split_by_group(
    kept: np.ndarray, sources: Distinct, spelled: list[str], group_of_row: np.ndarray, cfg: CleanConfig
) -> tuple[np.ndarray, int]:
    """Split codes per row for a group split: each kept row's group merged with every group it shares a source
    with (connected components of the group-source graph), so neither a group nor a source lands in two
    splits; each such unit is hashed by its smallest group value's first spelling in sort order."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    kept_rows = np.flatnonzero(kept)
    used = np.unique(group_of_row[kept_rows])
    # Group values that differ only in case or spacing ("The Eagle", "the  eagle") are one group.
    value_ids: dict[str, int] = {}
    spelling: list[str] = []
    value_of_group = np.zeros(len(spelled), dtype=np.int64)
    for group in used.tolist():
        original = spelled[group]
        value = f"={' '.join(original[1:].casefold().split())}" if original[0] == "=" else original
        vid = value_of_group[group] = value_ids.setdefault(value, len(value_ids))
        if vid == len(spelling):
            spelling.append(original)
        else:
            spelling[vid] = min(spelling[vid], original)
    row_values = value_of_group[group_of_row[kept_rows]]
    nodes = len(value_ids) + sources.count
    graph = coo_matrix(
        (np.ones(len(kept_rows), dtype=np.int8), (row_values, len(value_ids) + sources.ids[kept_rows])), shape=(nodes, nodes)
    )
    _, component = connected_components(graph, directed=False)
    by_rank = sorted(value_ids)
    rank = np.empty(len(by_rank), dtype=np.int64)
    rank[[value_ids[value] for value in by_rank]] = np.arange(len(by_rank))
    smallest = np.full(component.max() + 1, len(by_rank), dtype=np.int64)
    np.minimum.at(smallest, component[: len(value_ids)], rank)
    units = np.unique(component[row_values])
    names = [spelling[value_ids[by_rank[smallest[unit]]]] for unit in units.tolist()]
    unit_codes = np.zeros(len(smallest), dtype=np.int8)
    unit_codes[units] = split_codes([unit_interval(name, cfg.seed) for name in names], cfg.splits)
    codes = np.zeros(len(kept), dtype=np.int8)
    codes[kept_rows] = unit_codes[component[row_values]]
    return codes, len(units)


def clean_text_rows(rows: Rows, cfg: CleanConfig, kept_path: Path, removed_path: Path) -> Outcome:
    """Clean, deduplicate and split the validated text rows in two streamed passes over batches of
    `cfg.batch_rows`: pass 1 cleans each batch into an intermediate file and keeps digests per row; the
    dedupe and the split are decided on those; pass 2 writes the kept and the removed rows."""
    given = _has_values(rows, "given_split")
    group_column = _has_values(rows, "group")
    by = cfg.text_split.by
    if by == "auto":
        by = "given" if given else "group"
    if by == "given" and not given:
        raise ConfigError(
            "clean: params key 'clean.text_split.by' is 'given' but the data has no split: set "
            "'ingest.text.split_column' or 'ingest.text.split_files'"
        )
    kept_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kept_path.parent, prefix=".clean-") as tmp:
        work = Path(tmp)
        workers = workers_for(rows.num_rows, cfg.batch_rows, cfg.workers)
        keys = _clean_pass(rows, cfg, by, group_column, work / "cleaned.parquet", work / "empty.parquet", workers)
        n = keys.exact.rows
        if not n:
            raise DataError(
                f"text: all {keys.emptied} validated rows are empty once cleaned (tags, control characters and spaces "
                "removed): check the source and reference columns"
            )
        reason = np.full(n, KEPT, dtype=np.int8)
        exact_first = distinct(keys.exact.array()).first_rows()
        reason[~exact_first] = EXACT
        if cfg.near_duplicates:
            near_first = np.zeros(n, dtype=bool)
            survivors = np.flatnonzero(exact_first)
            near_first[survivors] = distinct(keys.near.array(), survivors).first_rows()
            reason[exact_first & ~near_first] = NEAR
            del near_first, survivors
        del exact_first
        sources = distinct(keys.source.array())
        kept = reason == KEPT
        description: dict[str, Any]
        if by == "given":
            codes = _concat(keys.given, np.int8)
            # The user's val and test rows stay; a train row whose source they hold would be scored as unseen.
            held = np.zeros(sources.count, dtype=bool)
            held[sources.ids[kept & (codes != SPLITS.index("train"))]] = True
            seen = kept & (codes == SPLITS.index("train")) & held[sources.ids]
            pairs = np.unique(sources.ids[kept] * len(SPLITS) + codes[kept])
            in_two = int((np.bincount(pairs // len(SPLITS)) > 1).sum())
            if in_two:
                log.warning(
                    "text: %d sources occur in more than one of the given splits: those scores include seen sources", in_two
                )
            reason[seen] = SEEN
            description = {"by": "given", "sources_in_two_splits": in_two, "train_rows_dropped": int(seen.sum())}
        else:
            codes, description = _split_text(keys, sources, kept, cfg, by, group_column, work / "cleaned.parquet")
        kept = reason == KEPT  # again: the given split sets some train rows aside (SEEN)
        counts = {
            "duplicates_removed": int((reason != KEPT).sum()),
            "exact_duplicates_removed": int((reason == EXACT).sum()),
            "near_duplicates_removed": int((reason == NEAR).sum()),
            "emptied_by_cleaning": keys.emptied,
            "sources": int(np.unique(sources.ids[kept]).size),
            "split_by": description["by"],
            **{f"split_{k}": v for k, v in description.items() if k != "by"},
        }
        del keys, sources
        removed = _write_pass(Rows.of_file(work / "cleaned.parquet", cfg.batch_rows), reason, codes, kept_path, removed_path,
                              [work / "empty.parquet"], work, cfg.batch_rows)  # fmt: skip
    sizes = np.bincount(codes[kept], minlength=len(SPLITS))
    return Outcome(counts, description, dict(zip(SPLITS, sizes.tolist(), strict=True)), int(kept.sum()), removed)


def _split_text(
    keys: _TextKeys, sources: Distinct, kept: np.ndarray, cfg: CleanConfig, by: str, group_column: bool, cleaned: Path
) -> tuple[np.ndarray, dict[str, Any]]:
    """Split codes per row by group or by source (see the module docstring), and how the split was made."""
    if by == "group":
        attribute = cfg.text_split.group
        if attribute is None and not group_column:
            attribute = entity_attribute(keys, sources)
        entity_of_row = _concat(keys.entity)
        if attribute is not None:
            value_of_entity = [dict(values).get(attribute) for _, values in keys.entities]
            if cfg.text_split.group is not None and not any(
                value_of_entity[i] is not None for i in np.unique(entity_of_row[kept])
            ):
                raise ConfigError(f"clean: params key 'clean.text_split.group' names '{attribute}', which no source record has")
            spelled = [f"={v}" for v in value_of_entity]
            group_of_row = entity_of_row
            missing = np.array([v is None for v in value_of_entity])[group_of_row]
            label = attribute
        elif group_column:
            spelled = [f"={v}" for v in keys.groups]
            group_of_row = _concat(keys.group)
            missing = group_of_row < 0
            label = "column"
        else:
            if cfg.text_split.by == "group":
                raise ConfigError(
                    "clean: params key 'clean.text_split.by' is 'group' but there is no group: set 'clean.text_split.group' "
                    "to a record attribute or 'ingest.text.group_column' to a column"
                )
            by = "source"
        if by == "group":
            # A row without a group value is a group of its own source: its key is read back for those rows only.
            if missing.any():
                own: dict[str, int] = {}
                offset = 0
                group_of_row = group_of_row.copy()
                for batch in iter_parquet(cleaned, cfg.batch_rows, ["source_key"]):
                    rows = np.flatnonzero(missing[offset : offset + batch.num_rows])
                    if rows.size:
                        texts = batch.column(0).take(pa.array(rows)).to_pylist()
                        group_of_row[offset + rows] = [len(spelled) + own.setdefault(f"#{t}", len(own)) for t in texts]
                    offset += batch.num_rows
                spelled = spelled + list(own)
            codes, units = _split_by_group(kept, sources, spelled, group_of_row, cfg)
            return codes, {"by": "group", "group": label, "groups": units}
    positions = _concat(keys.position, np.float64)[sources.first]
    return split_codes(positions, cfg.splits).astype(np.int8)[sources.ids], {"by": "source"}


def entity_attribute(keys: _TextKeys, sources: Distinct) -> str | None:
    """The entity key (`records.is_entity_key`) most records have, or None (free prompts, no such key); a tie
    goes to the key first seen."""
    entity_keys = list(keys.entities)
    entity_of_row = _concat(keys.entity)
    counts: Counter[str] = Counter()
    for entity in entity_of_row[np.sort(sources.first)].tolist():
        counts.update(entity_keys[entity][0])
    return counts.most_common(1)[0][0] if counts else None


def _write_pass(
    rows: Rows, reason: np.ndarray, codes: np.ndarray, kept_path: Path, removed_path: Path, removed_first: list[Path],
    work: Path, batch_rows: int,
) -> int:  # fmt: skip
    """Pass 2: the kept rows with their split to `kept_path`; the removed ones, by reason in REASONS order after
    `removed_first`, with the reason, to `removed_path`. Returns the removed rows."""
    names = pa.array(SPLITS)
    base = [name for name in rows.schema.names if name != "source_key"]
    text = "source_key" in rows.schema.names
    removed_schema = pa.schema([rows.schema.field(name) for name in base]).append(pa.field("removed_because", pa.string()))
    if text:
        removed_schema = removed_schema.append(pa.field("source_key", pa.string()))
    reasons = {code: work / f"removed-{code}.parquet" for code in REASONS}
    offset = 0
    with contextlib.ExitStack() as stack:
        kept_sink = stack.enter_context(ParquetSink(kept_path, rows.schema.append(pa.field("split", pa.string()))))
        sinks = {code: stack.enter_context(ParquetSink(path, removed_schema)) for code, path in reasons.items()}
        for batch in rows.batches():
            table = pa.Table.from_batches([batch])
            why = reason[offset : offset + table.num_rows]
            keep = why == KEPT
            split = pc.take(names, pa.array(codes[offset : offset + table.num_rows][keep]))
            kept_sink.write(table.filter(pa.array(keep)).append_column("split", split))
            for code, sink in sinks.items():
                mask = why == code
                if mask.any():
                    picked = _with_reason(table.filter(pa.array(mask)).select(base), REASONS[code])
                    sink.write(
                        picked.append_column("source_key", table.column("source_key").filter(pa.array(mask))) if text else picked
                    )
            offset += table.num_rows
    with ParquetSink(removed_path, removed_schema) as removed_sink:
        copy_into(removed_sink, removed_first + list(reasons.values()), batch_rows)
        return removed_sink.rows


def pixel_digest(data: bytes) -> str:
    """Hash of the decoded pixels: the same picture saved twice (or as PNG and as lossless copy) matches."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return hashlib.blake2b(image.mode.encode() + repr(image.size).encode() + image.tobytes(), digest_size=16).hexdigest()


def clean_image_rows(
    rows: Rows, fractions: dict[str, float], seed: int, kept_path: Path, removed_path: Path, batch_rows: int
) -> Outcome:
    """Drop exact pixel duplicates (per label) and split by a hash of the pixels; pass 1 reads the images a
    batch at a time and keeps their digests, pass 2 writes the rows."""
    exact, pixels, positions = [], [], []
    for batch in progress(
        rows.batches(["image", "label"]), desc="clean images", unit="batch", total=-(-rows.num_rows // batch_rows)
    ):
        digests = pa.array([pixel_digest(b) for b in batch.column("image").to_pylist()], pa.string())
        exact.append(row_digests([pc.fill_null(batch.column("label"), ""), digests]))
        pixels.append(row_digests([digests]))
        positions.append(np.array([unit_interval(d, seed) for d in digests.to_pylist()], dtype=np.float64))
    first = distinct(_concat(exact, np.uint64, 2)).first_rows()
    reason = np.where(first, KEPT, EXACT).astype(np.int8)
    kept_pixels = distinct(_concat(pixels, np.uint64, 2)[first])
    codes = np.zeros(len(reason), dtype=np.int8)
    codes[first] = split_codes(_concat(positions, np.float64)[first][kept_pixels.first], fractions).astype(np.int8)[
        kept_pixels.ids
    ]
    kept_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kept_path.parent, prefix=".clean-") as tmp:
        removed = _write_pass(rows, reason, codes, kept_path, removed_path, [], Path(tmp), batch_rows)
    duplicates = int((~first).sum())
    counts = {"duplicates_removed": duplicates, "exact_duplicates_removed": duplicates, "near_duplicates_removed": 0,
              "emptied_by_cleaning": 0, "split_by": "image"}  # fmt: skip
    sizes = np.bincount(codes[first], minlength=len(SPLITS))
    return Outcome(counts, None, dict(zip(SPLITS, sizes.tolist(), strict=True)), int(first.sum()), removed)


def _in_memory(run: Callable[[Rows, Path, Path], Outcome], table: pa.Table, batch_rows: int) -> CleanResult:
    with tempfile.TemporaryDirectory(prefix="clean-") as tmp:
        kept, removed = Path(tmp) / "kept.parquet", Path(tmp) / "removed.parquet"
        outcome = run(Rows.of_table(table, batch_rows), kept, removed)
        return CleanResult(pq.read_table(kept), pq.read_table(removed), outcome.counts, outcome.split)


def clean_text(table: pa.Table, cfg: CleanConfig) -> CleanResult:
    """clean_text_rows on an in-memory table, with the results in memory (tests, benches, small data)."""
    return _in_memory(lambda rows, kept, removed: clean_text_rows(rows, cfg, kept, removed), table, cfg.batch_rows)


def clean_images(table: pa.Table, fractions: dict[str, float], seed: int, batch_rows: int = 4096) -> CleanResult:
    """clean_image_rows on an in-memory table, with the results in memory."""
    return _in_memory(
        lambda rows, kept, removed: clean_image_rows(rows, fractions, seed, kept, removed, batch_rows), table, batch_rows
    )


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
    """Clean every dataset, streaming, write the kept and removed rows, and the data metrics."""
    if not validation_report.is_file():
        raise DataError(f"missing {validation_report}: run the validate stage first")
    validated = json.loads(validation_report.read_text(encoding="utf-8"))["datasets"]
    metrics: dict[str, Any] = {}
    for name in DATASETS:
        path = valid_dir / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"missing input {path}: run the validate stage first")
        kept_path, removed_path = out_dir / f"{name}.parquet", out_dir / "removed" / f"{name}.parquet"
        if name == "text":
            rows = Rows.of_file(path, cfg.batch_rows)
        else:
            rows = Rows.of_file(path, image_batch_rows(path, cfg.batch_rows))
        if rows.num_rows == 0:
            raise DataError(f"{name}: no rows passed validation; see the quarantine folder")
        if name == "text":
            outcome = clean_text_rows(rows, cfg, kept_path, removed_path)
        else:
            fractions = cfg.restore_splits if name == "restore" else cfg.splits
            outcome = clean_image_rows(rows, fractions, cfg.seed, kept_path, removed_path, rows.batch_rows)
        kept_records = outcome.kept_rows
        if name == "restore" and not (outcome.split_sizes["train"] and outcome.split_sizes["test"]):
            # Only a handful of photos get here (too few for whole-photo splits): they fit in memory.
            result = band_split(
                CleanResult(pq.read_table(kept_path), pq.read_table(removed_path), outcome.counts), cfg.restore_splits
            )
            write_parquet_atomic(result.kept, kept_path)
            split_column = result.kept.column("split")
            outcome.counts = result.counts
            outcome.split_sizes = {s: int(pc.sum(pc.equal(split_column, s)).as_py() or 0) for s in SPLITS}
            # Rows are records: a photo cut into bands is still one record, in several splits.
            kept_records = len(set(result.kept.column("record_id").to_pylist()))
        assert kept_records + outcome.removed_rows == rows.num_rows, f"clean lost rows of {name}"
        if outcome.split is not None:
            write_json(outcome.split, out_dir / SPLIT_FILE)
        metrics[name] = {
            "rows_in": validated[name]["rows_in"],
            "rows_valid": validated[name]["rows_valid"],
            "rows_quarantined": validated[name]["rows_quarantined"],
            "rows_clean": kept_records,
            **outcome.counts,
            "splits": outcome.split_sizes,
        }
        log.info("%s: %d clean rows, %s; splits %s", name, kept_records, outcome.counts, outcome.split_sizes)
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
