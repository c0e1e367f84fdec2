"""The BentoML service: text generation, class-conditional image generation and image restoration.

    bentoml serve serving.service:Gateway            # http://localhost:3000, Swagger UI at /

Two services, the pattern BentoML documents for adaptive batching across requests: `Gateway` is the public
HTTP API (validation, auth, provenance, request log) and `Models` holds the promoted models (class-level
`BentoModel` dependencies from the model store) with batchable inference methods; the gateway's concurrent
requests reach `Models` as batches. Every bad request is a 4xx naming the field.

The text API's `record` is built at start-up from the record schema saved with the served text model
(`schema.json`, learned by the `features` stage): its fields are the training data's attribute keys, an
unknown field is a 400 naming it, and a model trained on free prompts offers `prompt` only. A record is
written as a source in the training data's own syntax (components.records).

Which models: exactly the promoted ones (serving/promoted.py), never `aigc-*:latest`. A Bento built by the
`package` stage is pinned to the models it was built with (Bento arguments `text_model`, `image_model`,
`restore_model`, also `bentoml serve … --arg text_model=<tag>`); `bentoml serve serving.service:Gateway`
from the repository serves the current champion of the promotion record (`AIGC_PROMOTED`, default
params.yaml's `promotion.record`). `AIGC_TEXT_MODEL` / `AIGC_IMAGE_MODEL` / `AIGC_RESTORE_MODEL` override
one family's tag. With none of these the service refuses to start and says how to promote.

Environment: `AIGC_API_KEY` (when set, requests need `Authorization: Bearer <key>`; health endpoints and the
docs stay open), `AIGC_BATCHING=0` (turn adaptive batching off, for benchmarks), `AIGC_REQUEST_LOG` (request
log folder, default `monitoring/logs`) and `AIGC_REQUEST_LOG_FLUSH_SECONDS` (5).
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
from annotated_types import Ge, Le
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from components.records import (
    CATEGORICAL,
    PROMPT,
    SCHEMA_FILE,
    categorical_values,
    check_schema,
    key_order,
    literal_keys,
    serialise,
)
from serving.inference import MAX_IMAGES, MAX_NEW_TOKENS, MAX_RESTORE_PIXELS, ImageRequest, TextRequest

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024 * 1024  # uploads over this are refused with 413 before they are read
MAX_PROMPT_CHARS = 2000
MAX_FIELD_CHARS = 500
OPEN_PATHS = ("/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/", "/static_content")
BATCHING = os.environ.get("AIGC_BATCHING", "1") != "0"


def served_models() -> dict[str, str]:
    """Each family's model-store tag: the Bento's arguments, else AIGC_<FAMILY>_MODEL, else the champion of
    the promotion record. Never `:latest`: what an experiment packaged is not served until it is promoted."""
    from components.common import ConfigError, load_params
    from serving.promoted import FAMILIES, RECORD_ENV, PromotionError, served_tags

    arguments = bentoml.use_arguments()
    pinned = {f: getattr(arguments, f"{f}_model", None) or os.environ.get(f"AIGC_{f.upper()}_MODEL") for f in FAMILIES}
    if all(pinned.values()):
        return pinned  # type: ignore[return-value]
    try:
        record = os.environ.get(RECORD_ENV) or load_params("promotion")["record"]
        promoted = served_tags(Path(record), FAMILIES)
    except (ConfigError, PromotionError, KeyError) as err:
        raise SystemExit(f"aigc service: {err}") from None  # one line, not a traceback, and no start
    return {family: pinned[family] or promoted[family] for family in FAMILIES}


SERVED = served_models()
TEXT_TAG, IMAGE_TAG, RESTORE_TAG = SERVED["text"], SERVED["image"], SERVED["restore"]


def served_schema(tag: str) -> dict[str, Any]:
    """The record schema saved with the text model `tag`; a prompt-only schema when the model has none."""
    try:
        folder = Path(bentoml.models.get(tag).path)
    except bentoml.exceptions.NotFound:
        return {"syntax": PROMPT, "keys": {}}  # the service cannot start without the model anyway
    path = folder / SCHEMA_FILE
    if not path.is_file():
        logger.warning("%s has no %s (trained before records had a schema?): the text API takes prompts only", tag, SCHEMA_FILE)
        return {"syntax": PROMPT, "keys": {}}
    try:
        return check_schema(json.loads(path.read_text(encoding="utf-8")), f"{tag} {SCHEMA_FILE}")
    except ValueError as err:  # JSONDecodeError included
        raise RuntimeError(f"{path}: unreadable record schema ({err}); rerun `dvc repro` to rebuild the text model") from None


class RecordBase(BaseModel):
    """A structured source: the training data's attribute keys (at least one set), nothing else."""

    model_config = ConfigDict(extra="forbid")

    def to_prompt(self, schema: dict[str, Any]) -> str:
        """The record as a source in the training syntax, keys in the training order, whitespace collapsed."""
        values = {
            key: " ".join(value.split()) if isinstance(value, str) else json.dumps(value)
            for key, value in self.model_dump(by_alias=True, exclude_none=True).items()
        }
        pairs = [(key, values[key]) for key in key_order(schema) if values.get(key)]
        return serialise(pairs, schema["syntax"], literal_keys(schema)) if pairs else ""


def record_model(schema: dict[str, Any]) -> type[RecordBase] | None:
    """The request model of a schema's records (None for free-prompt data): one optional string per key,
    under the key's own name (an alias, so keys need not be Python names), described from the schema."""
    if schema["syntax"] == PROMPT or not schema["keys"]:
        return None
    fields: dict[str, Any] = {}
    literal = literal_keys(schema)
    for index, key in enumerate(key_order(schema)):
        entry = schema["keys"][key]
        if entry.get("kind") == CATEGORICAL:
            counts = entry.get("values", {})
            seen = sorted(counts, key=lambda value: (-counts[value], value))
            description = f"categorical: {entry.get('distinct', len(seen))} values in training, most often {', '.join(seen[:5])}"
            examples = seen[:3]
        else:
            description, examples = f"free text ({entry.get('distinct', 0)} distinct values in training)", None
        text = Annotated[str, StringConstraints(max_length=MAX_FIELD_CHARS)]
        fields[f"field_{index}"] = (
            (text | int | float | bool | None) if key in literal else (text | None),  # JSON numbers stay numbers
            Field(None, alias=key, description=description, examples=examples),
        )
    return create_model("TextRecord", __base__=RecordBase, **fields)


TEXT_SCHEMA = served_schema(TEXT_TAG)
TextRecord = record_model(TEXT_SCHEMA)
LOGGED_ATTRIBUTES = categorical_values(TEXT_SCHEMA)
Decoding = Literal["greedy", "beam", "nucleus"]
Temperature = Annotated[float, Ge(0.05), Le(2.0)]
TopP = Annotated[float, Ge(0.05), Le(1.0)]
NumBeams = Annotated[int, Ge(1), Le(8)]
MaxNewTokens = Annotated[int, Ge(1), Le(MAX_NEW_TOKENS)]
Seed = Annotated[int, Ge(0), Le(2**31 - 1)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class TextResult(BaseModel):
    text: str
    model: str
    seed: int
    decoding: str


class ImageResult(BaseModel):
    label: str
    seed: int
    model: str
    images: list[str]  # base64 PNGs, provenance in their tEXt chunks


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _labels(model: Any) -> dict[str, str]:
    return {k: str(v) for k, v in (model.info.labels or {}).items()}


@bentoml.service(name="aigc-models", traffic={"timeout": 120})
class Models:
    text_model = bentoml.models.BentoModel(TEXT_TAG)
    image_model = bentoml.models.BentoModel(IMAGE_TAG)
    restore_model = bentoml.models.BentoModel(RESTORE_TAG)

    def __init__(self) -> None:
        from serving.inference import ImageGenerator, ImageRestorer, TextGenerator

        device = _device()
        self.text = TextGenerator(Path(self.text_model.path), device)
        self.image = ImageGenerator(Path(self.image_model.path), device)
        self.restorer = ImageRestorer(Path(self.restore_model.path), device)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Model tags, provenance labels and what the gateway validates against."""
        return {
            "text": {"tag": str(self.text_model.tag), **_labels(self.text_model), "max_length": self.text.max_length},
            "image": {"tag": str(self.image_model.tag), **_labels(self.image_model), "label_names": self.image.label_names},
            "restore": {"tag": str(self.restore_model.tag), **_labels(self.restore_model), "task": self.restorer.task},
        }

    # max_latency_ms bounds how long a request may wait for its batch; the dispatcher answers 503 when it
    # expects to miss it, so it is set well above a CPU batch's time (~1 s for 32 texts).
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=30_000)
    def generate_text_batch(self, requests: list[dict[str, Any]]) -> list[str]:
        return self.text.generate([TextRequest(**r) for r in requests])

    @bentoml.api(batchable=BATCHING, max_batch_size=64, max_latency_ms=30_000)
    def generate_image_batch(self, requests: list[dict[str, Any]]) -> list[list[str]]:
        """Per request, its images as base64 PNGs carrying model tag, seed, label and params hash."""
        from serving.inference import png_bytes

        results = self.image.generate([ImageRequest(**r) for r in requests])
        meta = {"model": str(self.image_model.tag), "params_hash": _labels(self.image_model).get("params_hash", "")}
        return [
            [
                base64.b64encode(
                    png_bytes(px, {**meta, "seed": str(r["seed"]), "label": self.image.label_names[r["label"]]})
                ).decode()
                for px in images
            ]
            for r, images in zip(requests, results, strict=True)
        ]

    @bentoml.api
    def restore(self, image_b64: str, seed: int) -> str:
        """The restored image of a validated upload, as a base64 PNG with provenance."""
        from serving.inference import decode_upload, png_bytes

        pixels = decode_upload(base64.b64decode(image_b64))
        restored = self.restorer.restore(pixels)
        meta = {"model": str(self.restore_model.tag), "params_hash": _labels(self.restore_model).get("params_hash", ""),
                "seed": str(seed), "task": self.restorer.task}  # fmt: skip
        return base64.b64encode(png_bytes(restored, meta)).decode()


_REQUEST_LOG: Any = None


def request_log() -> Any:
    """The process's one request log, shared by the gateway's endpoints and the middleware in front of it."""
    global _REQUEST_LOG
    if _REQUEST_LOG is None:
        from serving.request_log import RequestLog

        _REQUEST_LOG = RequestLog(
            Path(os.environ.get("AIGC_REQUEST_LOG", "monitoring/logs")),
            attributes=tuple(LOGGED_ATTRIBUTES),
            flush_seconds=float(os.environ.get("AIGC_REQUEST_LOG_FLUSH_SECONDS", "5")),
        )
    return _REQUEST_LOG


ERROR_KEY = "aigc.error"  # set in the ASGI scope by an endpoint that failed: the error's class, for the log
STATUS_ERRORS = {400: "InvalidArgument", 401: "Unauthorized", 404: "NotFound", 413: "PayloadTooLarge",
                 422: "ValidationError", 503: "ServiceUnavailable"}  # fmt: skip


def failed(ctx: bentoml.Context, err: BaseException) -> None:
    """Name the error of a failing request for the request log (the middleware writes its row)."""
    ctx.request.scope[ERROR_KEY] = type(err).__name__


class GuardMiddleware:
    """ASGI middleware in front of the gateway: optional bearer-token auth, a request body cap, and a request
    log row for every API request that ends in a 4xx or 5xx (answered ones are logged by their endpoint,
    with their features), so failures are visible to monitoring, whatever raised them."""

    def __init__(self, app: Any, max_body: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_body = max_body
        self.api_key = os.environ.get("AIGC_API_KEY") or None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith("/static_content"):
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_logged(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        crashed: str | None = None
        try:
            await self._guarded(scope, receive, send_logged)
        except BaseException as err:  # logged as the 500 the client sees, then raised to the server as before
            crashed = type(err).__name__
            raise
        finally:
            if status >= 400:
                error = scope.get(ERROR_KEY) or crashed or STATUS_ERRORS.get(status, f"HTTP{status}")
                request_log().log({"request_id": uuid.uuid4().hex, "endpoint": path.strip("/") or "/", "status": status,
                                   "latency_ms": (time.perf_counter() - start) * 1000, "error": error})  # fmt: skip

    async def _guarded(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key:
            supplied = headers.get("authorization", "")
            expected = f"Bearer {self.api_key}"
            if not hmac.compare_digest(supplied.encode(), expected.encode()):
                await _json(send, 401, {"error": "authorization: missing or wrong bearer token"}, {"www-authenticate": "Bearer"})
                return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _json(send, 413, {"error": f"body: {int(length)} bytes is over the limit of {self.max_body}"})
            return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise InvalidArgument(f"body: over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _json(send: Any, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@bentoml.service(name="aigc-gateway", traffic={"timeout": 120})
class Gateway:
    models = bentoml.depends(Models)
    text_model = bentoml.models.BentoModel(TEXT_TAG)  # for its tokenizer: prompt lengths are checked here

    def __init__(self) -> None:
        from transformers import AutoTokenizer

        from components.delex import Delexicaliser

        self.tokenizer = AutoTokenizer.from_pretrained(self.text_model.path)
        # Lengths are of what the model reads: a copied name is one placeholder token, however long it is.
        self.delexicaliser = Delexicaliser.load(Path(self.text_model.path))
        vocabulary_path = Path(self.text_model.path) / "vocabulary.json"
        self.vocabulary = (
            frozenset(json.loads(vocabulary_path.read_text(encoding="utf-8"))["words"]) if vocabulary_path.is_file() else None
        )
        self.log = request_log()
        self._described: dict[str, Any] | None = None

    async def _call(self, api: str, *args: Any) -> Any:
        """A call to the Models service, retried when its pooled connection was closed under it.

        Under sustained load BentoML's inter-service client reuses connections the other side has just
        closed (ServerDisconnectedError; bentoml/BentoML#5540). Every Models API is a pure function of its
        input, so a retry is safe; after three tries the client gets a 503, never a 500.
        """
        import asyncio

        import aiohttp
        from bentoml.exceptions import ServiceUnavailable

        for attempt in range(3):
            try:
                return await getattr(self.models.to_async, api)(*args)
            except aiohttp.ClientConnectionError as err:
                if attempt == 2:
                    raise ServiceUnavailable(f"model service connection failed: {type(err).__name__}") from err
                await asyncio.sleep(0.02 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _describe(self) -> dict[str, Any]:
        if self._described is None:
            self._described = await self._call("describe")
        return self._described

    def _provenance(self, ctx: bentoml.Context, family: dict[str, Any], seed: int, request_id: str) -> None:
        ctx.response.headers["x-model-tag"] = family["tag"]
        ctx.response.headers["x-params-hash"] = family.get("params_hash", "")
        ctx.response.headers["x-data-hash"] = family.get("data_hash", "")
        ctx.response.headers["x-seed"] = str(seed)
        ctx.response.headers["x-request-id"] = request_id

    if TextRecord is not None:

        @bentoml.api
        async def generate_text(
            self,
            ctx: bentoml.Context,
            record: TextRecord | None = None,  # type: ignore[valid-type]
            prompt: Prompt | None = None,
            decoding: Decoding = "beam",  # what evaluate_text measures
            temperature: Temperature = 1.0,
            top_p: TopP = 0.9,
            num_beams: NumBeams = 4,
            max_new_tokens: MaxNewTokens = 64,
            seed: Seed = 0,
        ) -> TextResult:
            """Text for a structured `record` (the training data's fields) or a raw `prompt` (exactly one)."""
            return await self._generate_text(ctx, record, prompt, decoding, temperature, top_p, num_beams, max_new_tokens, seed)

    else:

        @bentoml.api
        async def generate_text(
            self,
            ctx: bentoml.Context,
            prompt: Prompt,
            decoding: Decoding = "beam",  # what evaluate_text measures
            temperature: Temperature = 1.0,
            top_p: TopP = 0.9,
            num_beams: NumBeams = 4,
            max_new_tokens: MaxNewTokens = 64,
            seed: Seed = 0,
        ) -> TextResult:
            """Text for a `prompt` (the model was trained on free prompts, so there is no `record`)."""
            return await self._generate_text(ctx, None, prompt, decoding, temperature, top_p, num_beams, max_new_tokens, seed)

    async def _generate_text(
        self, ctx: bentoml.Context, record: RecordBase | None, prompt: str | None, decoding: str, temperature: float,
        top_p: float, num_beams: int, max_new_tokens: int, seed: int,
    ) -> TextResult:  # fmt: skip
        try:
            from serving.request_log import text_log_fields

            start, request_id = time.perf_counter(), uuid.uuid4().hex
            if (record is None) == (prompt is None):
                raise InvalidArgument("record, prompt: give exactly one of them")
            text = record.to_prompt(TEXT_SCHEMA) if record is not None else " ".join(prompt.split())  # type: ignore[union-attr]
            if not text:
                raise InvalidArgument("record: at least one field must be set" if record is not None else "prompt: is empty")
            described = (await self._describe())["text"]
            model_text = self.delexicaliser.model_source(text) if self.delexicaliser is not None else text
            tokens = len(self.tokenizer(model_text, add_special_tokens=False)["input_ids"])
            room = described["max_length"] - max_new_tokens - 1
            if tokens > room:
                field = "record" if record is not None else "prompt"
                raise InvalidArgument(f"{field}: {tokens} tokens; at most {room} fit with max_new_tokens={max_new_tokens}")
            request = TextRequest(text, decoding, temperature, top_p, num_beams, max_new_tokens, seed)
            (output,) = await self._call("generate_text_batch", [request.__dict__])
            self._provenance(ctx, described, seed, request_id)
            self.log.log({
                "request_id": request_id, "endpoint": "generate_text", "status": 200, "model_tag": described["tag"],
                "params_hash": described.get("params_hash"), "seed": seed, "decoding": decoding, "output_chars": len(output),
                "latency_ms": (time.perf_counter() - start) * 1000,
                **text_log_fields(text, tokens, self.vocabulary, LOGGED_ATTRIBUTES),
            })  # fmt: skip
            return TextResult(text=output, model=described["tag"], seed=seed, decoding=decoding)
        except Exception as err:
            failed(ctx, err)
            raise

    @bentoml.api
    async def generate_image(
        self,
        ctx: bentoml.Context,
        label: Annotated[str, Field(min_length=1, max_length=100)],
        n: Annotated[int, Ge(1), Le(MAX_IMAGES)] = 1,
        seed: Seed = 0,
    ) -> ImageResult:
        """`n` images of class `label` (one of the trained labels) as base64 PNGs."""
        try:
            start, request_id = time.perf_counter(), uuid.uuid4().hex
            described = (await self._describe())["image"]
            names = described["label_names"]
            if label not in names:
                raise InvalidArgument(f"label: {label!r} is not one of the trained labels {names}")
            request = ImageRequest(names.index(label), n, seed)
            (images,) = await self._call("generate_image_batch", [request.__dict__])
            self._provenance(ctx, described, seed, request_id)
            self.log.log({
                "request_id": request_id, "endpoint": "generate_image", "status": 200, "model_tag": described["tag"],
                "params_hash": described.get("params_hash"), "seed": seed, "label": label, "images": n,
                "latency_ms": (time.perf_counter() - start) * 1000,
            })  # fmt: skip
            return ImageResult(label=label, seed=seed, model=described["tag"], images=images)
        except Exception as err:
            failed(ctx, err)
            raise

    @bentoml.api
    async def restore_image(
        self, ctx: bentoml.Context, image: Path, task: Literal["super_resolution", "denoise"] | None = None
    ) -> Annotated[Path, bentoml.validators.ContentType("image/png")]:
        """The restored upload (multipart field `image`: PNG or JPEG, ≤ 8 MB) as a PNG. `task`, when given,
        must be the served restorer's (a model does one task; the wrong one is refused, not run)."""
        try:
            from serving.inference import UploadError, decode_upload
            from serving.request_log import image_log_fields

            start, request_id = time.perf_counter(), uuid.uuid4().hex
            data = image.read_bytes()
            try:
                pixels = decode_upload(data, max_pixels=MAX_RESTORE_PIXELS)
            except UploadError as err:
                raise InvalidArgument(str(err)) from err
            described = (await self._describe())["restore"]
            if task is not None and task != described["task"]:
                raise InvalidArgument(f"task: the served restorer does {described['task']!r}, not {task!r}")
            restored = base64.b64decode(await self._call("restore", base64.b64encode(data).decode(), 0))
            out = Path(ctx.temp_dir) / f"restored-{request_id}.png"
            out.write_bytes(restored)
            self._provenance(ctx, described, 0, request_id)
            self.log.log({
                "request_id": request_id, "endpoint": "restore_image", "status": 200, "model_tag": described["tag"],
                "params_hash": described.get("params_hash"), "seed": 0, "task": described["task"],
                "latency_ms": (time.perf_counter() - start) * 1000, **image_log_fields(pixels),
            })  # fmt: skip
            return out
        except Exception as err:
            failed(ctx, err)
            raise


Gateway.add_asgi_middleware(GuardMiddleware)
