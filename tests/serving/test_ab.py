"""Online A/B on a running service: a sticky split at the configured share, the variant in every response
and log row, feedback validated and stored, and shadow mode that answers with the champion only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest

from serving.promoted import FAMILIES, SHADOW, SPLIT, challenge
from tests.conftest import REPO_ROOT
from tests.serving.conftest import Server, receipt, service_env, start_server, stop_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def challenger_models(bento_home: Path, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny models again, with one file more: other content hashes, so other tags in the same store."""
    root = tmp_path_factory.mktemp("challenger")
    for family in FAMILIES:
        shutil.copytree(tiny_models / family, root / family)
        (root / family / "NOTE.txt").write_text("the challenger")
    command = [sys.executable, "-m", "serving.package", *(str(root / f) for f in FAMILIES),
               "--out", str(root / "receipt.json")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(bento_home), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    models = json.loads((root / "receipt.json").read_text())["models"]
    assert models != receipt(bento_home)["models"]
    return models


def ab_server(bento_home: Path, challenger_models: dict[str, str], folder: Path, mode: str, share: float) -> Server:
    record = folder / "promoted.json"
    shutil.copy(bento_home / "promoted.json", record)
    challenge(record, challenger_models, None, share, mode, "tests", "a test of the A/B split")
    return start_server(bento_home, folder / "log", AIGC_PROMOTED=str(record))


@pytest.fixture(scope="module")
def split_server(
    bento_home: Path, challenger_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = ab_server(bento_home, challenger_models, tmp_path_factory.mktemp("split"), SPLIT, 0.5)
    yield server
    stop_server(server)


def image(server: Server, **headers: str) -> httpx.Response:
    body = {"label": "1", "generator": "gan"}  # the GAN's tags are compared (the default is whichever FID is lower)
    response = httpx.post(f"{server.url}/generate_image", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response


def logged(server: Server, prefix: str, want: int) -> list[dict[str, Any]]:
    deadline, rows = time.monotonic() + 15, []
    while time.monotonic() < deadline and len(rows) < want:
        rows = [r for p in server.log_dir.glob(f"{prefix}-*.parquet") for r in pq.read_table(p).to_pylist()]
        time.sleep(0.3)
    return rows


def test_the_split_is_sticky_at_its_share_and_says_its_variant(
    split_server: Server, challenger_models: dict[str, str], bento_home: Path
) -> None:
    tags = {"champion": receipt(bento_home)["models"]["image"], "challenger": challenger_models["image"]}
    seen: dict[str, str] = {}
    for client in range(400):
        response = image(split_server, **{"x-client-key": f"client-{client}"})
        variant = response.headers["x-variant"]
        assert response.headers["x-model-tag"] == tags[variant]  # the variant's own model answered
        seen[f"client-{client}"] = variant
    share = sum(v == "challenger" for v in seen.values()) / len(seen)
    assert 0.4 <= share <= 0.6
    for client in list(seen)[:25]:  # sticky: a client keeps its variant
        assert image(split_server, **{"x-client-key": client}).headers["x-variant"] == seen[client]
    rows = logged(split_server, "requests", 425)
    assert {r["variant"] for r in rows if r["endpoint"] == "generate_image"} == {"champion", "challenger"}


def test_feedback_is_validated_and_stored_with_the_variant(split_server: Server) -> None:
    url = f"{split_server.url}/feedback"
    unknown = httpx.post(url, json={"request_id": "no-such-request", "click": True}, timeout=30)
    assert unknown.status_code == 400 and "request_id" in unknown.text
    answered = image(split_server, **{"x-client-key": "feedback-client"})
    request_id, variant = answered.headers["x-request-id"], answered.headers["x-variant"]
    assert httpx.post(url, json={"request_id": request_id}, timeout=30).status_code == 400  # no signal at all
    assert httpx.post(url, json={"request_id": request_id, "rating": 9}, timeout=30).status_code == 400
    no_edit = httpx.post(url, json={"request_id": request_id, "edited_text": "an image has no text"}, timeout=30)
    assert no_edit.status_code == 400 and "edited_text" in no_edit.text
    stored = httpx.post(url, json={"request_id": request_id, "click": True, "rating": 4}, timeout=30)
    assert stored.status_code == 200 and stored.json() == {"request_id": request_id, "variant": variant, "stored": True}
    text = httpx.post(f"{split_server.url}/generate_text", json={"prompt": "name: Orla", "max_new_tokens": 6}, timeout=60)
    edit = httpx.post(url, json={"request_id": text.headers["x-request-id"], "edited_text": "Meet  the Orla."}, timeout=30)
    assert edit.status_code == 200
    rows = {r["request_id"]: r for r in logged(split_server, "feedback", 2)}
    assert rows[request_id]["click"] is True and rows[request_id]["rating"] == 4 and rows[request_id]["variant"] == variant
    edited = rows[text.headers["x-request-id"]]
    assert edited["edited_text"] == "Meet the Orla." and edited["source"] == "name: Orla"


def test_shadow_mode_answers_with_the_champion_and_logs_the_challenger(
    bento_home: Path, challenger_models: dict[str, str], tmp_path: Path
) -> None:
    server = ab_server(bento_home, challenger_models, tmp_path, SHADOW, 0.0)
    try:
        answered = image(server, **{"x-client-key": "anyone"})
        assert answered.headers["x-variant"] == "champion"
        request_id = answered.headers["x-request-id"]
        rows = {r["request_id"]: r for r in logged(server, "requests", 2)}
        shadow = rows[f"{request_id}-shadow"]
        assert shadow["variant"] == "shadow" and shadow["model_tag"] == challenger_models["image"] and shadow["status"] == 200
    finally:
        stop_server(server)


def test_a_shadow_challenger_without_the_asked_generator_is_not_asked(
    bento_home: Path, challenger_models: dict[str, str], tmp_path: Path
) -> None:
    """A challenger packaged before diffusion models has none: a diffusion request is answered by the champion
    and shadowed by nobody (a shadow call it cannot answer would fail the batch it joins)."""
    older = {family: tag for family, tag in challenger_models.items() if family != "diffusion"}
    server = ab_server(bento_home, older, tmp_path, SHADOW, 0.0)
    try:
        asked = {"label": "1", "generator": "diffusion"}
        answered = httpx.post(f"{server.url}/generate_image", json=asked, timeout=60)
        assert answered.status_code == 200 and answered.headers["x-model-tag"] == receipt(bento_home)["models"]["diffusion"]
        gan = image(server)  # the GAN's shadow still runs
        rows = {r["request_id"]: r for r in logged(server, "requests", 4)}  # waits out a wrong fourth row
        assert rows[f"{gan.headers['x-request-id']}-shadow"]["model_tag"] == older["image"]
        assert f"{answered.headers['x-request-id']}-shadow" not in rows
    finally:
        stop_server(server)


def test_an_ab_test_of_the_compressed_copies_against_the_fp32_champion(bento_home: Path, tmp_path: Path) -> None:
    packaged, record = receipt(bento_home), tmp_path / "promoted.json"
    shutil.copy(bento_home / "promoted.json", record)
    command = [sys.executable, "-m", "monitoring.promote", "--receipt", str(bento_home / "receipt.json"), "--record",
               str(record), "--challenger", "--compressed", "--share", "0.5", "--why", "int8 on CPU boxes?"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(bento_home), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(record.read_text())["ab"]["models"] == packaged["compressed"]
    server = start_server(bento_home, tmp_path / "log", AIGC_PROMOTED=str(record))
    try:
        tags = {"champion": packaged["models"]["text"], "challenger": packaged["compressed"]["text"]}
        seen = set()
        for client in range(40):
            response = httpx.post(f"{server.url}/generate_text", json={"prompt": "a lamp"}, timeout=60,
                                  headers={"x-client-key": f"client-{client}"})  # fmt: skip
            assert response.status_code == 200, response.text
            assert response.headers["x-model-tag"] == tags[response.headers["x-variant"]]
            seen.add(response.headers["x-variant"])
        assert seen == {"champion", "challenger"}
    finally:
        stop_server(server)
