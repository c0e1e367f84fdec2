"""Augment and features, on the tiny default data run through the earlier stages once per module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from components import augment, features
from components.common import ConfigError
from components.delex import Delexicaliser
from components.image_io import decode_image
from components.records import BRACKET, JSON, PIPE, categorical_keys, parse_source, serialise
from components.text_model import SPECIAL_TOKENS
from tests.conftest import run_data_stages, section, shrink


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]) -> Path:
    return run_data_stages(shrink(real_params), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def augmented(clean_dir: Path, real_params: dict[str, Any]) -> Path:
    out = clean_dir.parent / "augmented"
    augment.augment(augment.AugmentConfig.from_params(section(shrink(real_params), "augment")), clean_dir, out)
    return out


@pytest.fixture(scope="module")
def feature_dir(clean_dir: Path, augmented: Path, real_params: dict[str, Any]) -> Path:
    out = clean_dir.parent / "features"
    features.features(features.FeaturesConfig.from_params(section(shrink(real_params), "features")), clean_dir, augmented, out)
    return out


def test_text_augmentation_shuffles_attributes_of_train_rows_only(clean_dir: Path, augmented: Path) -> None:
    cleaned = pq.read_table(clean_dir / "text.parquet")
    extra = pq.read_table(augmented / "text.parquet")
    train = cleaned.filter(pc.equal(cleaned.column("split"), "train"))
    assert extra.num_rows == train.num_rows  # shuffled_copies: 1
    originals = {r["record_id"]: r for r in train.to_pylist()}
    reordered = 0
    for row in extra.to_pylist():
        original = originals[row["augmented_from"]]
        assert row["split"] == "train" and row["reference"] == original["reference"]
        shuffled, source = parse_source(row["source"]), parse_source(original["source"])
        assert shuffled is not None and source is not None and sorted(shuffled.pairs) == sorted(source.pairs)
        reordered += row["source"] != original["source"]
    assert reordered > extra.num_rows // 2


@pytest.mark.parametrize("syntax", [BRACKET, JSON, PIPE])
def test_text_augmentation_keeps_each_syntax_and_skips_free_prompts(syntax: str, caplog: pytest.LogCaptureFixture) -> None:
    pairs = [("name", "Blue, Red [XL]"), ("eat type", "pub"), ("price", "12")]
    sources = [serialise(pairs, syntax), "write about a pub", serialise(pairs[:1], syntax)]
    table = pa.table({"record_id": ["a", "b", "c"], "source": sources, "reference": ["x", "y", "z"], "split": ["train"] * 3})
    with caplog.at_level("INFO"):
        extra = augment.augment_text(table, copies=3, seed=0)
    assert extra.column("augmented_from").to_pylist() == ["a"] * 3  # no order to shuffle in a prompt or a single pair
    for source in extra.column("source").to_pylist():
        record = parse_source(source)
        assert record is not None and record.syntax == syntax and sorted(record.pairs) == sorted(pairs)
    assert "1 of 3 train sources are free prompts" in caplog.text
    empty = augment.augment_text(table, copies=0, seed=0)
    assert empty.num_rows == 0 and empty.schema.field("augmented_from").type == pa.string()


def test_augmentation_is_seeded(clean_dir: Path, real_params: dict[str, Any], tmp_path: Path, augmented: Path) -> None:
    cfg = augment.AugmentConfig.from_params(section(shrink(real_params), "augment"))
    images = pq.read_table(clean_dir / "images.parquet").slice(0, 40)
    first = augment.augment_images(images, cfg.images, seed=7)
    assert first.column("image").to_pylist() == augment.augment_images(images, cfg.images, seed=7).column("image").to_pylist()
    assert first.column("image").to_pylist() != augment.augment_images(images, cfg.images, seed=8).column("image").to_pylist()


def test_image_augmentation_changes_pixels_keeps_labels_and_size(clean_dir: Path, augmented: Path) -> None:
    extra = pq.read_table(augmented / "images.parquet")
    originals = {r["record_id"]: r for r in pq.read_table(clean_dir / "images.parquet").to_pylist()}
    changed = 0
    for row in extra.to_pylist():
        original = originals[row["augmented_from"]]
        assert row["label"] == original["label"] and original["split"] == "train"
        before, after = decode_image(original["image"]), decode_image(row["image"])
        assert before.shape == after.shape
        changed += not np.array_equal(before, after)
    assert changed == extra.num_rows


def test_restore_patches_have_the_configured_size(augmented: Path) -> None:
    patches = pq.read_table(augmented / "restore_patches.parquet")
    assert patches.num_rows > 0
    assert {decode_image(b).shape for b in patches.column("image").to_pylist()} == {(32, 32, 3)}


def test_disabled_augmentation_writes_empty_tables_and_plain_patches(
    clean_dir: Path, real_params: dict[str, Any], tmp_path: Path
) -> None:
    params = section(shrink(real_params), "augment")
    params["enabled"] = False
    counts = augment.augment(augment.AugmentConfig.from_params(params), clean_dir, tmp_path)
    train_photos = pc.sum(pc.equal(pq.read_table(clean_dir / "restore.parquet").column("split"), "train")).as_py()
    # The restorer's training crops are still cut: without them it has nothing to train on.
    assert counts == {"text": 0, "images": 0, "restore_patches": train_photos * params["restore"]["patches_per_image"]}
    assert all(pq.read_table(tmp_path / name).num_rows == 0 for name in ("text.parquet", "images.parquet"))


def test_invalid_augment_params_name_the_key(real_params: dict[str, Any]) -> None:
    params = section(shrink(real_params), "augment")
    params["images"]["crop_scale"] = [0.9, 0.5]
    with pytest.raises(ConfigError, match="'augment.images.crop_scale'"):
        augment.AugmentConfig.from_params(params)


def test_tokenizer_round_trips_and_arrays_match_rows(feature_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(feature_dir / "text" / "tokenizer.json"))
    delexicaliser = Delexicaliser.load(feature_dir / "text")
    assert delexicaliser is not None and delexicaliser.keys["name"] == "hidden"
    for special in SPECIAL_TOKENS:
        assert tokenizer.token_to_id(special) is not None
    for split in ("train", "val", "test"):
        rows = pq.read_table(feature_dir / "text" / f"{split}.parquet")
        arrays = load_file(str(feature_dir / "text" / f"{split}.safetensors"))
        assert len(arrays["source_offsets"]) == len(arrays["target_offsets"]) == rows.num_rows + 1
        for i in (0, rows.num_rows - 1):
            source, reference = rows.column("source")[i].as_py(), rows.column("reference")[i].as_py()
            ids = arrays["target_ids"][arrays["target_offsets"][i] : arrays["target_offsets"][i + 1]].tolist()
            # The model learns the reference with placeholders where it copies; filled in, it is the reference.
            assert tokenizer.decode(ids) == rows.column("model_reference")[i].as_py()
            assert "<|name|>" in tokenizer.decode(ids)
            assert delexicaliser.relexicalise(source, tokenizer.decode(ids)) == reference
            ids = arrays["source_ids"][arrays["source_offsets"][i] : arrays["source_offsets"][i + 1]].tolist()
            assert tokenizer.decode(ids) == rows.column("model_source")[i].as_py() == delexicaliser.model_source(source)
    for token in delexicaliser.placeholders():  # whole tokens, never split
        assert tokenizer.token_to_id(token) in tokenizer.encode(f"the {token}.").ids


def test_image_tensors_and_labels(feature_dir: Path, clean_dir: Path, augmented: Path) -> None:
    meta = json.loads((feature_dir / "images" / "meta.json").read_text())
    assert meta["label_names"] == [str(i) for i in range(10)] and meta["channels"] == 1
    cleaned = pq.read_table(clean_dir / "images.parquet")
    n_train = pc.sum(pc.equal(cleaned.column("split"), "train")).as_py()
    train = load_file(str(feature_dir / "images" / "train.safetensors"))
    assert train["images"].shape == (n_train + pq.read_table(augmented / "images.parquet").num_rows, 1, 16, 16)
    assert train["images"].dtype == np.uint8 and train["labels"].max() <= 9
    test = load_file(str(feature_dir / "images" / "test.safetensors"))
    assert test["images"].shape[0] == pc.sum(pc.equal(cleaned.column("split"), "test")).as_py()


def test_restore_arrays(feature_dir: Path, augmented: Path) -> None:
    train = load_file(str(feature_dir / "restore" / "train.safetensors"))
    assert train["patches"].shape[1:] == (3, 32, 32)
    # Pixel for pixel the augment stage's patches (a non-contiguous array once came back scrambled).
    decoded = [decode_image(b) for b in pq.read_table(augmented / "restore_patches.parquet").column("image").to_pylist()]
    assert all(np.array_equal(train["patches"][i], d.transpose(2, 0, 1)) for i, d in enumerate(decoded))
    test = load_file(str(feature_dir / "restore" / "test.safetensors"))
    assert test and all(v.ndim == 3 and v.shape[0] == 3 for v in test.values())


def test_reference_tables_cover_every_clean_row(feature_dir: Path, clean_dir: Path) -> None:
    schema = json.loads((feature_dir / "text" / "schema.json").read_text())
    logged = {f"attr_{key}" for key in categorical_keys(schema)}
    assert "attr_category" in logged and "attr_name" not in logged  # names are free text, categories repeat
    for name, columns in (
        ("text", {"source_chars", "source_tokens", "num_attributes", "oov_share", *logged}),
        ("images", {"label", "brightness", "contrast", "sharpness", "width", "height"}),
        ("restore", {"brightness", "contrast", "sharpness", "width", "height"}),
    ):
        reference = pq.read_table(feature_dir / "reference" / f"{name}.parquet")
        assert columns <= set(reference.column_names)
        assert reference.num_rows == pq.read_table(clean_dir / f"{name}.parquet").num_rows
        assert set(reference.column("split").to_pylist()) == {"train", "val", "test"}


def test_image_features_are_sane() -> None:
    from components.feature_defs import image_features

    flat = image_features(np.full((10, 12), 128, dtype=np.uint8))
    assert flat["width"] == 12 and flat["height"] == 10
    assert flat["contrast"] == 0 and flat["sharpness"] == 0 and abs(flat["brightness"] - 128 / 255) < 1e-6
    checker = image_features((np.indices((10, 10)).sum(0) % 2 * 255).astype(np.uint8))
    assert checker["sharpness"] > 1 and checker["contrast"] > 0.4


def test_features_are_byte_identical_when_rerun(
    clean_dir: Path, augmented: Path, feature_dir: Path, real_params: dict[str, Any], tmp_path: Path
) -> None:
    # DVC hashes outputs: a rerun that changes bytes (not values) would invalidate every later stage.
    features.features(
        features.FeaturesConfig.from_params(section(shrink(real_params), "features")), clean_dir, augmented, tmp_path
    )
    first = {p.relative_to(feature_dir): p.read_bytes() for p in feature_dir.rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    assert [str(name) for name in first if first[name] != second[name]] == []


def test_oov_share_is_measured_against_the_training_words(feature_dir: Path) -> None:
    from components.feature_defs import oov_share

    assert oov_share("A red-red lamp!", {"a", "red"}) == pytest.approx(1 / 4)
    assert oov_share("   ", {"a"}) == 0.0
    vocabulary = set(json.loads((feature_dir / "text" / "vocabulary.json").read_text())["words"])
    reference = pq.read_table(feature_dir / "reference" / "text.parquet").to_pylist()
    assert all(r["oov_share"] == 0.0 for r in reference if r["split"] == "train")  # their words are the vocabulary
    assert vocabulary and all(w == w.lower() for w in vocabulary)
