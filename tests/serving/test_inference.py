"""The serving pieces that need no server: upload decoding, PNG provenance, batching groups, the request log."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from serving.inference import ImageGenerator, ImageRequest, TextRequest, UploadError, decode_upload, png_bytes
from serving.request_log import BASE_COLUMNS, RequestLog, log_schema, text_log_fields


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_uploads_keep_their_layout_and_bad_ones_are_refused_with_the_reason() -> None:
    grey = decode_upload(encoded(Image.new("L", (7, 5), 128)))
    assert grey.shape == (5, 7) and grey.dtype == np.uint8
    assert decode_upload(encoded(Image.new("I;16", (7, 5), 65535))).max() == 255  # 16-bit scaled, not clipped
    assert decode_upload(encoded(Image.new("RGBA", (7, 5), (1, 2, 3, 0)))).shape == (5, 7, 3)  # alpha dropped
    assert decode_upload(encoded(Image.new("P", (7, 5)))).shape == (5, 7, 3)
    with pytest.raises(UploadError, match="the upload is empty"):
        decode_upload(b"")
    with pytest.raises(UploadError, match="not a readable image"):
        decode_upload(b"GIF89a but not really")
    with pytest.raises(UploadError, match="not a readable image"):
        decode_upload(encoded(Image.new("RGB", (64, 64)))[:60])  # truncated
    with pytest.raises(UploadError, match=r"9000x10 is over the limit"):
        decode_upload(encoded(Image.new("L", (9000, 10))))
    with pytest.raises(UploadError, match="over the limit"):
        decode_upload(encoded(Image.new("L", (300, 300))), max_pixels=300 * 299)


def test_png_carries_provenance_text() -> None:
    image = Image.open(io.BytesIO(png_bytes(np.zeros((4, 4, 1), np.uint8), {"model": "aigc-image:abc", "seed": "7"})))
    assert image.text == {"model": "aigc-image:abc", "seed": "7"} and image.mode == "L"


def test_only_requests_that_decode_alike_share_a_batch() -> None:
    greedy = [TextRequest("a", seed=1), TextRequest("b", seed=2)]
    assert greedy[0].group_key() == greedy[1].group_key()  # the seed does not matter without sampling
    sampled = [TextRequest("a", decoding="nucleus", seed=1), TextRequest("b", decoding="nucleus", seed=2)]
    assert sampled[0].group_key() != sampled[1].group_key()


@pytest.mark.parametrize(("folder", "kind"), [("image", "gan"), ("diffusion", "diffusion")])
def test_a_requests_images_depend_on_its_seed_never_on_its_batch(tiny_models: Path, folder: str, kind: str) -> None:
    import torch

    generator = ImageGenerator(tiny_models / folder, torch.device("cpu"))
    assert generator.kind == kind
    requests = [ImageRequest(1, 3, seed=7), ImageRequest(0, 2, seed=5), ImageRequest(2, 4, seed=7)]
    together = generator.generate(requests)
    for request, images in zip(requests, together, strict=True):
        alone = generator.generate([request])[0]
        assert len(images) == request.n and all(np.array_equal(a, b) for a, b in zip(images, alone, strict=True))
    assert not np.array_equal(together[0][0], generator.generate([ImageRequest(1, 1, seed=8)])[0][0])  # seeds matter


def wait_for_rows(folder: Path, count: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = [r for p in sorted(folder.glob("requests-*.parquet")) for r in pq.read_table(p).to_pylist()]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} rows in {folder}")


def test_request_log_writes_parts_and_keeps_the_newest(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, attributes=("size",), flush_rows=2, flush_seconds=60, max_files=2)
    for i in range(6):
        log.log({"request_id": str(i), "endpoint": "generate_image", "status": 200, "images": 1})
    log.close()
    parts = sorted(tmp_path.glob("requests-*.parquet"))
    assert len(parts) == 2  # three parts written, the oldest pruned
    assert tuple(pq.read_schema(parts[0]).names) == (*BASE_COLUMNS, "attr_size")
    assert [r["request_id"] for r in wait_for_rows(tmp_path, 4)] == ["2", "3", "4", "5"]


def test_request_log_never_blocks_and_counts_what_it_drops(tmp_path: Path) -> None:
    log = RequestLog(tmp_path, flush_rows=10_000, flush_seconds=60, max_queue=3)
    start = time.perf_counter()
    for i in range(50):
        log.log({"request_id": str(i), "endpoint": "generate_text", "status": 200})
    assert time.perf_counter() - start < 1.0 and log.dropped >= 40
    log.close()
    with pytest.raises(KeyError, match="no column"):
        log.log({"prompt": "raw text must never be logged"})


@pytest.mark.parametrize(
    "source", ["name: Jane Doe | shade: red | mood: calm", "name[Jane Doe], shade[red], mood[calm]",
               '{"name": "Jane Doe", "shade": "red", "mood": "calm"}'],
)  # fmt: skip
def test_text_log_fields_keep_only_the_logged_attributes(source: str) -> None:
    row = text_log_fields(source, 9, attributes={"shade": {"red", "blue"}, "mood": {"happy"}, "size": {"S"}})
    assert row["attr_shade"] == "red" and row["attr_size"] is None and row["num_attributes"] == 3 and row["source_tokens"] == 9
    assert row["attr_mood"] == "(other)"  # a value training never saw is not copied into the log
    assert "Jane Doe" not in map(str, row.values())
    assert set(row) <= set(log_schema(("shade", "mood", "size")).names)


def test_serving_code_imports_no_orchestration_library() -> None:
    watched = ("prefect", "dvc", "great_expectations")
    code = f"import sys, serving.inference, serving.request_log; print([m for m in {watched!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_record_model_follows_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydantic

    for family in ("TEXT", "IMAGE", "RESTORE"):  # importing the service resolves its models: name some
        monkeypatch.setenv(f"AIGC_{family}_MODEL", f"aigc-{family.lower()}:not-in-this-store")

    from components.records import JSON, PROMPT, infer_schema, parse_source
    from serving.service import record_model

    sources = [f'{{"name": "Item {i}", "size": "{"SML"[i % 3]}", "price": {i % 4}.5}}' for i in range(30)]
    schema = infer_schema(sources, max_categorical_values=10)
    model = record_model(schema)
    assert model is not None and schema["syntax"] == JSON
    record = model.model_validate({"price": 12.5, "name": "  A   lamp ", "size": "M"})
    prompt = record.to_prompt(schema)
    assert prompt == '{"name": "A lamp", "size": "M", "price": 12.5}'  # training order and types
    assert parse_source(prompt) is not None
    with pytest.raises(pydantic.ValidationError, match="colour"):
        model.model_validate({"name": "A", "colour": "red"})
    assert record_model({"syntax": PROMPT, "keys": {}}) is None
    schema["keys"]["name"].update(distinct=100_000, distinct_capped=True)  # a corpus with more names than were counted
    description = record_model(schema).model_json_schema()["properties"]["name"]["description"]
    assert description == "free text (100000 or more distinct values in training)"
