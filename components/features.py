"""Stage `features`: model-ready arrays plus per-record feature tables (the drift reference).

- text: a byte-level BPE tokenizer trained with HF `tokenizers` on the train split (clean + augmented),
  saved as `<out>/text/tokenizer.json`; each split tokenized to ragged int32 arrays in safetensors
  (`source_ids`/`source_offsets`, `target_ids`/`target_offsets`) beside a Parquet of its rows (with the
  `model_source` / `model_reference` the arrays hold); the record schema learned from the train sources,
  `<out>/text/schema.json` (components.records.infer_schema: syntax, keys with value counts, categorical
  or free text, entity keys); and, with `delexicalise`, the keys whose values the model copies through
  placeholders, `<out>/text/copying.json` (components.delex). Both travel with the model;
- images: `<out>/images/<split>.safetensors` with `images` uint8 (N, C, S, S), `labels` int64 and
  `augmented` uint8 (1 for rows made by the augment stage); the
  label names are in the file's `meta` metadata entry (JSON) and in `images/meta.json`;
- restore: `<out>/restore/train.safetensors` with `patches` uint8 (N, 3, P, P) and every photo of every
  split as `image_<i>` uint8 (3, H, W);
- `<out>/reference/{text,images,restore}.parquet`: components.feature_defs features of every clean row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.common import SPLIT_FILE, SPLITS, DataError, load_params, require, run_main, write_json
from components.delex import COPYING_FILE, Delexicaliser, choose_keys, delexicalise_text
from components.feature_defs import (
    IMAGE_FEATURE_COLUMNS,
    REFERENCE_DIR,
    TEXT_FEATURE_COLUMNS,
    attribute_column,
    image_features,
    text_features,
    words,
)
from components.image_io import channel_layout, decode_image, to_layout
from components.records import (
    DISTINCT_VALUES_COUNTED,
    PROMPT,
    SCHEMA_FILE,
    categorical_keys,
    categorical_values,
    infer_schema,
)
from components.tables import ParquetSink, Rows, image_batch_rows, iter_parquet, row_digests, write_parquet_atomic
from components.text_model import EOS, PAD, SEP, SPECIAL_TOKENS, TOKENIZER_FILE, VOCABULARY_FILE
from components.workers import Workers, data_workers_from_params, workers_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturesConfig:
    vocab_size: int
    min_frequency: int
    image_size: int
    max_categorical_values: int
    delexicalise: bool = True
    delexicalise_min_share: float = 0.5
    batch_rows: int = 65_536
    # Processes for the per-batch text work (components.workers); the output is the same for any count. Built in
    # code it is the caller's one process; from params, `base.data_workers` (default: one per core).
    workers: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FeaturesConfig:
        text = require(params, "text", dict, "features")
        images = require(params, "images", dict, "features")
        # At least the 256 byte symbols, the special tokens and a few merges.
        vocab = require(text, "vocab_size", int, "features.text", low=300, high=1_000_000)
        min_frequency = require(text, "min_frequency", int, "features.text", low=1)
        size = require(images, "image_size", int, "features.images", low=4, high=1024)
        categorical = require(text, "max_categorical_values", int, "features.text", low=1, high=DISTINCT_VALUES_COUNTED)
        delexicalise = require(text, "delexicalise", bool, "features.text")
        min_share = float(require(text, "delexicalise_min_share", (int, float), "features.text", low=0.01, high=1.0))
        batch_rows = require(params, "batch_rows", int, "features", low=1)
        workers = data_workers_from_params(params.get("base", {}))
        return cls(vocab, min_frequency, size, categorical, delexicalise, min_share, batch_rows, workers)


CONFIG = FeaturesConfig
IMAGE_BATCH_ROWS = 4096
"""At most this many images per batch (and about tables.IMAGE_BATCH_BYTES of them); the restore photos, a few
dozen kept whole for evaluation, are not streamed."""
IMAGE_REFERENCE_COLUMNS = [("record_id", pa.string()), ("split", pa.string())] + [
    (c, pa.float64()) for c in IMAGE_FEATURE_COLUMNS
]


def save_arrays(arrays: dict[str, np.ndarray], path: Path, meta: dict[str, Any]) -> None:
    """safetensors with one `meta` JSON entry: several metadata keys come out in random order, which would
    change the file's bytes (and DVC's hash) on every run."""
    from safetensors.numpy import save_file

    # safetensors writes an array's memory as it lies: a non-C-contiguous one (np.stack of transposed
    # views is one) would come back scrambled.
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    save_file(arrays, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})


SAFETENSORS_DTYPES = {np.dtype(np.int64): ("I64", 2), np.dtype(np.int32): ("I32", 1), np.dtype(np.uint8): ("U8", 0)}
"""The dtypes TensorSink writes: their safetensors name and rank. safetensors lays tensors out by its dtype
order, highest first (I64 before I32 before U8), then by name."""


@dataclass
class _Tensor:
    scratch: Any  # an anonymous temporary file: gone with the process, whatever happens
    dtype: np.dtype
    row_shape: tuple[int, ...]
    rows: int = 0


class TensorSink:
    """A safetensors file written a batch at a time: each tensor grows along its first axis in a scratch file,
    and `close()` writes the header and the data exactly as `save_arrays` would for the whole arrays (a test
    holds it to that, byte for byte), so a split never has to fit in memory. As a context manager it writes
    nothing when the block fails."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tensors: dict[str, _Tensor] = {}

    def declare(self, name: str, dtype: Any, row_shape: tuple[int, ...] = ()) -> None:
        """A tensor that may get no rows still needs its dtype and the shape of a row."""
        if name in self._tensors:
            return
        if np.dtype(dtype) not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{self.path}: tensor {name} is {np.dtype(dtype)}; TensorSink writes {list(map(str, SAFETENSORS_DTYPES))}"
            )
        self._tensors[name] = _Tensor(tempfile.TemporaryFile(dir=self.path.parent), np.dtype(dtype), tuple(row_shape))

    def append(self, name: str, array: np.ndarray) -> None:
        self.declare(name, array.dtype, array.shape[1:])
        tensor = self._tensors[name]
        if array.dtype != tensor.dtype or array.shape[1:] != tensor.row_shape:
            expected, got = f"{tensor.dtype}{list(tensor.row_shape)}", f"{array.dtype}{list(array.shape[1:])}"
            raise ValueError(f"{self.path}: tensor {name} is {expected} per row, got {got}")
        tensor.scratch.write(np.ascontiguousarray(array).tobytes())
        tensor.rows += array.shape[0]

    def close(self, meta: dict[str, Any]) -> None:
        order = sorted(self._tensors, key=lambda name: (-SAFETENSORS_DTYPES[self._tensors[name].dtype][1], name))
        header: dict[str, Any] = {"__metadata__": {"meta": json.dumps(meta, sort_keys=True)}}
        start = 0
        for name in order:
            tensor = self._tensors[name]
            end = start + tensor.rows * int(np.prod(tensor.row_shape, dtype=np.int64)) * tensor.dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype][0], "shape": [tensor.rows, *tensor.row_shape],
                            "data_offsets": [start, end]}  # fmt: skip
            start = end
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        partial = self.path.with_name(f".{self.path.name}.partial")
        try:
            with partial.open("wb") as out:
                out.write(len(encoded).to_bytes(8, "little") + encoded)
                for name in order:
                    self._tensors[name].scratch.seek(0)
                    shutil.copyfileobj(self._tensors[name].scratch, out, 1 << 22)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
            self.abort()

    def abort(self) -> None:
        for tensor in self._tensors.values():
            tensor.scratch.close()

    def __enter__(self) -> TensorSink:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.abort()  # close() wrote the file on success; on failure nothing is written


class RaggedSink:
    """Token ids of texts, a batch at a time, as `<name>_ids` (int32, concatenated) and `<name>_offsets`
    (int64, n + 1) in a TensorSink."""

    def __init__(self, sink: TensorSink, name: str) -> None:
        self.sink, self.name, self.total = sink, name, 0
        sink.append(f"{name}_offsets", np.zeros(1, dtype=np.int64))
        sink.declare(f"{name}_ids", np.int32)

    def append(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        self.sink.append(f"{self.name}_ids", ids)
        self.sink.append(f"{self.name}_offsets", offsets[1:] + self.total)
        self.total += int(offsets[-1])


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int, placeholders: list[str] = (), length: int | None = None
) -> Any:
    """Byte-level BPE (GPT-2 style): every string is encodable, nothing maps to an unknown token. The
    delexicaliser's placeholders are added tokens: never split, and decoded as written."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts) if length is None else length)
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in placeholders])
    return tokenizer


ENCODE_ROWS = 4096
"""Texts per tokenizer call: the Encoding objects a call returns (offsets, tokens, masks) cost far more memory
than the ids kept from them, so a split is never encoded whole."""


def encode_ragged(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` -> (concatenated int32 ids, int64 offsets of length n+1), a chunk at a time."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts = []
    for start in range(0, len(texts), ENCODE_ROWS):
        # The fast variant skips the character offsets, which nothing here reads: a quarter of the time.
        encodings = [e.ids for e in tokenizer.encode_batch_fast(texts[start : start + ENCODE_ROWS])]
        lengths[start : start + len(encodings)] = [len(ids) for ids in encodings]
        parts.append(np.fromiter(itertools.chain.from_iterable(encodings), dtype=np.int32))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), offsets


def encode_distinct(tokenizer: Any, texts: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """encode_ragged of texts that repeat (a record's sources, once per reference): each distinct text is
    encoded once and its ids copied to every row."""
    encoded = pc.dictionary_encode(texts)
    encoded = encoded.combine_chunks() if isinstance(encoded, pa.ChunkedArray) else encoded
    ids, offsets = encode_ragged(tokenizer, encoded.dictionary.to_pylist())
    rows = encoded.indices.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)[rows]
    row_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=row_offsets[1:])
    # Each row's ids are its text's slice: one gather over every position.
    positions = np.repeat(offsets[:-1][rows] - row_offsets[:-1], lengths) + np.arange(row_offsets[-1])
    return ids[positions], row_offsets


def model_texts(delexicaliser: Delexicaliser | None) -> tuple[Callable[[str], str], Callable[[str, str], str]]:
    """(source -> what the model reads, (source, reference) -> what it writes), each source parsed once while
    it recurs (a record's references and its augmented copies lie together): parsing per row was the stage's
    other hot spot."""
    if delexicaliser is None:
        return (lambda source: source), (lambda source, reference: reference)

    @functools.lru_cache(maxsize=1 << 16)
    def prepared(source: str) -> tuple[str, dict[str, str]]:
        return delexicaliser.model_source(source), delexicaliser.slots(source)

    return (lambda source: prepared(source)[0]), (lambda source, reference: delexicalise_text(reference, prepared(source)[1]))


SPLIT_COLUMNS = ["record_id", "source", "reference", "source_key"]
"""The clean columns a split's Parquet keeps, before `split`, `augmented`, `model_source`, `model_reference`."""
SPLIT_SCHEMA = pa.schema(
    [(name, pa.string()) for name in SPLIT_COLUMNS]
    + [("split", pa.string()), ("augmented", pa.bool_()), ("model_source", pa.string()), ("model_reference", pa.string())]
)


def as_rows(data: pa.Table | Rows, batch_rows: int) -> Rows:
    return data if isinstance(data, Rows) else Rows.of_table(data, batch_rows)


def split_batches(rows: Rows, split: str, columns: list[str]) -> Iterator[pa.Table]:
    """The rows of one split, a batch at a time."""
    for batch in rows.batches([*columns, "split"] if "split" not in columns else columns):
        table = pa.Table.from_batches([batch])
        yield table.filter(pc.equal(table.column("split"), split)).select(columns)


def distinct_sources(rows: Rows, vocabulary: set[str]) -> Iterator[str]:
    """Each distinct train source once, in order of first appearance (a source's several references must not
    weigh its values more), remembered as a 128-bit digest, not as text; adds the sources' words to `vocabulary`."""
    seen: set[int] = set()
    for table in split_batches(rows, "train", ["source"]):
        sources = table.column("source")
        digests = row_digests([sources]).tolist()
        for source, (first, second) in zip(sources.to_pylist(), digests, strict=True):
            digest = first << 64 | second
            if digest not in seen:
                seen.add(digest)
                vocabulary.update(words(source))
                yield source


def with_model_texts(delexicaliser: Delexicaliser | None, job: tuple[pa.Table, str, bool]) -> pa.Table:
    """One batch of a split's rows (the SPLIT_COLUMNS) with its split, whether augmented, and what the model
    reads and writes (SPLIT_SCHEMA)."""
    table, split, is_augmented = job
    model_source, model_reference = model_texts(delexicaliser)
    sources, references = table.column("source").to_pylist(), table.column("reference").to_pylist()
    columns = {
        **{name: table.column(name) for name in SPLIT_COLUMNS},
        "split": pa.array([split] * table.num_rows, pa.string()),
        "augmented": pa.array([is_augmented] * table.num_rows, pa.bool_()),
        "model_source": pa.array([model_source(s) for s in sources], pa.string()),
        "model_reference": pa.array([model_reference(s, r) for s, r in zip(sources, references, strict=True)], pa.string()),
    }
    return pa.table(columns, schema=SPLIT_SCHEMA)


@dataclass(frozen=True)
class EncodeContext:
    """What encoding a batch needs (components.workers: unpickled once per worker)."""

    tokenizer: Any
    vocabulary: frozenset[str]
    attributes: dict[str, Any]
    feature_schema: pa.Schema
    with_features: bool


@dataclass(frozen=True)
class EncodedBatch:
    rows: int
    source_ids: np.ndarray
    source_offsets: np.ndarray
    target_ids: np.ndarray
    target_offsets: np.ndarray
    features: pa.Table | None
    """The per-record features of the batch's original (not augmented) rows; None unless asked for."""


def encode_split_batch(context: EncodeContext, job: tuple[pa.Table, str]) -> EncodedBatch:
    """Token ids of one batch of a split's Parquet (SPLIT_SCHEMA rows) and, if asked, its feature rows."""
    table, split = job
    s_ids, s_off = encode_distinct(context.tokenizer, table.column("model_source"))
    t_ids, t_off = encode_ragged(context.tokenizer, table.column("model_reference").to_pylist())
    features = None
    if context.with_features:
        originals = np.flatnonzero(~table.column("augmented").to_numpy(zero_copy_only=False))
        kept = table.take(pa.array(originals))
        rows = [
            {"record_id": record_id, "split": split,
             **text_features(source, source_tokens, reference_text, target_tokens, context.vocabulary, context.attributes)}
            for record_id, source, reference_text, source_tokens, target_tokens in zip(
                kept.column("record_id").to_pylist(), kept.column("source").to_pylist(),
                kept.column("reference").to_pylist(), np.diff(s_off)[originals].tolist(),
                np.diff(t_off)[originals].tolist(), strict=True,
            )
        ]  # fmt: skip
        features = pa.Table.from_pylist(rows, schema=context.feature_schema)
    return EncodedBatch(table.num_rows, s_ids, s_off, t_ids, t_off, features)


def text_features_stage(
    clean: pa.Table | Rows, augmented: pa.Table | Rows, cfg: FeaturesConfig, out: Path, reference: Path | None = None
) -> int:
    """Learn the schema and the delexicaliser, train the tokenizer, write each split's rows and token arrays,
    and (given `reference`) the per-record feature table; returns that table's rows. Streams: a few passes over
    the train rows, one over each other split, a batch of `cfg.batch_rows` at a time."""
    clean, augmented = as_rows(clean, cfg.batch_rows), as_rows(augmented, cfg.batch_rows)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary: set[str] = set()
    schema = infer_schema(distinct_sources(clean, vocabulary), cfg.max_categorical_values)
    write_json(schema, out / SCHEMA_FILE)
    attributes = categorical_values(schema)
    log.info(
        "text: %s sources; keys %s", schema["syntax"], {k: e["kind"] for k, e in schema["keys"].items()} or "none (free prompts)"
    )
    train_pairs = (
        pair
        for table in split_batches(clean, "train", ["source", "reference"])
        for pair in zip(table.column("source").to_pylist(), table.column("reference").to_pylist(), strict=True)
    )
    delexicaliser = text_delexicaliser(train_pairs, schema, cfg, out)
    with Workers(workers_for(clean.num_rows + augmented.num_rows, cfg.batch_rows, cfg.workers)) as workers:
        for split in SPLITS:
            jobs = split_jobs(clean, augmented if split == "train" else None, split)
            with ParquetSink(out / f"{split}.parquet", SPLIT_SCHEMA) as sink:
                for table in workers.map(with_model_texts, delexicaliser, jobs):
                    sink.write(table)
        tokenizer = train_split_tokenizer(out / "train.parquet", delexicaliser, cfg)
        tokenizer.save(str(out / TOKENIZER_FILE))
        # The words of the training sources: the out-of-vocabulary share of a prompt (a drift feature) is
        # measured against them, here for the reference and in the service for live requests.
        write_json({"words": sorted(vocabulary)}, out / VOCABULARY_FILE)
        write_json(
            {"special_tokens": {"pad": PAD, "sep": SEP, "eos": EOS}, "vocab_size": tokenizer.get_vocab_size()},
            out / "tokenizer_config.json",
        )
        feature_schema = pa.schema(
            [("record_id", pa.string()), ("split", pa.string())]
            + [(c, pa.float64() if c == "oov_share" else pa.int64()) for c in TEXT_FEATURE_COLUMNS]
            + [(attribute_column(k), pa.string()) for k in attributes]
        )
        context = EncodeContext(tokenizer, frozenset(vocabulary), attributes, feature_schema, reference is not None)
        feature_rows = 0
        with ParquetSink(reference, feature_schema) if reference is not None else contextlib.nullcontext() as features_sink:
            for split in SPLITS:
                jobs = ((pa.Table.from_batches([b]), split) for b in iter_parquet(out / f"{split}.parquet", cfg.batch_rows))
                with TensorSink(out / f"{split}.safetensors") as arrays:
                    source_ids, target_ids = RaggedSink(arrays, "source"), RaggedSink(arrays, "target")
                    rows = 0
                    for encoded in workers.map(encode_split_batch, context, jobs):
                        rows += encoded.rows
                        source_ids.append(encoded.source_ids, encoded.source_offsets)
                        target_ids.append(encoded.target_ids, encoded.target_offsets)
                        if features_sink is not None and encoded.features is not None:
                            features_sink.write(encoded.features)
                            feature_rows += encoded.features.num_rows
                    arrays.close({"split": split, "rows": rows})
    log.info("text: vocabulary %d, %d feature rows", tokenizer.get_vocab_size(), feature_rows)
    return feature_rows


def split_jobs(clean: Rows, augmented: Rows | None, split: str) -> Iterator[tuple[pa.Table, str, bool]]:
    """One split's batches for with_model_texts: its clean rows, then any augmented rows."""
    yield from ((table, split, False) for table in split_batches(clean, split, SPLIT_COLUMNS))
    if augmented is not None:
        yield from ((pa.Table.from_batches([b]), split, True) for b in augmented.batches(SPLIT_COLUMNS))


def train_split_tokenizer(train_path: Path, delexicaliser: Delexicaliser | None, cfg: FeaturesConfig) -> Any:
    """The tokenizer of what the model reads and writes in training: every train source (augmented copies
    too), then the original train references (an augmented copy's reference is its original's)."""

    def column_texts(column: str) -> Iterator[str]:
        for batch in iter_parquet(train_path, cfg.batch_rows, [column]):
            yield from batch.column(0).to_pylist()

    train_rows = pq.ParquetFile(train_path).metadata.num_rows
    original_count = int(pc.sum(pc.invert(pq.read_table(train_path, columns=["augmented"]).column(0))).as_py() or 0)
    corpus = itertools.chain(column_texts("model_source"), itertools.islice(column_texts("model_reference"), original_count))
    placeholders = delexicaliser.placeholders() if delexicaliser else []
    log.info("text: training the tokenizer on %d train rows", train_rows)
    return train_tokenizer(corpus, cfg.vocab_size, cfg.min_frequency, placeholders, length=train_rows + original_count)


def text_delexicaliser(
    train_pairs: Iterable[tuple[str, str]], schema: dict[str, Any], cfg: FeaturesConfig, out: Path
) -> Delexicaliser | None:
    """The keys the model copies (components.delex), from the train (source, reference) pairs, saved as
    `copying.json`; None when switched off or when no key's values appear verbatim in the references."""
    (out / COPYING_FILE).unlink(missing_ok=True)
    if not cfg.delexicalise or schema["syntax"] == PROMPT:
        log.info("text: no delexicalisation (%s)", "switched off" if not cfg.delexicalise else "free prompts")
        return None
    delexicaliser, shares = choose_keys(train_pairs, cfg.delexicalise_min_share, categorical_keys(schema))
    log.info("text: copied keys %s (verbatim share per key %s)", dict(delexicaliser.keys) or "none", shares)
    if not delexicaliser.keys:
        return None
    delexicaliser.save(out)
    return delexicaliser


def feature_table(rows: list[dict[str, Any]], columns: list[tuple[str, pa.DataType]]) -> pa.Table:
    """Rows with every column typed, so an empty split or a value missing from the first row loses nothing."""
    return pa.Table.from_pylist(rows, schema=pa.schema(columns))


def resize_stack(images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    """Decoded images -> uint8 (N, C, size, size) with torchvision's antialiased resize."""
    import torch
    from torchvision.transforms import v2

    resize = v2.Resize((size, size), antialias=True)
    out = np.empty((len(images), channels, size, size), dtype=np.uint8)
    for i, pixels in enumerate(images):
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        if pixels.shape[2] != channels:
            pixels = np.repeat(pixels[..., :1], channels, axis=2) if channels == 3 else pixels[..., :1]
        tensor = torch.from_numpy(np.array(pixels.transpose(2, 0, 1), copy=True))  # PIL buffers are read-only
        out[i] = resize(tensor).numpy()
    return out


def append_images(
    arrays: TensorSink, decoded: list[np.ndarray], labels: list[int], augmented: bool, size: int, channels: int
) -> None:
    """A batch of images, resized, with their label indices and whether they are augmented copies (the FID
    floor compares real images only)."""
    arrays.append("images", resize_stack(decoded, size, channels))
    arrays.append("labels", np.array(labels, dtype=np.int64))
    arrays.append("augmented", np.full(len(decoded), augmented, dtype=np.uint8))


def image_features_stage(
    clean: pa.Table | Rows, augmented: pa.Table | Rows, cfg: FeaturesConfig, out: Path, reference: Path | None = None
) -> int:
    """Each split's images resized to uint8 (N, C, S, S) with labels (and, for train, the augmented copies),
    a batch at a time; the per-record feature table to `reference`. Returns that table's rows."""
    clean, augmented = as_rows(clean, IMAGE_BATCH_ROWS), as_rows(augmented, IMAGE_BATCH_ROWS)
    described = pa.Table.from_batches(
        list(clean.batches(["label", "mode"])), pa.schema([clean.schema.field("label"), clean.schema.field("mode")])
    )
    labels = sorted(set(described.column("label").to_pylist()), key=lambda v: (len(v), v))
    label_index = {name: i for i, name in enumerate(labels)}
    channels = channel_layout(described.column("mode").to_pylist())
    meta = {"label_names": labels, "image_size": cfg.image_size, "channels": channels}
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(IMAGE_REFERENCE_COLUMNS + [("label", pa.string())])
    feature_rows = 0
    with ParquetSink(reference, schema) if reference is not None else contextlib.nullcontext() as features_sink:
        for split in SPLITS:
            with TensorSink(out / f"{split}.safetensors") as arrays:
                arrays.declare("images", np.uint8, (channels, cfg.image_size, cfg.image_size))
                arrays.declare("labels", np.int64)
                arrays.declare("augmented", np.uint8)
                for table in split_batches(clean, split, ["record_id", "label", "image"]):
                    row_labels = table.column("label").to_pylist()
                    decoded = [decode_image(b) for b in table.column("image").to_pylist()]
                    append_images(arrays, decoded, [label_index[v] for v in row_labels], False, cfg.image_size, channels)
                    if features_sink is not None:
                        ids = table.column("record_id").to_pylist()
                        rows = [{"record_id": r, "split": split, "label": label, **image_features(p)}
                                for r, label, p in zip(ids, row_labels, decoded, strict=True)]  # fmt: skip
                        features_sink.write(pa.Table.from_pylist(rows, schema=schema))
                        feature_rows += len(rows)
                if split == "train":
                    for batch in augmented.batches(["label", "image"]):
                        decoded = [decode_image(b) for b in batch.column("image").to_pylist()]
                        label_ids = [label_index[v] for v in batch.column("label").to_pylist()]
                        append_images(arrays, decoded, label_ids, True, cfg.image_size, channels)
                arrays.close(meta)
    write_json(meta, out / "meta.json")
    return feature_rows


def restore_features_stage(clean: pa.Table, patches: pa.Table, out: Path) -> pa.Table:
    """Every photo of every split and the train patches, in the dataset's channel layout (image_io.channel_layout)."""
    out.mkdir(parents=True, exist_ok=True)
    channels = channel_layout(clean.column("mode").to_pylist())
    log.info("restore: %s layout (%d channel%s)", "greyscale" if channels == 1 else "RGB", channels, "s" * (channels > 1))
    feature_rows = []
    for split in SPLITS:
        rows = clean.filter(pc.equal(clean.column("split"), split))
        tensors: dict[str, np.ndarray] = {}
        ids = rows.column("record_id").to_pylist()
        for i, (record_id, data) in enumerate(zip(ids, rows.column("image").to_pylist(), strict=True)):
            pixels = decode_image(data)
            feature_rows.append({"record_id": record_id, "split": split, **image_features(pixels)})
            tensors[f"image_{i}"] = to_layout(pixels, channels)
        if split == "train":
            decoded = [to_layout(decode_image(b), channels) for b in patches.column("image").to_pylist()]
            tensors["patches"] = np.stack(decoded) if decoded else np.zeros((0, channels, 1, 1), dtype=np.uint8)
        save_arrays(tensors, out / f"{split}.safetensors", {"record_ids": ids, "channels": channels})
    return feature_table(feature_rows, IMAGE_REFERENCE_COLUMNS)


def features(cfg: FeaturesConfig, clean_dir: Path, augmented_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write every dataset's arrays and the drift reference tables, streaming text and images; returns the
    reference tables' row counts."""

    def existing(path: Path) -> Path:
        if not path.is_file():
            raise DataError(f"missing input {path}: run the clean and augment stages first")
        return path

    def text_rows(path: Path) -> Rows:
        return Rows.of_file(existing(path), cfg.batch_rows)

    def image_rows(path: Path) -> Rows:
        return Rows.of_file(existing(path), image_batch_rows(existing(path), IMAGE_BATCH_ROWS))

    references = out_dir / REFERENCE_DIR
    counts = {
        "text": text_features_stage(text_rows(clean_dir / "text.parquet"), text_rows(augmented_dir / "text.parquet"), cfg,
                                    out_dir / "text", references / "text.parquet"),
        "images": image_features_stage(image_rows(clean_dir / "images.parquet"), image_rows(augmented_dir / "images.parquet"),
                                       cfg, out_dir / "images", references / "images.parquet"),
    }  # fmt: skip
    # The restore set is a few dozen photos (each kept whole for evaluation) and their patches: in memory.
    restore = restore_features_stage(
        pq.read_table(existing(clean_dir / "restore.parquet")),
        pq.read_table(existing(augmented_dir / "restore_patches.parquet")),
        out_dir / "restore",
    )
    write_parquet_atomic(restore, references / "restore.parquet")
    counts["restore"] = restore.num_rows
    # How the text was split travels to the evaluation, which reports it beside its scores.
    if (clean_dir / SPLIT_FILE).is_file():
        shutil.copy2(clean_dir / SPLIT_FILE, out_dir / "text" / SPLIT_FILE)
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.features", description=__doc__)
    parser.add_argument("clean", type=Path, help="clean data folder (data/clean)")
    parser.add_argument("augmented", type=Path, help="augmented data folder (data/augmented)")
    parser.add_argument("out", type=Path, help="output folder (data/features)")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: features(FeaturesConfig.from_params(load_params("features", args.params)), args.clean, args.augmented, args.out)
    )


if __name__ == "__main__":
    main()
