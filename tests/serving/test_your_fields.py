"""A service whose text model was trained on `key[value]` records: its `record` is the data's own fields."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from components.records import BRACKET
from tests.conftest import REPO_ROOT, run_data_stages, section, shrink
from tests.serving.conftest import Server, promote, service_env, start_server, stop_server
from tests.user_data import corpus, write_text

pytestmark = pytest.mark.slow
OWN_RECORD = {"venue": "Blue Spoon 3", "cuisine": "Thai", "area": "riverside", "price range": "cheap"}


@pytest.fixture(scope="module")
def bracket_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]) -> Iterator[Server]:
    """The tiny pipeline on a bracket corpus up to its text model, packaged with the tiny image and restore
    models into a store of its own, and served."""
    from components import augment, features, train_text

    root = tmp_path_factory.mktemp("bracket")
    tiny = shrink(real_params)
    tiny["ingest"]["text"].update(path=str(write_text(corpus(BRACKET), "csv", root / "corpus", BRACKET)))
    tiny["ingest"]["text"].update(source_column="mr", reference_column="ref")
    clean_dir = run_data_stages(tiny, root)
    augment.augment(augment.AugmentConfig.from_params(section(tiny, "augment")), clean_dir, root / "augmented")
    features.features(features.FeaturesConfig.from_params(section(tiny, "features")), clean_dir, root / "augmented", root / "f")
    config = train_text.TrainTextConfig.from_params(section(tiny, "train_text"))
    train_text.train_text(config, root / "f" / "text", root / "text", root / "ckpt")
    home = root / "bentoml"
    folders = [str(root / "text"), str(tiny_models / "image"), str(tiny_models / "restore"), str(tiny_models / "diffusion")]
    command = [sys.executable, "-m", "serving.package", *folders, "--out", str(home / "receipt.json")]
    run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(home), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    promote(home)
    server = start_server(home, root / "log")
    yield server
    stop_server(server)


def test_the_record_takes_the_datas_own_fields(bracket_server: Server) -> None:
    response = httpx.post(f"{bracket_server.url}/generate_text", json={"record": OWN_RECORD, "max_new_tokens": 16}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["text"] is not None


@pytest.mark.parametrize("field", ["colour", "name", "sku"])
def test_the_demos_fields_and_unknown_ones_are_400_naming_the_field(bracket_server: Server, field: str) -> None:
    response = httpx.post(f"{bracket_server.url}/generate_text", json={"record": {**OWN_RECORD, field: "x"}}, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.text


def test_openapi_shows_the_datas_fields(bracket_server: Server) -> None:
    spec = httpx.get(f"{bracket_server.url}/docs.json", timeout=30).json()
    record = spec["components"]["schemas"]["TextRecord"]
    assert set(record["properties"]) == {"venue", "cuisine", "area", "price range", "note"}
    assert "categorical" in record["properties"]["cuisine"]["description"]
    assert "free text" in record["properties"]["venue"]["description"]


def test_the_request_log_holds_the_categorical_fields_only(bracket_server: Server) -> None:
    httpx.post(f"{bracket_server.url}/generate_text", json={"record": OWN_RECORD, "max_new_tokens": 16}, timeout=60)
    deadline, rows = time.monotonic() + 10, []
    while time.monotonic() < deadline and not rows:
        rows = [r for p in sorted(bracket_server.log_dir.glob("requests-*.parquet")) for r in pq.read_table(p).to_pylist()]
        time.sleep(0.2)
    row = next(r for r in rows if r["endpoint"] == "generate_text")
    assert row["attr_cuisine"] == "Thai" and row["attr_price range"] == "cheap"
    assert "attr_venue" not in row and "Blue Spoon" not in json.dumps(rows, default=str)
