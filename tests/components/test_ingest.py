"""Ingest: every input format, streaming, and whole-file errors that must stop the stage with a clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components import datasets, ingest, validate
from components.common import EX_CONFIG, ConfigError, DataError, load_params
from tests.conftest import section, write_params


def text_cfg(tiny_params: dict[str, Any], path: Path | None, **text: Any) -> ingest.IngestConfig:
    params = section(tiny_params, "ingest")
    params["text"] = {**params["text"], "path": str(path) if path else None, **text}
    return ingest.IngestConfig.from_params(params)


def ingest_text(cfg: ingest.IngestConfig, out: Path) -> pa.Table:
    ingest.ingest_dataset(ingest.text_batches(cfg), datasets.TEXT_SCHEMA, out, "text")
    return pq.read_table(out)


def test_generated_default_streams_every_record(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    table = ingest_text(text_cfg(tiny_params, None), tmp_path / "text.parquet")
    assert table.num_rows == 80 * 2
    assert table.column("ingest_error").null_count == table.num_rows
    assert len(set(table.column("record_id").to_pylist())) == table.num_rows


def test_csv_jsonl_and_parquet_folder_with_custom_columns(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    (folder / "a.csv").write_text('prompt,copy\n"name: A | colour: red","Red A, with a comma"\nx,y\n', encoding="utf-8")
    (folder / "more" / "b.jsonl").write_text(
        json.dumps({"prompt": {"name": "B", "colour": "blue"}, "copy": "Blue B."})
        + "\n"
        + json.dumps({"prompt": "p", "copy": 3})
        + "\n",
        encoding="utf-8",
    )
    pq.write_table(pa.table({"prompt": ["c"], "copy": ["C!"], "other": [1]}), folder / "c.parquet")
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    table = ingest_text(text_cfg(tiny_params, folder, source_column="prompt", reference_column="copy"), tmp_path / "t.parquet")

    rows = table.to_pylist()
    assert [r["source"] for r in rows] == [
        "name: A | colour: red",
        "x",
        "c",
        '{"name": "B", "colour": "blue"}',
        "p",
    ]  # a JSON object stays JSON
    assert rows[0]["reference"] == "Red A, with a comma" and rows[4]["reference"] == "3"
    assert {r["origin"] for r in rows} == {"a.csv", "c.parquet", "more/b.jsonl"}
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # source untouched


def test_id_column_is_used_for_record_ids(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("id,source,reference\nk1,s,r\nk2,s,r2\n", encoding="utf-8")
    table = ingest_text(text_cfg(tiny_params, tmp_path / "a.csv", id_column="id"), tmp_path / "t.parquet")
    assert table.column("record_id").to_pylist() == ["a.csv#k1", "a.csv#k2"]


def test_wrong_columns_name_the_missing_column_and_what_the_file_has(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt,text\nx,y\n", encoding="utf-8")
    out = tmp_path / "t.parquet"
    with pytest.raises(DataError, match=r"missing source column 'source', reference column 'reference'.*\['prompt', 'text'\]"):
        ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), out)
    assert not out.exists()


def test_wrong_columns_in_parquet(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    pq.write_table(pa.table({"source": ["s"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="missing reference column 'reference'"):
        ingest_text(text_cfg(tiny_params, tmp_path / "a.parquet"), tmp_path / "t.parquet")


def test_wrong_columns_in_jsonl(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    lines = [json.dumps({"source": f"s{i}", "text": "t"}) for i in range(100)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "t.parquet"
    with pytest.raises(DataError, match=r"missing reference column 'reference'; the file has columns \['source', 'text'\]"):
        ingest_text(text_cfg(tiny_params, tmp_path / "a.jsonl"), out)
    assert not out.exists()  # the batches already streamed are not left behind


def test_empty_file_is_a_clear_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"")
    with pytest.raises(DataError, match="a.csv: the file is empty"):
        ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "t.parquet")


def test_header_only_is_a_clear_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("source,reference\n", encoding="utf-8")
    with pytest.raises(DataError, match="header but no rows"):
        ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "t.parquet")


def test_folder_without_text_files_is_a_clear_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="no .csv, .jsonl or .parquet files"):
        ingest_text(text_cfg(tiny_params, tmp_path), tmp_path / "t.parquet")


def test_invalid_utf8_row_is_kept_with_its_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"source,reference\ngood,fine\nbad,caf\xe9 au lait\n")
    table = ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "t.parquet")
    assert table.num_rows == 2
    errors = table.column("ingest_error").to_pylist()
    assert errors[0] is None
    assert "invalid UTF-8 in column 'reference'" in errors[1]
    assert table.column("reference").to_pylist()[1] == "caf\ufffd au lait"


def test_malformed_csv_rows_are_kept_with_their_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('source,reference\ns1,r1\n"s2",r2,extra\ns3\ns4,r4\n', encoding="utf-8")
    table = ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "t.parquet")
    assert table.num_rows == 4  # nothing lost: two good rows and two malformed ones
    rows = {r["source"]: r["ingest_error"] for r in table.to_pylist()}
    assert rows["s1"] is None and rows["s4"] is None
    assert rows['"s2",r2,extra'] == "malformed CSV row: 3 fields, the header has 2"
    assert rows["s3"] == "malformed CSV row: 1 fields, the header has 2"


def test_malformed_jsonl_line_is_kept_with_its_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'{"source": "s", "reference": "r"}\n{not json\n')
    table = ingest_text(text_cfg(tiny_params, tmp_path / "a.jsonl"), tmp_path / "t.parquet")
    assert table.num_rows == 2
    assert "invalid JSON on line 2" in table.column("ingest_error").to_pylist()[1]


def test_only_empty_csv_cells_become_nulls(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text('source,reference\ns1,NaN\ns2,\n,r3\ns4,""\n', encoding="utf-8")
    table = ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "t.parquet")
    assert table.column("reference").to_pylist() == ["NaN", None, "r3", None]
    assert table.column("source").to_pylist() == ["s1", "s2", None, "s4"]


@pytest.mark.parametrize("text", ["NULL", "NaN", "NA", "n/a", "N/A", "None", "null", "nan", "#N/A", "-NaN"])
def test_na_like_strings_in_a_csv_are_kept_as_text(tiny_params: dict[str, Any], tmp_path: Path, text: str) -> None:
    # Issue 15: pandas' / Arrow's default NA list turned a reference that reads "NULL" into a null (quarantined).
    (tmp_path / "a.csv").write_text(f"id,source,reference\n{text},{text},{text}\n", encoding="utf-8")
    row = ingest_text(text_cfg(tiny_params, tmp_path / "a.csv", id_column="id"), tmp_path / "t.parquet").to_pylist()[0]
    assert (row["record_id"], row["source"], row["reference"], row["ingest_error"]) == (f"a.csv#{text}", text, text, None)


def test_na_like_references_pass_validation_and_an_empty_one_is_quarantined(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("source,reference\ns1,NULL\ns2,NaN\ns3,NA\ns4,\ns5,fine\n", encoding="utf-8")
    ingest_text(text_cfg(tiny_params, tmp_path / "a.csv"), tmp_path / "raw.parquet")
    cfg = validate.ValidateConfig.from_params(section(tiny_params, "validate"))
    report = validate.validate_dataset(
        "text", tmp_path / "raw.parquet", validate.text_expectations(cfg.text), validate.SuiteRunner(tmp_path / "docs"),
        tmp_path / "valid.parquet", tmp_path / "quarantine.parquet", chunk_rows=100,
        derive=validate.text_derived_columns(cfg.text),
    )  # fmt: skip
    valid = pq.read_table(tmp_path / "valid.parquet").to_pylist()
    quarantine = pq.read_table(tmp_path / "quarantine.parquet").to_pylist()
    assert [(r["source"], r["reference"]) for r in valid] == [("s1", "NULL"), ("s2", "NaN"), ("s3", "NA"), ("s5", "fine")]
    assert [r["source"] for r in quarantine] == ["s4"] and report.rows_quarantined == 1
    assert "expect_column_values_to_not_be_null(reference)" in quarantine[0]["failed_expectations"]


def test_text_symlink_escaping_the_folder_is_recorded_not_read(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "secret.csv"
    outside.write_text("source,reference\nsecret,secret\n", encoding="utf-8")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.csv").write_text("source,reference\ns,r\n", encoding="utf-8")
    (folder / "link.csv").symlink_to(outside)
    table = ingest_text(text_cfg(tiny_params, folder), tmp_path / "t.parquet")
    rows = {r["origin"]: r for r in table.to_pylist()}
    assert "path escapes the data folder" in rows["link.csv"]["ingest_error"]
    assert rows["link.csv"]["source"] is None  # nothing from outside was read
    assert rows["ok.csv"]["ingest_error"] is None


def test_builtin_images_are_digits_and_photos() -> None:
    digits = pa.Table.from_batches(list(datasets.builtin_digits(500)))
    assert digits.num_rows == 1797
    assert set(digits.column("label").to_pylist()) == {str(i) for i in range(10)}
    assert set(digits.column("mode").to_pylist()) == {"L"} and set(digits.column("width").to_pylist()) == {8}
    photos = pa.Table.from_batches(list(datasets.builtin_photos(4)))
    assert photos.num_rows == len(datasets.BUILTIN_PHOTOS)
    assert photos.column("ingest_error").null_count == photos.num_rows
    assert min(photos.column("width").to_pylist()) >= 256


def test_invalid_params_fail_before_anything_is_deleted(
    tiny_params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "text.parquet").write_bytes(b"previous run")
    tiny_params["ingest"]["text"]["num_records"] = "many"
    params = write_params(tiny_params, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_info:
        ingest.main([str(out), "--params", str(params)])
    assert exit_info.value.code == EX_CONFIG
    assert (out / "text.parquet").read_bytes() == b"previous run"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num_records", 0, "'ingest.text.num_records' = 0 is outside"),
        ("refs_per_record", True, "'ingest.text.refs_per_record' must be an integer"),
        ("path", "/no/such/folder", "'ingest.text.path': /no/such/folder does not exist"),
    ],
)
def test_each_invalid_value_names_its_key(tiny_params: dict[str, Any], key: str, value: Any, message: str) -> None:
    params = section(tiny_params, "ingest")
    params["text"][key] = value
    with pytest.raises(ConfigError, match=message):
        ingest.IngestConfig.from_params(params)


def test_missing_section_names_it(tmp_path: Path) -> None:
    path = write_params({"base": {"seed": 1}}, tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="no section 'ingest'"):
        load_params("ingest", path)


def test_landed_snapshots_are_read_and_the_landing_folder_is_not(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    landed = tmp_path / "landed"
    (landed / "b2" / "text").mkdir(parents=True)
    (landed / "b2" / "text" / "c1.csv").write_text("source,reference\nname: Nova | colour: teal,Nova in teal.\n")
    (landed / "a1" / "images" / "7").mkdir(parents=True)
    Image.new("L", (8, 8), 200).save(landed / "a1" / "images" / "7" / "d4.png")
    (landed / "a1" / "manifest.json").write_text("{}", encoding="utf-8")
    landing = tmp_path / "landing" / "text"  # not snapshotted: never read
    landing.mkdir(parents=True)
    (landing / "new.csv").write_text("source,reference\nname: Vega,Vega.\n", encoding="utf-8")
    params = section(tiny_params, "ingest")
    params.update(landed=str(landed), landing=str(tmp_path / "landing"))
    cfg = ingest.IngestConfig.from_params(params)
    counts = ingest.ingest(cfg, tmp_path / "raw")
    assert counts["text"]["rows"] == 80 * 2 + 1 and counts["images"]["rows"] == 1797 + 1
    text = pq.read_table(tmp_path / "raw" / "text.parquet").to_pylist()
    from_snapshots = [r for r in text if r["record_id"].startswith("landed/")]
    assert [(r["record_id"].split("/")[1], r["source"], r["reference"]) for r in from_snapshots] == [
        ("b2", "name: Nova | colour: teal", "Nova in teal.")
    ]
    images = pq.read_table(tmp_path / "raw" / "images.parquet").to_pylist()
    assert [(r["record_id"], r["label"]) for r in images if r["record_id"].startswith("landed/")] == [("landed/a1/7/d4.png", "7")]
    assert counts["restore"]["rows"] == 10  # nothing landed for restore: the inputs alone


def test_a_missing_landed_folder_is_a_config_error(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    params = section(tiny_params, "ingest")
    params["landed"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="'ingest.landed'"):
        ingest.IngestConfig.from_params(params)
