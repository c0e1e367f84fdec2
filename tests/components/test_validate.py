"""Validate: each bad row ends in quarantine with the expectation it failed; rows in = passed + quarantined."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components import datasets, ingest, validate
from components.common import ConfigError, DataError
from tests.conftest import section


@pytest.fixture
def cfg(tiny_params: dict[str, Any]) -> validate.ValidateConfig:
    return validate.ValidateConfig.from_params(section(tiny_params, "validate"))


def run(
    name: str, raw: pa.Table, rules_expectations: list[Any], tmp_path: Path, derive: Any = None
) -> tuple[pa.Table, pa.Table, validate.DatasetReport]:
    raw_path = tmp_path / f"raw_{name}.parquet"
    pq.write_table(raw, raw_path)
    runner = validate.SuiteRunner(tmp_path / "docs")
    report = validate.validate_dataset(
        name, raw_path, rules_expectations, runner, tmp_path / "valid.parquet", tmp_path / "quarantine.parquet", chunk_rows=3,
        derive=derive,
    )  # fmt: skip
    return pq.read_table(tmp_path / "valid.parquet"), pq.read_table(tmp_path / "quarantine.parquet"), report


def text_table(
    rows: list[tuple[str | None, str | None]], errors: list[str | None] | None = None, ids: list[str] | None = None,
    splits: list[str | None] | None = None,
) -> pa.Table:  # fmt: skip
    n = len(rows)
    return pa.table(
        {
            "record_id": ids or [f"f.csv:{i + 1}" for i in range(n)],
            "source": [r[0] for r in rows],
            "reference": [r[1] for r in rows],
            "origin": ["f.csv"] * n,
            "ingest_error": errors or [None] * n,
            "group": [None] * n,
            "given_split": splits or [None] * n,
        },
        schema=datasets.TEXT_SCHEMA,
    )


GOOD = ("name: Nova Air | colour: sage", "The Nova Air, in sage.")


def quarantined_reason(quarantine: pa.Table, record_id: str) -> str:
    rows = {r["record_id"]: r for r in quarantine.to_pylist()}
    assert record_id in rows, f"{record_id} not quarantined"
    return rows[record_id]["failed_expectations"]


def check_accounting(valid: pa.Table, quarantine: pa.Table, report: validate.DatasetReport, rows_in: int) -> None:
    assert report.rows_in == rows_in == valid.num_rows + quarantine.num_rows
    assert set(valid.column("record_id").to_pylist()).isdisjoint(quarantine.column("record_id").to_pylist())


@pytest.mark.parametrize(
    ("row", "expectation"),
    [
        ((GOOD[0], None), "expect_column_values_to_not_be_null(reference)"),
        ((None, GOOD[1]), "expect_column_values_to_not_be_null(source)"),
        ((GOOD[0], ""), "expect_column_value_lengths_to_be_between(reference)"),
        ((GOOD[0], "   "), "expect_column_values_to_not_match_regex(reference)"),
        ((GOOD[0], "x" * 1_000_000), "expect_column_value_lengths_to_be_between(reference)"),
        (("colour: sage | shoe_size: 9", GOOD[1]), "expect_column_values_to_be_null(source_attribute_problem)"),
        (("colour[sage], shoe_size[9]", GOOD[1]), "expect_column_values_to_be_null(source_attribute_problem)"),
        (("write me an ad", GOOD[1]), "expect_column_values_to_be_null(source_attribute_problem)"),
    ],
    ids=[
        "null-reference",
        "null-source",
        "empty-reference",
        "blank-reference",
        "1MB-reference",
        "unknown-attribute",
        "unknown-attribute-bracket",
        "not-a-record",
    ],
)
def test_bad_text_row_is_quarantined_with_its_expectation(
    cfg: validate.ValidateConfig, tmp_path: Path, row: tuple[str | None, str | None], expectation: str
) -> None:
    raw = text_table([GOOD, row, ('{"name": "Nova Air", "colour": "sage"}', GOOD[1]), ("name[Nova Air]", GOOD[1])])
    rules = validate.TextRules(**{**cfg.text.__dict__, "allowed_attributes": ("name", "colour")})
    valid, quarantine, report = run(
        "text", raw, validate.text_expectations(rules), tmp_path, validate.text_derived_columns(rules)
    )
    check_accounting(valid, quarantine, report, 4)
    assert quarantine.num_rows == 1
    assert expectation in quarantined_reason(quarantine, "f.csv:2")
    assert quarantine.column("quarantined_by").to_pylist() == ["validate"]
    if row[1] and len(row[1]) == 1_000_000:
        assert len(quarantine.column("reference")[0].as_py()) == 1_000_000  # kept whole, not truncated


def test_invalid_utf8_row_is_quarantined(cfg: validate.ValidateConfig, tmp_path: Path) -> None:
    raw = text_table([GOOD, (GOOD[0], "caf\ufffd")], errors=[None, "invalid UTF-8 in column 'reference' at byte 3"])
    valid, quarantine, report = run("text", raw, validate.text_expectations(cfg.text), tmp_path)
    check_accounting(valid, quarantine, report, 2)
    assert "expect_column_values_to_be_null(ingest_error)" in quarantined_reason(quarantine, "f.csv:2")
    assert quarantine.column("ingest_error")[0].as_py().startswith("invalid UTF-8")


def test_duplicate_ids_across_chunks_are_all_quarantined(cfg: validate.ValidateConfig, tmp_path: Path) -> None:
    raw = text_table([GOOD] * 5, ids=["a", "b", "c", "d", "a"])  # chunk_rows=3: the pair spans two chunks
    valid, quarantine, report = run("text", raw, validate.text_expectations(cfg.text), tmp_path)
    check_accounting(valid, quarantine, report, 5)
    assert sorted(quarantine.column("record_id").to_pylist()) == ["a", "a"]
    assert "expect_column_values_to_be_unique(record_id)" in quarantine.column("failed_expectations")[0].as_py()


def test_allowed_attributes_null_accepts_free_prompts(cfg: validate.ValidateConfig, tmp_path: Path) -> None:
    rules = validate.TextRules(**{**cfg.text.__dict__, "allowed_attributes": None})
    valid, quarantine, _ = run("text", text_table([("write me an ad", "Buy it.")]), validate.text_expectations(rules), tmp_path)
    assert valid.num_rows == 1 and quarantine.num_rows == 0


def png(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if mode:
        image = image.convert(mode)
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (16, 16), dtype=np.uint8)
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        (root / label / "good.png").write_bytes(png(grey))
    good = png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), fmt="JPEG")
    (root / "1" / "colour.jpg").write_bytes(good)
    (root / "0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "0" / "cmyk.jpg").write_bytes(png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), mode="CMYK", fmt="JPEG"))
    (root / "0" / "tiny.png").write_bytes(png(grey[:4, :4]))
    (root / "7").mkdir()
    (root / "7" / "unknown_label.png").write_bytes(png(grey))
    (root / "stray.png").write_bytes(png(grey))
    outside = root.parent / "outside.png"
    outside.write_bytes(png(grey))
    (root / "1" / "escape.png").symlink_to(outside)
    (root / "1" / "dotdot.png").symlink_to(Path("..") / ".." / "outside.png")  # a relative `..` escape


@pytest.fixture(scope="module")
def image_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.Table, validate.DatasetReport]:
    tmp_path = tmp_path_factory.mktemp("images")
    root = tmp_path / "images"
    make_image_folder(root)
    raw = pa.Table.from_batches(list(datasets.image_folder(root, labelled=True, batch_rows=4)))
    rules = validate.ImageRules(min_size=8, max_size=64, channels=(1, 3), modes=("L", "RGB"), labels=("0", "1"))
    return run("images", raw, validate.image_expectations(rules), tmp_path)


@pytest.mark.parametrize(
    ("record_id", "expectation"),
    [
        ("0/corrupt.png", "expect_column_values_to_be_null(ingest_error)"),
        ("0/truncated.jpg", "expect_column_values_to_be_null(ingest_error)"),
        ("0/cmyk.jpg", "expect_column_values_to_be_in_set(mode)"),
        ("0/tiny.png", "expect_column_values_to_be_between(width)"),
        ("7/unknown_label.png", "expect_column_values_to_be_in_set(label)"),
        ("stray.png", "expect_column_values_to_be_null(ingest_error)"),
        ("1/escape.png", "expect_column_values_to_be_null(ingest_error)"),
        ("1/dotdot.png", "expect_column_values_to_be_null(ingest_error)"),
    ],
)
def test_bad_image_is_quarantined_with_its_expectation(
    image_results: tuple[pa.Table, pa.Table, validate.DatasetReport], record_id: str, expectation: str
) -> None:
    valid, quarantine, report = image_results
    check_accounting(valid, quarantine, report, 11)
    assert expectation in quarantined_reason(quarantine, record_id)
    assert sorted(valid.column("record_id").to_pylist()) == ["0/good.png", "1/colour.jpg", "1/good.png"]


def test_quarantined_images_keep_their_reason(image_results: tuple[pa.Table, pa.Table, validate.DatasetReport]) -> None:
    _, quarantine, _ = image_results
    errors = {r["record_id"]: r["ingest_error"] for r in quarantine.to_pylist()}
    assert "truncated" in errors["0/truncated.jpg"].lower()
    assert "escapes the data folder" in errors["1/escape.png"]
    assert errors["stray.png"].startswith("not inside a class sub-folder")


def test_stage_fails_naming_expectation_and_counts_over_the_ratio(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    params = section(tiny_params, "ingest")
    ingest.ingest(ingest.IngestConfig.from_params(params), raw_dir)
    table = pq.read_table(raw_dir / "text.parquet")
    references = table.column("reference").to_pylist()
    for i in range(0, len(references), 4):  # 25 % blank references
        references[i] = ""
    pq.write_table(table.set_column(2, "reference", pa.array(references, pa.string())), raw_dir / "text.parquet")

    cfg = validate.ValidateConfig.from_params(section(tiny_params, "validate"))
    with pytest.raises(
        DataError,
        match=r"text: 40 of 160 rows quarantined \(25.0% > validate.max_quarantine_ratio=5.0%\); "
        r"failed expectations: expect_column_value_lengths_to_be_between\(reference\): 40 rows",
    ):
        validate.validate(cfg, raw_dir, tmp_path / "valid", tmp_path / "report", tmp_path / "quarantine")
    # The evidence is still there for the user to inspect.
    assert pq.read_table(tmp_path / "quarantine" / "text.parquet").num_rows == 40
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["datasets"]["text"]["rows_quarantined"] == 40
    assert (tmp_path / "report" / "docs" / "index.html").is_file()


def test_default_data_passes_and_writes_report_and_data_docs(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    ingest.ingest(ingest.IngestConfig.from_params(section(tiny_params, "ingest")), tmp_path / "raw")
    cfg = validate.ValidateConfig.from_params(section(tiny_params, "validate"))
    reports = validate.validate(cfg, tmp_path / "raw", tmp_path / "valid", tmp_path / "report", tmp_path / "quarantine")
    assert {name: r.rows_quarantined for name, r in reports.items()} == {"text": 0, "images": 0, "restore": 0}
    html = (tmp_path / "report" / "docs" / "index.html").read_text()
    assert "<html" in html.lower() and "text" in html
    assert any((tmp_path / "report" / "docs" / "validations").rglob("*.html"))


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("max_quarantine_ratio",), 1.5, "'validate.max_quarantine_ratio' = 1.5 is outside"),
        (("text", "min_reference_chars"), 10_000, "'validate.text.min_reference_chars' exceeds"),
        (("images", "labels"), "0-9", "'validate.images.labels' must be a non-empty list or null"),
        (("restore", "max_size"), 1, "'validate.restore.max_size' = 1 is outside"),
    ],
)
def test_invalid_validate_params_name_the_key(
    tiny_params: dict[str, Any], path: tuple[str, ...], value: Any, message: str
) -> None:
    params = section(tiny_params, "validate")
    target = params
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        validate.ValidateConfig.from_params(params)


def test_a_split_that_names_no_split_is_quarantined(cfg: validate.ValidateConfig, tmp_path: Path) -> None:
    # Ingest turns a user's split value into train / val / test; anything else reaching validate is refused.
    raw = text_table([GOOD, GOOD, GOOD], ids=["a", "b", "c"], splits=["train", "holdout", None])
    valid, quarantine, report = run("text", raw, validate.text_expectations(cfg.text), tmp_path)
    check_accounting(valid, quarantine, report, 3)
    assert quarantined_reason(quarantine, "b") == "expect_column_values_to_be_in_set(given_split)"
    assert valid.column("record_id").to_pylist() == ["a", "c"]
