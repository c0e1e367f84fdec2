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
import functools
import itertools
import json
import logging
import shutil
from collections.abc import Callable
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
from components.records import PROMPT, SCHEMA_FILE, categorical_keys, categorical_values, infer_schema
from components.tables import write_parquet_atomic
from components.text_model import EOS, PAD, SEP, SPECIAL_TOKENS, TOKENIZER_FILE, VOCABULARY_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturesConfig:
    vocab_size: int
    min_frequency: int
    image_size: int
    max_categorical_values: int
    delexicalise: bool = True
    delexicalise_min_share: float = 0.5

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FeaturesConfig:
        text = require(params, "text", dict, "features")
        images = require(params, "images", dict, "features")
        # At least the 256 byte symbols, the special tokens and a few merges.
        vocab = require(text, "vocab_size", int, "features.text", low=300, high=1_000_000)
        min_frequency = require(text, "min_frequency", int, "features.text", low=1)
        size = require(images, "image_size", int, "features.images", low=4, high=1024)
        categorical = require(text, "max_categorical_values", int, "features.text", low=1)
        delexicalise = require(text, "delexicalise", bool, "features.text")
        min_share = float(require(text, "delexicalise_min_share", (int, float), "features.text", low=0.01, high=1.0))
        return cls(vocab, min_frequency, size, categorical, delexicalise, min_share)


CONFIG = FeaturesConfig
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


def train_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, placeholders: list[str] = ()) -> Any:
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
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in placeholders])
    return tokenizer


ENCODE_ROWS = 20_000
"""Texts per tokenizer call: the Encoding objects a call returns (offsets, tokens, masks) cost far more memory
than the ids kept from them, so a split is never encoded whole."""


def encode_ragged(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` -> (concatenated int32 ids, int64 offsets of length n+1), a chunk at a time."""
    lengths = np.zeros(len(texts), dtype=np.int64)
    parts = []
    for start in range(0, len(texts), ENCODE_ROWS):
        encodings = [e.ids for e in tokenizer.encode_batch(texts[start : start + ENCODE_ROWS])]
        lengths[start : start + len(encodings)] = [len(ids) for ids in encodings]
        parts.append(np.fromiter(itertools.chain.from_iterable(encodings), dtype=np.int32))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), offsets


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


def text_features_stage(clean: pa.Table, augmented: pa.Table, cfg: FeaturesConfig, out: Path) -> pa.Table:
    """Learn the schema and the delexicaliser, train the tokenizer, write the token arrays per split; return
    the per-record feature table."""
    train = clean.filter(pc.equal(clean.column("split"), "train"))
    out.mkdir(parents=True, exist_ok=True)
    # Each distinct train source once: a source's several references must not weigh its values more.
    schema = infer_schema(dict.fromkeys(train.column("source").to_pylist()), cfg.max_categorical_values)
    write_json(schema, out / SCHEMA_FILE)
    attributes = categorical_values(schema)
    log.info(
        "text: %s sources; keys %s", schema["syntax"], {k: e["kind"] for k, e in schema["keys"].items()} or "none (free prompts)"
    )
    delexicaliser = text_delexicaliser(train, schema, cfg, out)
    model_source, model_reference = model_texts(delexicaliser)

    keep = ["record_id", "source", "reference", "source_key", "split"]
    augmented_rows = augmented.select(keep[:-1]).append_column("split", pa.array(["train"] * augmented.num_rows, pa.string()))
    split_rows: dict[str, pa.Table] = {}
    for split in SPLITS:
        rows = clean.filter(pc.equal(clean.column("split"), split)).select(keep)
        if split == "train":
            rows = pa.concat_tables(
                [
                    rows.append_column("augmented", pa.array([False] * rows.num_rows, pa.bool_())),
                    augmented_rows.append_column("augmented", pa.array([True] * augmented_rows.num_rows, pa.bool_())),
                ]
            )
        else:
            rows = rows.append_column("augmented", pa.array([False] * rows.num_rows, pa.bool_()))
        model_sources, model_references = [], []
        for source, reference in zip(rows.column("source").to_pylist(), rows.column("reference").to_pylist(), strict=True):
            model_sources.append(model_source(source))  # a record's references follow it: its source is parsed once
            model_references.append(model_reference(source, reference))
        rows = rows.append_column("model_source", pa.array(model_sources, pa.string()))
        split_rows[split] = rows.append_column("model_reference", pa.array(model_references, pa.string()))
        del model_sources, model_references

    # What the model reads and writes in training: every train source (augmented copies too), then the
    # original train references (an augmented copy's reference is its original's).
    training = split_rows["train"]
    corpus = training.column("model_source").to_pylist() + training.column("model_reference").slice(0, train.num_rows).to_pylist()
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.min_frequency, delexicaliser.placeholders() if delexicaliser else [])
    tokenizer.save(str(out / TOKENIZER_FILE))
    # The words of the training sources: the out-of-vocabulary share of a prompt (a drift feature) is
    # measured against them, here for the reference and in the service for live requests.
    vocabulary = sorted({w for source in train.column("source").to_pylist() for w in words(source)})
    write_json({"words": vocabulary}, out / VOCABULARY_FILE)
    vocabulary_set = frozenset(vocabulary)
    write_json(
        {"special_tokens": {"pad": PAD, "sep": SEP, "eos": EOS}, "vocab_size": tokenizer.get_vocab_size()},
        out / "tokenizer_config.json",
    )

    del corpus
    feature_rows: list[dict[str, Any]] = []
    for split in SPLITS:
        rows = split_rows.pop(split)
        sources = rows.column("source").to_pylist()
        references = rows.column("reference").to_pylist()
        s_ids, s_off = encode_ragged(tokenizer, rows.column("model_source").to_pylist())
        t_ids, t_off = encode_ragged(tokenizer, rows.column("model_reference").to_pylist())
        save_arrays(
            {"source_ids": s_ids, "source_offsets": s_off, "target_ids": t_ids, "target_offsets": t_off},
            out / f"{split}.safetensors",
            {"split": split, "rows": rows.num_rows},
        )
        write_parquet_atomic(rows, out / f"{split}.parquet")
        for record_id, source, reference, source_tokens, target_tokens, augmented_flag in zip(
            rows.column("record_id").to_pylist(),
            sources,
            references,
            np.diff(s_off).tolist(),
            np.diff(t_off).tolist(),
            rows.column("augmented").to_pylist(),
            strict=True,
        ):
            if not augmented_flag:
                feature_rows.append(
                    {
                        "record_id": record_id,
                        "split": split,
                        **text_features(source, source_tokens, reference, target_tokens, vocabulary_set, attributes),
                    }
                )
    log.info("text: vocabulary %d, %d feature rows", tokenizer.get_vocab_size(), len(feature_rows))
    return feature_table(
        feature_rows,
        [("record_id", pa.string()), ("split", pa.string())]
        + [(c, pa.float64() if c == "oov_share" else pa.int64()) for c in TEXT_FEATURE_COLUMNS]
        + [(attribute_column(k), pa.string()) for k in attributes],
    )


def text_delexicaliser(train: pa.Table, schema: dict[str, Any], cfg: FeaturesConfig, out: Path) -> Delexicaliser | None:
    """The keys the model copies (components.delex), saved as `copying.json`; None when switched off or
    when no key's values appear verbatim in the references."""
    (out / COPYING_FILE).unlink(missing_ok=True)
    if not cfg.delexicalise or schema["syntax"] == PROMPT:
        log.info("text: no delexicalisation (%s)", "switched off" if not cfg.delexicalise else "free prompts")
        return None
    rows = zip(train.column("source").to_pylist(), train.column("reference").to_pylist(), strict=True)
    delexicaliser, shares = choose_keys(rows, cfg.delexicalise_min_share, categorical_keys(schema))
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


def image_features_stage(clean: pa.Table, augmented: pa.Table, cfg: FeaturesConfig, out: Path) -> pa.Table:
    labels = sorted(set(clean.column("label").to_pylist()), key=lambda v: (len(v), v))
    label_index = {name: i for i, name in enumerate(labels)}
    channels = channel_layout(clean.column("mode").to_pylist())
    out.mkdir(parents=True, exist_ok=True)
    feature_rows = []
    for split in SPLITS:
        rows = clean.filter(pc.equal(clean.column("split"), split))
        decoded = [decode_image(b) for b in rows.column("image").to_pylist()]
        feature_rows += [
            {"record_id": r, "split": split, "label": label, **image_features(p)}
            for r, label, p in zip(rows.column("record_id").to_pylist(), rows.column("label").to_pylist(), decoded, strict=True)
        ]
        row_labels = rows.column("label").to_pylist()
        originals = len(decoded)
        if split == "train" and augmented.num_rows:
            decoded += [decode_image(b) for b in augmented.column("image").to_pylist()]
            row_labels += augmented.column("label").to_pylist()
        stacked = resize_stack(decoded, cfg.image_size, channels)
        is_augmented = np.zeros(len(decoded), dtype=np.uint8)
        is_augmented[originals:] = 1  # the FID floor compares real images only
        save_arrays(
            {
                "images": stacked,
                "labels": np.array([label_index[v] for v in row_labels], dtype=np.int64),
                "augmented": is_augmented,
            },
            out / f"{split}.safetensors",
            {"label_names": labels, "image_size": cfg.image_size, "channels": channels},
        )
    write_json({"label_names": labels, "image_size": cfg.image_size, "channels": channels}, out / "meta.json")
    return feature_table(feature_rows, IMAGE_REFERENCE_COLUMNS + [("label", pa.string())])


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
    """Write every dataset's arrays and the drift reference tables; returns feature-table row counts."""

    def read(path: Path) -> pa.Table:
        if not path.is_file():
            raise DataError(f"missing input {path}: run the clean and augment stages first")
        return pq.read_table(path)

    references = {
        "text": text_features_stage(
            read(clean_dir / "text.parquet"), read(augmented_dir / "text.parquet"), cfg, out_dir / "text"
        ),
        "images": image_features_stage(
            read(clean_dir / "images.parquet"), read(augmented_dir / "images.parquet"), cfg, out_dir / "images"
        ),
        "restore": restore_features_stage(
            read(clean_dir / "restore.parquet"), read(augmented_dir / "restore_patches.parquet"), out_dir / "restore"
        ),
    }
    for name, table in references.items():
        write_parquet_atomic(table, out_dir / REFERENCE_DIR / f"{name}.parquet")
    # How the text was split travels to the evaluation, which reports it beside its scores.
    if (clean_dir / SPLIT_FILE).is_file():
        shutil.copy2(clean_dir / SPLIT_FILE, out_dir / "text" / SPLIT_FILE)
    return {name: table.num_rows for name, table in references.items()}


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
