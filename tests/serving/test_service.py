"""The BentoML service over HTTP (`bentoml serve` on tiny models): valid requests, bad requests, auth,
provenance, determinism and the request log; plus the `package` stage that fills the model store."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.records import SCHEMA_FILE, categorical_keys
from serving.promoted import FAMILIES
from serving.request_log import log_schema
from tests.conftest import REPO_ROOT
from tests.serving.conftest import Server, receipt, service_env, start_server, stop_server

pytestmark = pytest.mark.slow
RECORD = {"name": "Aurora", "category": "lamp", "colour": "amber", "tone": "playful"}


def post(server: Server, api: str, **kwargs: object) -> httpx.Response:
    return httpx.post(f"{server.url}/{api}", timeout=60, **kwargs)  # type: ignore[arg-type]


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def upload(size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def error_text(response: httpx.Response) -> str:
    return json.dumps(response.json())


# --- packaging --------------------------------------------------------------------------------------------


def test_package_imports_labelled_models_and_builds_a_bento(bento_home: Path, tiny_models: Path) -> None:
    tags = receipt(bento_home)
    assert set(tags["models"]) == set(FAMILIES) and tags["bento"].startswith("aigc-pipeline:")
    restore = tags["models"]["restore"]
    import_check = f"import bentoml, json; m = bentoml.models.get({restore!r}); print(json.dumps(m.info.labels))"
    labels = json.loads(
        subprocess.run(
            [sys.executable, "-c", import_check], env=service_env(bento_home), capture_output=True, text=True, check=True
        ).stdout
    )
    assert {"params_hash", "data_hash", "git_revision", "content_hash", "psnr"} - {"psnr"} <= set(labels)
    again = subprocess.run(
        [sys.executable, "-m", "serving.package", *(str(tiny_models / f) for f in FAMILIES),
         "--out", str(bento_home / "again.json")],
        cwd=REPO_ROOT, env=service_env(bento_home), capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((bento_home / "again.json").read_text())["models"] == tags["models"]  # nothing re-imported


def test_two_package_runs_at_once_on_one_store_both_succeed(tiny_models: Path, tmp_path: Path) -> None:
    """Parallel experiments package into one store: the same content is the same tag, saved by whichever run
    gets there first, and the other run uses it instead of failing."""
    command = [sys.executable, "-m", "serving.package", *(str(tiny_models / f) for f in FAMILIES)]
    runs = [
        subprocess.Popen([*command, "--out", str(tmp_path / f"receipt-{i}.json")], cwd=REPO_ROOT,
                         env=service_env(tmp_path / "bentoml"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert json.loads((tmp_path / "receipt-0.json").read_text()) == json.loads((tmp_path / "receipt-1.json").read_text())


def test_package_refuses_a_folder_with_pickles(bento_home: Path, tiny_models: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "restore"
    shutil.copytree(tiny_models / "restore", bad)
    (bad / "extra.pt").write_bytes(b"pickle")
    run = subprocess.run(
        [sys.executable, "-m", "serving.package", str(tiny_models / "text"), str(tiny_models / "image"), str(bad),
         str(tiny_models / "diffusion"),
         "--out", str(tmp_path / "r.json")],
        cwd=REPO_ROOT, env=service_env(bento_home), capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 78 and "refusing to package pickle files ['extra.pt']" in run.stderr


# --- valid requests ---------------------------------------------------------------------------------------


def test_health_and_docs_are_served(server: Server) -> None:
    assert httpx.get(f"{server.url}/livez").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert httpx.get(f"{server.url}/").status_code == 200
    spec = httpx.get(f"{server.url}/docs.json").json()
    assert {"/generate_text", "/generate_image", "/restore_image"} <= set(spec["paths"])


def test_generate_text_from_a_record_and_from_a_prompt(server: Server) -> None:
    for body in ({"record": RECORD}, {"prompt": "name: Aurora | colour: amber"}):
        response = post(server, "generate_text", json=body)
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["text"], str)
        assert response.headers["x-model-tag"].startswith("aigc-text:")
        assert response.headers["x-seed"] == "0" and len(response.headers["x-params-hash"]) == 16


def test_sampled_text_is_reproducible_from_its_seed(server: Server) -> None:
    body = {"record": RECORD, "decoding": "nucleus", "temperature": 1.5, "seed": 11, "max_new_tokens": 12}
    first, second = (post(server, "generate_text", json=body).json()["text"] for _ in range(2))
    assert first == second


def test_generate_image_returns_pngs_with_provenance(server: Server) -> None:
    response = post(server, "generate_image", json={"label": "3", "n": 2, "seed": 5})
    assert response.status_code == 200, response.text
    images = [png(base64.b64decode(b)) for b in response.json()["images"]]
    assert len(images) == 2 and images[0].size == (16, 16)
    assert images[0].text["seed"] == "5" and images[0].text["label"] == "3"
    assert images[0].text["model"] == response.headers["x-model-tag"]
    again = post(server, "generate_image", json={"label": "3", "n": 2, "seed": 5}).json()["images"]
    assert again == response.json()["images"]  # same seed, same images


def test_generate_image_serves_either_generator_and_defaults_to_the_lower_fid(server: Server, bento_home: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    models, body = receipt(bento_home)["models"], {"label": "3", "n": 2, "seed": 5}
    answers, fids = {}, {}
    for kind, family in (("gan", "image"), ("diffusion", "diffusion")):
        response = post(server, "generate_image", json={**body, "generator": kind})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["generator"] == kind and answer["model"] == response.headers["x-model-tag"] == models[family]
        image = png(base64.b64decode(answer["images"][0]))
        assert image.text["generator"] == kind and image.text["model"] == models[family] and image.size == (16, 16)
        answers[kind] = answer["images"]
        # package labelled each model with the repository's metrics (the stage's --root): the default is the lower FID
        fids[kind] = json.loads((REPO_ROOT / "metrics" / f"{family}.json").read_text())["fid_domain"]
    assert answers["gan"] != answers["diffusion"]
    default = post(server, "generate_image", json=body).json()
    assert default["generator"] == min(fids, key=fids.__getitem__) and default["images"] == answers[default["generator"]]

    # Concurrent requests of both generators share batches; each still gets exactly its own images.
    asks = [{"label": str(i % 10), "n": 1 + i % 3, "seed": i, "generator": ("gan", "diffusion")[i % 2]} for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        concurrent = list(pool.map(lambda ask: post(server, "generate_image", json=ask).json()["images"], asks))
    assert concurrent == [post(server, "generate_image", json=ask).json()["images"] for ask in asks]


def test_a_champion_from_before_diffusion_serves_the_gan_alone(bento_home: Path, tmp_path: Path) -> None:
    from serving.promoted import promote

    older = {family: tag for family, tag in receipt(bento_home)["models"].items() if family != "diffusion"}
    record = tmp_path / "promoted.json"
    promote(record, older, None, "tests", "promoted before diffusion models were packaged")
    forced = subprocess.run(
        [sys.executable, "-c", "import serving.service"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=service_env(bento_home, AIGC_PROMOTED=str(record), AIGC_IMAGE_GENERATOR="diffusion"),
    )  # fmt: skip
    assert forced.returncode != 0 and "Traceback" not in forced.stderr
    refusal = "aigc service: AIGC_IMAGE_GENERATOR='diffusion' is not a served generator (gan)"
    assert forced.stderr.strip().splitlines()[-1] == refusal
    running = start_server(bento_home, tmp_path / "log", AIGC_PROMOTED=str(record))
    try:
        default = post(running, "generate_image", json={"label": "3"})
        assert default.status_code == 200 and default.json()["generator"] == "gan", default.text
        refused = post(running, "generate_image", json={"label": "3", "generator": "diffusion"})
        assert refused.status_code == 400 and "generator: no diffusion model is served" in refused.text
    finally:
        stop_server(running)


def test_the_compressed_switch_serves_the_champions_compressed_copies(bento_home: Path, tmp_path: Path) -> None:
    packaged = receipt(bento_home)
    compressed = packaged["compressed"]
    assert set(compressed) == set(FAMILIES) and not set(compressed.values()) & set(packaged["models"].values())
    label_check = f"import bentoml, json; print(json.dumps(bentoml.models.get({compressed['text']!r}).info.labels))"
    labels = json.loads(subprocess.run([sys.executable, "-c", label_check], env=service_env(bento_home), capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    assert labels["compression"] == "int8" and float(labels["size_ratio"]) < 1 and "bleu" in labels
    running = start_server(bento_home, tmp_path / "log", AIGC_COMPRESSED="1")
    try:
        text = post(running, "generate_text", json={"record": RECORD})
        assert text.status_code == 200 and text.headers["x-model-tag"] == compressed["text"], text.text
        for kind, family in (("gan", "image"), ("diffusion", "diffusion")):
            image = post(running, "generate_image", json={"label": "3", "seed": 5, "generator": kind})
            assert image.status_code == 200 and image.headers["x-model-tag"] == compressed[family], image.text
        restored = post(running, "restore_image", files={"image": ("photo.png", upload((40, 32)), "image/png")})
        assert restored.status_code == 200 and restored.headers["x-model-tag"] == compressed["restore"]
        assert png(restored.content).size == (80, 64)
    finally:
        stop_server(running)
    from serving.promoted import promote

    older = tmp_path / "older.json"  # a champion promoted before compression: the switch is refused in one line
    promote(older, packaged["models"], None, "tests", "promoted before the compress stage")
    refused = subprocess.run(
        [sys.executable, "-c", "import serving.service"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=service_env(bento_home, AIGC_PROMOTED=str(older), AIGC_COMPRESSED="1"),
    )  # fmt: skip
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "the champion has no compressed models (AIGC_COMPRESSED=1)" in refused.stderr.strip().splitlines()[-1]
    unclear = subprocess.run(
        [sys.executable, "-c", "import serving.service"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env=service_env(bento_home, AIGC_COMPRESSED="maybe"),
    )  # fmt: skip
    assert unclear.returncode != 0
    assert unclear.stderr.strip().splitlines()[-1] == "aigc service: AIGC_COMPRESSED='maybe': use 1 or 0"


def test_restore_image_returns_the_upscaled_png(server: Server) -> None:
    response = post(server, "restore_image", files={"image": ("photo.png", upload((40, 32)), "image/png")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    restored = png(response.content)
    assert restored.size == (80, 64) and restored.text["task"] == "super_resolution"  # the tiny restorer is ×2


def test_python_client(server: Server) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server.url) as client:
        result = client.generate_image(label="7", n=1, seed=1)
    assert result["label"] == "7" and len(result["images"]) == 1


# --- bad requests: a 4xx naming the field, never a 500 -----------------------------------------------------


@pytest.mark.parametrize(
    ("api", "body", "field"),
    [
        ("generate_text", {"prompt": "word " * 500}, "prompt"),  # over the character cap
        ("generate_text", {"prompt": "colour: amber " * 60}, "prompt"),  # under it, but too many tokens
        ("generate_text", {"record": {"name": "A", "sku": "1"}}, "sku"),
        ("generate_text", {"record": RECORD, "prompt": "both"}, "record, prompt"),
        ("generate_text", {}, "record, prompt"),
        ("generate_text", {"record": RECORD, "max_new_tokens": 100000}, "max_new_tokens"),
        ("generate_text", {"record": RECORD, "temperature": -1}, "temperature"),
        ("generate_image", {"label": "cat"}, "label"),
        ("generate_image", {"label": "3", "n": 1000}, "n"),
        ("generate_image", {"label": "3", "seed": -1}, "seed"),
        ("generate_image", {"label": "3", "generator": "vae"}, "generator"),
    ],
)
def test_bad_json_requests_are_400_naming_the_field(server: Server, api: str, body: dict[str, object], field: str) -> None:
    response = post(server, api, json=body)
    assert response.status_code == 400, response.text
    assert field in error_text(response)


def test_malformed_json_and_wrong_content_type_are_4xx(server: Server) -> None:
    broken = post(server, "generate_text", content=b'{"record": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "Invalid JSON" in broken.text
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):  # a JSON endpoint takes JSON only
        other = post(server, "generate_text", content=b'{"prompt": "hi"}', headers={"content-type": content_type})
        expected = f"content-type: generate_text takes application/json, not {content_type}"
        assert other.status_code == 415 and other.json() == {"error": expected}
    json_upload = post(server, "restore_image", json={"image": "abc"})
    assert json_upload.status_code == 415 and "multipart/form-data" in error_text(json_upload)


def test_a_10_mb_body_is_refused_with_413(server: Server) -> None:
    response = post(server, "generate_text", content=b"x" * (10 * 1024 * 1024), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "body" in response.text


def test_corrupt_and_oversized_uploads_are_400(server: Server) -> None:
    corrupt = post(server, "restore_image", files={"image": ("bad.png", upload()[:100], "image/png")})
    assert corrupt.status_code == 400 and "image: not a readable image" in corrupt.text
    wrong_task = post(server, "restore_image", files={"image": ("p.png", upload(), "image/png")}, data={"task": "denoise"})
    assert wrong_task.status_code == 400 and "task" in wrong_task.text
    not_an_image = post(server, "restore_image", files={"image": ("notes.txt", b"hello", "text/plain")})
    assert not_an_image.status_code == 400 and "image" in not_an_image.text
    # A 4 MB-pixel claim in a tiny file (a decompression bomb): refused from the header, nothing decoded.
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, "PNG")
    response = post(server, "restore_image", files={"image": ("bomb.png", bomb.getvalue(), "image/png")})
    assert response.status_code == 400 and "over the limit" in response.text


# --- request log --------------------------------------------------------------------------------------------


def test_requests_are_logged_with_the_documented_columns_and_no_raw_text(server: Server, tiny_models: Path) -> None:
    schema = json.loads((tiny_models / "text" / SCHEMA_FILE).read_text())
    seen_colour = sorted(schema["keys"]["colour"]["values"])[0]
    other_key = next(key for key in categorical_keys(schema) if key not in ("name", "colour"))
    record = {"name": "Aurora", "colour": seen_colour, other_key: "odd"}
    sent = post(server, "generate_text", json={"record": record, "max_new_tokens": 8})
    assert sent.status_code == 200, sent.text
    ids = {
        "generate_text": sent.headers["x-request-id"],
        "generate_image": post(server, "generate_image", json={"label": "2"}).headers["x-request-id"],
        "restore_image": post(server, "restore_image", files={"image": ("p.png", upload(), "image/png")}).headers["x-request-id"],
    }
    deadline = time.monotonic() + 10
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:  # the server (and its log) is the session's: find this test's rows
        parts = sorted(server.log_dir.glob("requests-*.parquet"))
        rows = [r for p in parts for r in pq.read_table(p).to_pylist() if r["request_id"] in ids.values()]
        if len(rows) == len(ids):
            break
        time.sleep(0.3)
    assert {r["endpoint"]: r["request_id"] for r in rows} == ids
    logged_keys = categorical_keys(schema)
    assert "name" not in logged_keys and "colour" in logged_keys  # free text (names) is never logged
    columns = tuple(pq.read_schema(sorted(server.log_dir.glob("requests-*.parquet"))[0]).names)
    assert columns == tuple(log_schema(tuple(logged_keys)).names)
    text_row = next(r for r in rows if r["endpoint"] == "generate_text")
    assert text_row["attr_colour"] == seen_colour and text_row["num_attributes"] == 3 and text_row["latency_ms"] > 0
    assert text_row[f"attr_{other_key}"] == "(other)"  # a value training never saw is not copied into the log
    assert 0.0 <= text_row["oov_share"] <= 1.0  # measured against the model folder's vocabulary.json
    restore_row = next(r for r in rows if r["endpoint"] == "restore_image")
    assert restore_row["width"] == 40 and restore_row["brightness"] is not None
    logged = json.dumps([r for p in server.log_dir.glob("requests-*.parquet") for r in pq.read_table(p).to_pylist()], default=str)
    assert "Aurora" not in logged and "odd" not in logged  # names and unseen values are never logged


def test_failed_requests_are_logged_with_their_status_and_error_class(server: Server) -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    assert post(server, "generate_image", json={"label": "no such label"}).status_code == 400
    too_big = httpx.post(
        f"{server.url}/generate_image", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}, timeout=60
    )
    assert too_big.status_code == 413
    expected = {("generate_image", 400, "InvalidArgument"), ("generate_image", 413, "PayloadTooLarge")}
    deadline, logged = time.monotonic() + 10, set()
    while time.monotonic() < deadline and not expected <= logged:
        rows = [r for p in server.log_dir.glob("requests-*.parquet") for r in pq.read_table(p).to_pylist()]
        logged = {(r["endpoint"], r["status"], r["error"]) for r in rows if r["timestamp"] >= since and r["status"] >= 400}
        time.sleep(0.3)
    assert expected <= logged


def test_a_request_that_crashes_is_logged_as_a_5xx_with_its_error_class(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import asyncio

    for family in ("TEXT", "IMAGE", "RESTORE"):  # importing the service resolves its models: name some
        monkeypatch.setenv(f"AIGC_{family}_MODEL", f"aigc-{family.lower()}:not-in-this-store")
    monkeypatch.setenv("AIGC_REQUEST_LOG", str(tmp_path / "log"))
    from serving import service

    monkeypatch.setattr(service, "_REQUEST_LOG", None)

    async def endpoint_that_fails(scope: dict[str, object], receive: object, send: object) -> None:
        scope[service.ERROR_KEY] = "ZeroDivisionError"  # what `failed(ctx, err)` records before BentoML answers 500
        await send({"type": "http.response.start", "status": 500, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    async def endpoint_that_dies(scope: dict[str, object], receive: object, send: object) -> None:
        raise RuntimeError("the worker died before answering")

    async def call(app: object, path: str) -> None:
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"{}"}

        headers = [(b"content-type", b"application/json")]
        guard = service.GuardMiddleware(app, **service.GUARD_OPTIONS)
        await guard({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)

    asyncio.run(call(endpoint_that_fails, "/generate_text"))
    with pytest.raises(RuntimeError):
        asyncio.run(call(endpoint_that_dies, "/generate_image"))
    service.request_log().close()
    rows = [r for p in (tmp_path / "log").glob("requests-*.parquet") for r in pq.read_table(p).to_pylist()]
    assert {(r["endpoint"], r["status"], r["error"]) for r in rows} == {
        ("generate_text", 500, "ZeroDivisionError"),
        ("generate_image", 500, "RuntimeError"),
    }
    assert all(r["latency_ms"] >= 0 and r["request_id"] for r in rows)
