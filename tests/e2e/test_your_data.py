"""The conformance matrix: the whole `dvc repro` on data of several shapes the tests build themselves.

Each case points `params.yaml` at its own corpus (CSV / JSONL / Parquet; `key: value |`, `key[value]`, JSON
and free-prompt sources; several references per source), its own image class folders (greyscale 16x16 PNG
or RGB 48x48 JPEG, classes of uneven size) and its own photographs (one, or several greyscale ones), with
augmentation on or off, and runs the real pipeline to the packaged Bento. Nothing here uses the demo data.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from components.records import BRACKET, JSON, PIPE, PROMPT, parse_source
from tests.conftest import STAGES, copy_repo, shrink, venv_env
from tests.user_data import corpus, write_image_classes, write_photos, write_text


@dataclass(frozen=True)
class Case:
    syntax: str  # a components.records syntax, or PROMPT
    text_format: str  # csv | jsonl | parquet
    images: str  # grey16 | rgb48
    photos: str  # tests.user_data.PHOTO_KINDS
    augment: bool


def case_params(params: dict[str, Any], case: Case, data: Path) -> tuple[dict[str, Any], dict[str, int]]:
    tiny = shrink(params)
    rows = corpus(case.syntax)
    text = write_text(rows, case.text_format, data / "text", case.syntax)
    images, n_images = write_image_classes(case.images, data / "images")
    photos, n_photos = write_photos(case.photos, data / "photos")
    tiny["ingest"]["text"].update(path=str(text), source_column="mr", reference_column="ref")
    tiny["ingest"]["images"]["path"] = str(images)
    tiny["ingest"]["restore"]["path"] = str(photos)
    tiny["augment"]["enabled"] = case.augment
    tiny["evaluate_image"].update(kid_subset_size=4)
    return tiny, {"text": len(rows), "images": n_images, "restore": n_photos}


def run_repro(repo: Path) -> subprocess.CompletedProcess[str]:
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml")}
    return subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def openapi_record_fields(repo: Path) -> set[str] | None:
    """The `record` fields of the packaged service's OpenAPI spec (None when it has no `record`)."""
    receipt = json.loads((repo / "models" / "bento.json").read_text())
    code = "import json; from serving.service import Gateway; print(json.dumps(Gateway.openapi_spec.asdict()))"
    served = {f"AIGC_{family.upper()}_MODEL": tag for family, tag in receipt["models"].items()}
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml"), **served}
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    spec = json.loads(out.stdout.strip().splitlines()[-1])
    body = spec["paths"]["/generate_text"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "record" not in body["properties"]:
        return None
    ref = json.dumps(body["properties"]["record"])
    (record_name,) = [name for name in spec["components"]["schemas"] if f'"#/components/schemas/{name}"' in ref]
    return set(spec["components"]["schemas"][record_name]["properties"])


def check_case(repo: Path, case: Case, rows_in: dict[str, int], result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout, stage
    assert "Traceback" not in result.stdout + result.stderr

    for metrics in ("data", "text", "image", "diffusion", "restore"):
        assert (repo / "metrics" / f"{metrics}.json").is_file(), metrics
    data = json.loads((repo / "metrics" / "data.json").read_text())
    for name, count in rows_in.items():
        numbers = data[name]
        assert numbers["rows_in"] == count, name
        # Every row is accounted for: kept, quarantined or removed (with its reason) by clean.
        out = numbers["rows_clean"] + numbers["rows_quarantined"] + numbers["duplicates_removed"] + numbers["emptied_by_cleaning"]
        assert out == count, (name, numbers)
    assert data["restore"]["split_by"] == ("band" if case.photos.startswith("one") else "image")

    schema = json.loads((repo / "data" / "features" / "text" / "schema.json").read_text())
    assert schema == json.loads((repo / "models" / "text" / "schema.json").read_text())  # travels with the model
    assert schema["syntax"] == case.syntax
    expected_keys = set() if case.syntax == PROMPT else {"venue", "cuisine", "area", "price range", "note"}
    assert set(schema["keys"]) == expected_keys
    if expected_keys:
        kinds = {key: entry["kind"] for key, entry in schema["keys"].items()}
        assert kinds["venue"] == "free_text" and kinds["cuisine"] == kinds["area"] == "categorical"
    augmented = pq.read_table(repo / "data" / "augmented" / "text.parquet")
    assert (augmented.num_rows > 0) == (case.augment and case.syntax != PROMPT)
    for source in augmented.column("source").to_pylist():
        record = parse_source(source)
        assert record is not None and record.syntax == case.syntax

    restore = json.loads((repo / "metrics" / "restore.json").read_text())
    assert restore["layout"] == ("greyscale" if case.photos in ("many", "one-grey") else "rgb")
    image_meta = json.loads((repo / "data" / "features" / "images" / "meta.json").read_text())
    assert image_meta["label_names"] == ["eel", "fox", "owl"]
    assert image_meta["channels"] == (1 if case.images == "grey16" else 3)

    fields = openapi_record_fields(repo)
    assert fields == (None if case.syntax == PROMPT else expected_keys)


CASES = {
    "pipe-csv-grey16-one-photo-augmented": Case(PIPE, "csv", "grey16", "one", True),
    "bracket-jsonl-rgb48-rgb-photos-plain": Case(BRACKET, "jsonl", "rgb48", "many-rgb", False),
    "json-jsonl-grey16-grey-photos-augmented": Case(JSON, "jsonl", "grey16", "many", True),
    "prompt-parquet-rgb48-one-grey-photo-augmented": Case(PROMPT, "parquet", "rgb48", "one-grey", True),
}
# Every syntax, file format, image set and photo set is in at least one case, and each case costs a full
# `dvc repro`: four cases, one per syntax, carry the formats and image and photo sets between them.


CONCURRENT_CASES = 2
"""Case pipelines run at once. A stage is mostly one core's work (starting Python, importing torch and the
libraries, small tensors), so two pipelines on CI's two cores take little longer than one."""


@dataclass
class CaseRun:
    repo: Path
    rows_in: dict[str, int]
    repro: Future[subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def case_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]
) -> Iterator[dict[str, CaseRun]]:
    """The `dvc repro` of every selected case, started together, CONCURRENT_CASES at a time; each case's test
    waits for its own. Every case has its own data, repository and BentoML store."""
    selected = [
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_dvc_repro_runs_end_to_end_on_the_users_data" and hasattr(item, "callspec")
    ]
    pool = ThreadPoolExecutor(CONCURRENT_CASES)
    runs = {}
    for name in selected:
        root = tmp_path_factory.mktemp(name)
        params, rows_in = case_params(real_params, CASES[name], root / "data")
        repo = copy_repo(root / "repo", params)
        runs[name] = CaseRun(repo, rows_in, pool.submit(run_repro, repo))
    yield runs
    pool.shutdown(cancel_futures=True)


@pytest.mark.parametrize("name", list(CASES))
def test_dvc_repro_runs_end_to_end_on_the_users_data(name: str, case_runs: dict[str, CaseRun]) -> None:
    run = case_runs[name]
    check_case(run.repo, CASES[name], run.rows_in, run.repro.result())


def bad_column(params: dict[str, Any], data: Path) -> None:
    params["ingest"]["text"]["source_column"] = "meaning_representation"


def empty_image_folder(params: dict[str, Any], data: Path) -> None:
    (data / "nothing").mkdir()
    params["ingest"]["images"]["path"] = str(data / "nothing")


def missing_photo_folder(params: dict[str, Any], data: Path) -> None:
    params["ingest"]["restore"]["path"] = str(data / "no-such-folder")


def tiny_single_photo(params: dict[str, Any], data: Path) -> None:
    params["validate"]["restore"]["min_size"] = 8
    for photo in (data / "photos").iterdir():
        photo.unlink()
    from PIL import Image

    Image.new("RGB", (40, 30), (90, 120, 150)).save(data / "photos" / "small.png")


@pytest.mark.parametrize(
    ("breakage", "stage", "message"),
    [
        (bad_column, "ingest", "source column 'meaning_representation'"),
        (empty_image_folder, "ingest", "no .png / .jpg / .jpeg images found"),
        (missing_photo_folder, "ingest", "no-such-folder"),
        (tiny_single_photo, "clean", "too small to cut into train and test bands"),
    ],
    ids=["missing-column", "no-images", "no-photo-folder", "photo-too-small"],
)
def test_a_users_mistake_is_one_clear_line_naming_the_stage(
    breakage: Any, stage: str, message: str, tmp_path: Path, real_params: dict[str, Any]
) -> None:
    params, _ = case_params(real_params, Case(BRACKET, "csv", "grey16", "one", True), tmp_path / "data")
    breakage(params, tmp_path / "data")
    repo = copy_repo(tmp_path / "repo", params)
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml")}
    run = subprocess.run(["dvc", "repro", stage], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert message in output and f"failed to reproduce '{stage}'" in output
    assert "Traceback" not in output


def test_a_malformed_csv_row_is_quarantined_and_the_rest_runs(tmp_path: Path, real_params: dict[str, Any]) -> None:
    params, _ = case_params(real_params, Case(BRACKET, "csv", "grey16", "many", True), tmp_path / "data")
    with (tmp_path / "data" / "text" / "corpus.csv").open("a", encoding="utf-8") as fh:
        fh.write('"name[Broken]","Too many fields.",extra\n')
    repo = copy_repo(tmp_path / "repo", params)
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml")}
    run = subprocess.run(["dvc", "repro", "clean"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    quarantined = pq.read_table(repo / "data" / "quarantine" / "text.parquet").to_pylist()
    assert [r["ingest_error"] for r in quarantined] == ["malformed CSV row: 3 fields, the header has 2"]
    assert quarantined[0]["source"] == '"name[Broken]","Too many fields.",extra'  # kept whole, not lost
    data = json.loads((repo / "metrics" / "data.json").read_text())["text"]
    assert data["rows_in"] == 121 and data["rows_quarantined"] == 1


def test_the_users_split_files_and_split_column_are_kept_row_by_row(tmp_path: Path, real_params: dict[str, Any]) -> None:
    params, _ = case_params(real_params, Case(BRACKET, "csv", "grey16", "many", True), tmp_path / "data")
    rows = corpus(BRACKET, records=60)
    files = {}
    for split, part in (("train", rows[:80]), ("dev", rows[80:100]), ("test", rows[100:])):
        files[split] = str(write_text(part, "csv", tmp_path / "data" / split, BRACKET) / "corpus.csv")
    params["ingest"]["text"].update(path=None, split_files=files)
    repo = copy_repo(tmp_path / "repo", params)
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml")}
    run = subprocess.run(["dvc", "repro", "clean"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    kept = pq.read_table(repo / "data" / "clean" / "text.parquet").to_pylist()
    assert len(kept) == len(rows)
    assert all(row["split"] == row["record_id"].split("/")[0] for row in kept)  # the dev file's: "val/corpus.csv:3"
    data = json.loads((repo / "metrics" / "data.json").read_text())["text"]
    assert data["split_by"] == "given" and data["splits"] == {"train": 80, "val": 20, "test": 20}

    # The same rows in one file with a split column; a row naming no split is quarantined with the reason.
    column_rows = [(s, r, ["train", "validation", "Test"][i % 3]) for i, (s, r) in enumerate(rows)]
    column_rows[5] = (column_rows[5][0], column_rows[5][1], "holdout")
    folder = tmp_path / "data" / "with_column"
    folder.mkdir()
    with (folder / "corpus.csv").open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("mr", "ref", "part"), *column_rows])
    params["ingest"]["text"].update(path=str(folder), split_files=None, split_column="part")
    repo = copy_repo(tmp_path / "repo2", params)
    run = subprocess.run(["dvc", "repro", "clean"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    quarantined = pq.read_table(repo / "data" / "quarantine" / "text.parquet").to_pylist()
    assert [q["ingest_error"] for q in quarantined] == ["split column 'part' has 'holdout'; use train, val or test"]
    kept = pq.read_table(repo / "data" / "clean" / "text.parquet").to_pylist()
    wanted = {"train": "train", "validation": "val", "Test": "test"}
    lines = {f"corpus.csv:{i + 1}": wanted.get(split) for i, (_, _, split) in enumerate(column_rows)}
    assert all(row["split"] == lines[row["record_id"]] for row in kept)
    # A train row whose source the user put in val or test is set aside, so held-out sources stay unseen.
    held_out = {source for source, _, split in column_rows if wanted.get(split) in ("val", "test")}
    trained_copies = [i for i, (source, _, split) in enumerate(column_rows) if split == "train" and source in held_out]
    assert trained_copies and len(kept) == len(rows) - 1 - len(trained_copies)
    removed = pq.read_table(repo / "data" / "clean" / "removed" / "text.parquet").to_pylist()
    assert {r["record_id"] for r in removed} == {f"corpus.csv:{i + 1}" for i in trained_copies}


def test_split_params_that_contradict_each_other_are_one_clear_line(tmp_path: Path, real_params: dict[str, Any]) -> None:
    params, _ = case_params(real_params, Case(BRACKET, "csv", "grey16", "one", True), tmp_path / "data")
    params["ingest"]["text"]["split_files"] = {
        "train": params["ingest"]["text"]["path"],
        "test": params["ingest"]["text"]["path"],
    }
    repo = copy_repo(tmp_path / "repo", params)
    env = {**venv_env(), "BENTOML_HOME": str(repo / ".bentoml")}
    run = subprocess.run(["dvc", "repro", "ingest"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "Traceback" not in output
    assert "'ingest.text.path' and 'ingest.text.split_files' are both set: keep one" in output
