"""The BentoML service: text generation, class-conditional image generation (GAN or diffusion) and image restoration.

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
`restore_model`, `diffusion_model`, also `bentoml serve … --arg text_model=<tag>`); `bentoml serve
serving.service:Gateway` from the repository serves the current champion of the promotion record
(`AIGC_PROMOTED`, default params.yaml's `promotion.record`). `AIGC_TEXT_MODEL` / `AIGC_IMAGE_MODEL` /
`AIGC_RESTORE_MODEL` / `AIGC_DIFFUSION_MODEL` override one family's tag (the first three pinned and no
diffusion tag: the GAN alone is served). With none of these the service refuses to start and says how to promote.

Image generation: `generate_image` takes `generator: gan | diffusion`. Left out, it is the variant's better
one: the generator whose domain FID (measured by `evaluate_image` on the same test images, a label of the
model in the store) is lower, or `AIGC_IMAGE_GENERATOR` when set. A champion promoted before diffusion models
were packaged serves the GAN alone. Images depend only on (model, label, seed, n), never on the batch.

Online A/B: while the promotion record runs an A/B test, `Models` also loads the challenger. In `split` mode
a share of clients (sticky by the `x-client-key` header, else by the request's seed) get the challenger's
answer; in `shadow` mode the challenger answers every request in the background and only the request log
sees it. Every response says its variant (`x-variant`), and so does the request log. `POST /feedback`
takes a request id and a rating, click, accept / reject or an edited text, stored beside the request log
(monitoring/ab.py reports per variant; edited texts become training references, monitoring/landing.py).

Metrics: `/metrics` carries BentoML's and the service's own (serving/metrics.py: requests by model tag and
variant, refusals by reason, batch sizes, tokens and images, request-log rows, the served models).

Environment: `AIGC_API_KEY` (when set, requests need `Authorization: Bearer <key>`; health endpoints, the
docs and `/metrics` stay open), `AIGC_METRICS_KEY` (when set, `/metrics` needs it as its bearer token),
`AIGC_BATCHING=0` (turn adaptive batching off, for benchmarks), `AIGC_IMAGE_GENERATOR` (gan | diffusion: the
default generator, instead of the lower FID), `AIGC_COMPRESSED=1` (serve the champion's compressed copies, the
`compress` stage's int8 text and half-precision image models, instead of its fp32 models), `AIGC_REQUEST_LOG` (request log folder,
default `monitoring/logs`) and `AIGC_REQUEST_LOG_FLUSH_SECONDS` (5).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from http import HTTPStatus
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
from serving.guard import (
    ERROR_KEY,
    MESSAGE_KEY,
    MODEL_TAG_KEY,
    VARIANT_KEY,
    Admission,
    GuardMiddleware,
    Health,
    Limits,
    endpoints_of,
    install_log_filters,
)
from serving.inference import MAX_IMAGES, MAX_NEW_TOKENS, ImageRequest, TextRequest
from serving.promoted import CHALLENGER, CHAMPION, COMPRESSED_ENV, SHADOW, SPLIT

logger = logging.getLogger(__name__)
MAX_PROMPT_CHARS = 2000
MAX_FIELD_CHARS = 500
BATCHING = os.environ.get("AIGC_BATCHING", "1") != "0"
LIMITS = Limits.from_env()
HEALTH = Health(LIMITS.ready_timeout_s, LIMITS.liveness_grace_s)
ADMISSIONS = {
    "generate_text": Admission(LIMITS.generate_concurrency, LIMITS.generate_queue, LIMITS.generate_timeout_s),
    "generate_image": Admission(LIMITS.generate_concurrency, LIMITS.generate_queue, LIMITS.generate_timeout_s),
    "restore_image": Admission(LIMITS.restore_concurrency, LIMITS.restore_queue, LIMITS.restore_timeout_s),
}
TIMEOUTS = {"models": LIMITS.generate_timeout_s, "restorer": LIMITS.restore_timeout_s}
# BentoML's inter-service client closes its whole connection pool every 100 requests by default, cutting the
# calls in flight on it (ServerDisconnectedError, "Connection closed"); a pool lives for the service's life here.
STEADY_CONNECTIONS = {"max_requests": 2**31 - 1, "max_age": 86400.0}


def served_models() -> tuple[dict[str, str], dict[str, Any] | None]:
    """Each family's model-store tag, and the A/B test to run (or None): the Bento's arguments, else
    AIGC_<FAMILY>_MODEL, else the champion (and the running A/B test) of the promotion record. Never `:latest`:
    what an experiment packaged is not served until it is promoted or put on test. With AIGC_COMPRESSED=1,
    the compressed copies the Bento or the champion has instead of the fp32 models."""
    from components.common import ConfigError, load_params
    from serving.promoted import FAMILIES, OPTIONAL_FAMILIES, RECORD_ENV, PromotionError, challenger, served_tags

    arguments = bentoml.use_arguments()
    argument = "{}_compressed_model" if COMPRESSED else "{}_model"
    pinned = {f: getattr(arguments, argument.format(f), None) or os.environ.get(f"AIGC_{f.upper()}_MODEL") for f in FAMILIES}
    if all(tag for family, tag in pinned.items() if family not in OPTIONAL_FAMILIES):
        return {family: tag for family, tag in pinned.items() if tag}, None
    try:
        record = Path(os.environ.get(RECORD_ENV) or load_params("promotion")["record"])
        promoted, ab = served_tags(record, FAMILIES, COMPRESSED), challenger(record)
    except (ConfigError, PromotionError, KeyError) as err:
        raise SystemExit(f"aigc service: {err}") from None  # one line, not a traceback, and no start
    if ab is not None and any(pinned.values()):
        ab = None  # a family pinned by hand is not A/B tested
    served = {family: pinned[family] or promoted.get(family) for family in FAMILIES}
    return {family: tag for family, tag in served.items() if tag}, ab


def shipped_compressed() -> dict[str, str]:
    """The compressed copies a Bento is built with (its `<family>_compressed_model` arguments), so that it carries
    them wherever it runs and AIGC_COMPRESSED=1 can serve them there."""
    from serving.promoted import FAMILIES

    arguments = bentoml.use_arguments()
    return {f: tag for f in FAMILIES if (tag := getattr(arguments, f"{f}_compressed_model", None))}


SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False, "": False}
if os.environ.get(COMPRESSED_ENV, "").strip().lower() not in SWITCH:
    raise SystemExit(f"aigc service: {COMPRESSED_ENV}={os.environ[COMPRESSED_ENV]!r}: use 1 or 0")
COMPRESSED = SWITCH[os.environ.get(COMPRESSED_ENV, "").strip().lower()]
SERVED, AB = served_models()
SHIPPED = shipped_compressed()
TEXT_TAG, IMAGE_TAG, RESTORE_TAG, DIFFUSION_TAG = SERVED["text"], SERVED["image"], SERVED["restore"], SERVED.get("diffusion")
GENERATOR_FAMILY = {"gan": "image", "diffusion": "diffusion"}
"""`generate_image`'s `generator` -> the model family that serves it."""
Generator = Literal["gan", "diffusion"]
IMAGE_GENERATOR = os.environ.get("AIGC_IMAGE_GENERATOR") or None
if IMAGE_GENERATOR is not None and GENERATOR_FAMILY.get(IMAGE_GENERATOR) not in SERVED:
    served_kinds = ", ".join(kind for kind, family in GENERATOR_FAMILY.items() if family in SERVED)
    raise SystemExit(f"aigc service: AIGC_IMAGE_GENERATOR={IMAGE_GENERATOR!r} is not a served generator ({served_kinds})")


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
            distinct = f"{entry.get('distinct', 0)}{' or more' if entry.get('distinct_capped') else ''}"
            description, examples = f"free text ({distinct} distinct values in training)", None
        text = Annotated[str, StringConstraints(max_length=MAX_FIELD_CHARS)]
        fields[f"field_{index}"] = (
            (text | int | float | bool | None) if key in literal else (text | None),  # JSON numbers stay numbers
            Field(None, alias=key, description=description, examples=examples),
        )
    return create_model("TextRecord", __base__=RecordBase, **fields)


def text_context(tag: str) -> int:
    """The served text model's context length in tokens (prompt and new tokens share it)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(bentoml.models.get(tag).path).max_position_embeddings)
    except bentoml.exceptions.NotFound:
        return MAX_NEW_TOKENS + 2  # the service cannot start without the model anyway


TEXT_SCHEMA = served_schema(TEXT_TAG)
TextRecord = record_model(TEXT_SCHEMA)
LOGGED_ATTRIBUTES = categorical_values(TEXT_SCHEMA)
Decoding = Literal["greedy", "beam", "nucleus"]
Temperature = Annotated[float, Ge(0.05), Le(2.0)]
TopP = Annotated[float, Ge(0.05), Le(1.0)]
NumBeams = Annotated[int, Ge(1), Le(8)]
# Room for at least one prompt token and the end token: the schema states what this model can do.
MaxNewTokens = Annotated[int, Ge(1), Le(min(MAX_NEW_TOKENS, text_context(TEXT_TAG) - 2))]
Seed = Annotated[int, Ge(0), Le(2**31 - 1)]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class TextResult(BaseModel):
    text: str
    model: str
    seed: int
    decoding: str


class FeedbackResult(BaseModel):
    request_id: str
    variant: str
    stored: bool


class ImageResult(BaseModel):
    label: str
    seed: int
    model: str
    generator: str  # gan | diffusion
    images: list[str]  # base64 PNGs, provenance in their tEXt chunks


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _labels(model: Any) -> dict[str, str]:
    return {k: str(v) for k, v in (model.info.labels or {}).items()}


def default_generator(models: dict[str, Any]) -> str:
    """The generator `generate_image` uses when a request names none: $AIGC_IMAGE_GENERATOR if this variant
    serves it, else of the served ones the lower domain FID (evaluate_image's, on the same test images and
    features; the GAN on a tie or when a label is missing)."""
    served = [kind for kind, family in GENERATOR_FAMILY.items() if family in models]
    if IMAGE_GENERATOR in served:
        return IMAGE_GENERATOR

    def fid(kind: str) -> float:
        try:
            return float(_labels(models[GENERATOR_FAMILY[kind]])["fid_domain"])
        except (KeyError, ValueError):
            return float("inf")

    return min(served, key=lambda kind: (fid(kind), kind != "gan"))


class ModelSet:
    """One variant's generators, loaded (the champion's, or the A/B challenger's); `diffusion` may be None."""

    def __init__(self, text: Any, image: Any, diffusion: Any = None) -> None:
        from serving.inference import ImageGenerator, TextGenerator

        device = _device()
        self.models = {"text": text, "image": image, **({"diffusion": diffusion} if diffusion is not None else {})}
        self.text = TextGenerator(Path(text.path), device)
        self.generators = {kind: ImageGenerator(Path(self.models[family].path), device)
                           for kind, family in GENERATOR_FAMILY.items() if family in self.models}  # fmt: skip
        self.default_generator = default_generator(self.models)

    def describe(self) -> dict[str, Any]:
        text = self.models["text"]
        described: dict[str, Any] = {
            "text": {"tag": str(text.tag), **_labels(text), "max_length": self.text.max_length},
            "default_generator": self.default_generator,
        }
        for kind, generator in self.generators.items():
            model = self.models[GENERATOR_FAMILY[kind]]
            described[GENERATOR_FAMILY[kind]] = {"tag": str(model.tag), **_labels(model), "label_names": generator.label_names}
        return described


def per_variant(requests: list[dict[str, Any]], run: Any) -> list[Any]:
    """A batch that mixes variants, run as one sub-batch per variant, answered in the batch's order."""
    answers: list[Any] = [None] * len(requests)
    for variant in sorted({r["variant"] for r in requests}):
        indices = [i for i, r in enumerate(requests) if r["variant"] == variant]
        group = [{k: v for k, v in requests[i].items() if k != "variant"} for i in indices]
        for index, answer in zip(indices, run(variant, group), strict=True):
            answers[index] = answer
    return answers


@bentoml.service(name="aigc-models", traffic={"timeout": LIMITS.generate_timeout_s + 5}, runner_connection=STEADY_CONNECTIONS)
class Models:
    text_model = bentoml.models.BentoModel(TEXT_TAG)
    image_model = bentoml.models.BentoModel(IMAGE_TAG)
    diffusion_model = bentoml.models.BentoModel(DIFFUSION_TAG) if DIFFUSION_TAG else None
    # Shipped, not loaded: a Bento carries its compressed copies for AIGC_COMPRESSED=1 wherever it runs.
    shipped_text = bentoml.models.BentoModel(SHIPPED["text"]) if "text" in SHIPPED else None
    shipped_image = bentoml.models.BentoModel(SHIPPED["image"]) if "image" in SHIPPED else None
    shipped_diffusion = bentoml.models.BentoModel(SHIPPED["diffusion"]) if "diffusion" in SHIPPED else None
    if AB is not None:  # the A/B challenger travels with the service only while a test runs
        challenger_text = bentoml.models.BentoModel(AB["models"]["text"])
        challenger_image = bentoml.models.BentoModel(AB["models"]["image"])
        challenger_diffusion = bentoml.models.BentoModel(AB["models"]["diffusion"]) if AB["models"].get("diffusion") else None

    def __init__(self) -> None:
        install_log_filters()
        from serving.metrics import served_model

        self.variants = {CHAMPION: ModelSet(self.text_model, self.image_model, self.diffusion_model)}
        if AB is not None:
            self.variants[CHALLENGER] = ModelSet(self.challenger_text, self.challenger_image, self.challenger_diffusion)
        for variant, models in self.variants.items():
            for family, model in models.models.items():
                served_model(family, variant, model)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        """Per variant: model tags, provenance labels and what the gateway validates against."""
        return {variant: models.describe() for variant, models in self.variants.items()}

    # max_latency_ms bounds how long a request may wait for its batch; the dispatcher answers 503 when it
    # expects to miss it, so it is set well above a CPU batch's time (~1 s for 32 texts).
    @bentoml.api(batchable=BATCHING, max_batch_size=32, max_latency_ms=30_000)
    def generate_text_batch(self, requests: list[dict[str, Any]]) -> list[str]:
        """Each request names its variant (champion, or the A/B challenger)."""
        from serving.metrics import observe_batch

        observe_batch("generate_text_batch", len(requests))
        return per_variant(requests, self._texts)

    def _texts(self, variant: str, requests: list[dict[str, Any]]) -> list[str]:
        from serving.metrics import count_tokens

        generator = self.variants[variant].text
        texts = generator.generate([TextRequest(**r) for r in requests])
        count_tokens(variant, sum(map(len, generator.tokenizer(texts, add_special_tokens=False)["input_ids"])))
        return texts

    @bentoml.api(batchable=BATCHING, max_batch_size=64, max_latency_ms=30_000)
    def generate_image_batch(self, requests: list[dict[str, Any]]) -> list[list[str]]:
        """Per request (each names its variant and generator), its images as base64 PNGs carrying model tag,
        generator, seed, label and params hash. Each generator gets its share of the batch (serving/inference.py:
        the GAN in one pass, diffusion request by request)."""
        from serving.metrics import observe_batch

        observe_batch("generate_image_batch", len(requests))
        return per_variant(requests, self._images)

    def _images(self, variant: str, requests: list[dict[str, Any]]) -> list[list[str]]:
        answers: list[list[str]] = [[] for _ in requests]
        for kind in sorted({r["generator"] for r in requests}):
            indices = [i for i, r in enumerate(requests) if r["generator"] == kind]
            group = [{k: v for k, v in requests[i].items() if k != "generator"} for i in indices]
            for index, images in zip(indices, self._generated(variant, kind, group), strict=True):
                answers[index] = images
        return answers

    def _generated(self, variant: str, kind: str, requests: list[dict[str, Any]]) -> list[list[str]]:
        from serving.inference import png_bytes
        from serving.metrics import count_images

        models = self.variants[variant]
        generator = models.generators[kind]  # the gateway asks only for a generator its variant serves
        results = generator.generate([ImageRequest(**r) for r in requests])
        count_images("generate_image_batch", variant, sum(len(images) for images in results))
        model = models.models[GENERATOR_FAMILY[kind]]
        meta = {"model": str(model.tag), "generator": kind, "params_hash": _labels(model).get("params_hash", "")}
        return [
            [
                base64.b64encode(
                    png_bytes(px, {**meta, "seed": str(r["seed"]), "label": generator.label_names[r["label"]]})
                ).decode()
                for px in images
            ]
            for r, images in zip(requests, results, strict=True)
        ]


@bentoml.service(
    name="aigc-restorer",
    threads=LIMITS.restore_concurrency,  # as many restorations at once as the gateway admits
    traffic={"timeout": LIMITS.restore_timeout_s + 5},
    runner_connection=STEADY_CONNECTIONS,
)
class Restorer:
    """Restoration in its own service and process, on `restore_threads` cores: a large upload takes seconds
    of CPU, and here it cannot hold the generators' threads or event loop (the gateway admits
    `restore_concurrency` at a time and queues `restore_queue`)."""

    restore_model = bentoml.models.BentoModel(RESTORE_TAG)
    shipped_restore = bentoml.models.BentoModel(SHIPPED["restore"]) if "restore" in SHIPPED else None
    if AB is not None:
        challenger_restore = bentoml.models.BentoModel(AB["models"]["restore"])

    def __init__(self) -> None:
        import torch

        from serving.inference import ImageRestorer

        install_log_filters()
        torch.set_num_threads(LIMITS.restore_threads)
        from serving.metrics import served_model

        models = {CHAMPION: self.restore_model, **({CHALLENGER: self.challenger_restore} if AB is not None else {})}
        self.variants = {variant: (model, ImageRestorer(Path(model.path), _device())) for variant, model in models.items()}
        for variant, model in models.items():
            served_model("restore", variant, model)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return {
            variant: {"restore": {"tag": str(model.tag), **_labels(model), "task": restorer.task}}
            for variant, (model, restorer) in self.variants.items()
        }

    @bentoml.api
    def restore(self, image_b64: str, seed: int, variant: str = CHAMPION) -> str:
        """The restored image of a validated upload, as a base64 PNG with provenance."""
        from serving.inference import decode_upload, png_bytes
        from serving.metrics import count_images, observe_batch

        observe_batch("restore", 1)  # not batchable: one upload at a time, each on its own core
        model, restorer = self.variants[variant]
        pixels = decode_upload(base64.b64decode(image_b64), max_pixels=LIMITS.restore_max_pixels)
        restored = restorer.restore(pixels)
        count_images("restore", variant, 1)
        meta = {"model": str(model.tag), "params_hash": _labels(model).get("params_hash", ""),
                "seed": str(seed), "task": restorer.task}  # fmt: skip
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


_FEEDBACK_LOG: Any = None
MAX_REMEMBERED = 100_000  # answered requests /feedback can name without reading the log back
MAX_EDITED_CHARS = 4000
ENDPOINT_FAMILY = {"generate_text": "text", "generate_image": "image", "restore_image": "restore"}


def feedback_log() -> Any:
    """`POST /feedback` rows, beside the request log (`feedback-*.parquet` in the same folder)."""
    global _FEEDBACK_LOG
    if _FEEDBACK_LOG is None:
        from serving.request_log import FEEDBACK_SCHEMA, RequestLog

        log = request_log()
        _FEEDBACK_LOG = RequestLog(log.folder, schema=FEEDBACK_SCHEMA, prefix="feedback", flush_seconds=log.flush_seconds)
    return _FEEDBACK_LOG


def failed(ctx: bentoml.Context, err: BaseException) -> None:
    """Name the error of a failing request for the request log (the middleware writes its row); a model
    service's timeout or failure keeps its message, which BentoML would hide as a 5xx."""
    ctx.request.scope[ERROR_KEY] = type(err).__name__
    if isinstance(err, (ModelTimeout, bentoml.exceptions.ServiceUnavailable)):
        ctx.request.scope[MESSAGE_KEY] = str(err)


class ModelTimeout(bentoml.exceptions.BentoMLException):
    error_code = HTTPStatus.GATEWAY_TIMEOUT


# A request's worst case: waiting for a slot, receiving its upload, then the model call (each bounded).
@bentoml.service(name="aigc-gateway", traffic={"timeout": max(TIMEOUTS.values()) * 2 + LIMITS.body_timeout_s + 5})
class Gateway:
    models = bentoml.depends(Models)
    restorer = bentoml.depends(Restorer)
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
        self.feedback_log = feedback_log()
        self.ab = AB
        # Recent answered requests, for /feedback: endpoint, variant, model tag, and (text) the source, which
        # is kept in memory only, and stored only when the user sends back an edited text for it.
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._shadows: set[Any] = set()
        self._described: dict[str, dict[str, Any]] = {}
        HEALTH.probes = lambda: [self.models.is_ready(1), self.restorer.is_ready(1)]

    async def _call(self, service: str, api: str, *args: Any) -> Any:
        """A call to a model service (`models` or `restorer`) within its timeout, retried when its connection
        was closed under it; a `models` call unanswered for a third of the timeout is asked once more.

        Every model API is a pure function of its input, so a retry is safe. About one `models` call in ten
        thousand is never answered under sustained load (a batch lost in BentoML's dispatcher); a text or
        image request costs little, so asking again beats a 504. A restoration is not asked twice: the first
        keeps running in the restorer, and the second would wait behind it. What still fails is a 503
        (connection) or a 504 (no answer within the timeout), in seconds, never a hung request or a 500.
        """
        import asyncio

        import aiohttp
        from bentoml.exceptions import ServiceUnavailable

        timeout = TIMEOUTS[service]
        deadline = time.monotonic() + timeout
        hedge = timeout / 3 if service == "models" else timeout
        method = getattr(getattr(self, service).to_async, api)
        for attempt in range(5):
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(method(*args), max(0.01, min(left, hedge) if attempt == 0 else left))
            except TimeoutError:
                if time.monotonic() >= deadline - 0.01:
                    raise ModelTimeout(f"{service}: no answer within {timeout:g} s; retry") from None
                logger.warning("%s.%s: no answer in %.1f s; asking again", service, api, hedge)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, RuntimeError) as err:
                # aiohttp also reports a connection closed under a response being read as a bare RuntimeError
                if isinstance(err, RuntimeError) and "Connection closed" not in str(err):
                    raise
                if attempt == 4 or time.monotonic() > deadline:
                    raise ServiceUnavailable(f"{service}: connection failed ({type(err).__name__}); retry") from err
                await asyncio.sleep(0.02 * (attempt + 1))
        raise ServiceUnavailable(f"{service}: no answer after 5 tries; retry")

    async def _variant_models(self, service: str, variant: str) -> dict[str, Any]:
        """What `service` (models or restorer) describes of a variant's models, asked once."""
        if service not in self._described:
            self._described[service] = await self._call(service, "describe")
        return self._described[service][variant]

    async def _describe(self, ctx: bentoml.Context, variant: str, family: str) -> dict[str, Any]:
        """What the gateway validates against, from the service that holds `family` (text and image never
        wait on the restorer, nor restoration on the generators); the request is counted under its tag."""
        described = (await self._variant_models("restorer" if family == "restore" else "models", variant))[family]
        ctx.request.scope[MODEL_TAG_KEY] = described["tag"]
        return described

    def _variant(self, ctx: bentoml.Context) -> str:
        """Which variant answers: the champion, unless an A/B split sends this client's share to the challenger.
        Sticky per `x-client-key` header within one test; a request without one is drawn on its own (a seed
        would not do: most clients leave it at its default, and they would all land in one arm)."""
        import random

        from components.common import stable_hash, unit_interval

        variant = CHAMPION
        if self.ab is not None and self.ab["mode"] == SPLIT:
            key = ctx.request.headers.get("x-client-key")
            draw = unit_interval(key, stable_hash(self.ab["at"])) if key else random.random()
            variant = CHALLENGER if draw < self.ab["share"] else CHAMPION
        ctx.request.scope[VARIANT_KEY] = variant
        return variant

    def _remember(self, request_id: str, endpoint: str, variant: str, tag: str, source: str | None = None) -> None:
        self.recent[request_id] = {"endpoint": endpoint, "variant": variant, "model_tag": tag, "source": source}
        while len(self.recent) > MAX_REMEMBERED:
            self.recent.popitem(last=False)

    def _shadow(self, endpoint: str, service: str, api: str, payload: Any, request_id: str, family: str | None = None) -> None:
        """In shadow mode, the challenger answers the same request in the background; only the log sees it."""
        import asyncio

        family = family or ENDPOINT_FAMILY[endpoint]
        if self.ab is None or self.ab["mode"] != SHADOW or family not in self.ab["models"]:
            return  # (a challenger from before diffusion has no diffusion model to shadow with)

        async def run() -> None:
            start, status, error = time.perf_counter(), 200, None
            try:
                await self._call(service, api, *payload)
            except Exception as err:  # the shadow never touches the client's answer
                status, error = 500, type(err).__name__
            self.log.log({"request_id": f"{request_id}-shadow", "endpoint": endpoint, "status": status, "error": error,
                          "variant": SHADOW, "model_tag": self.ab["models"].get(family),
                          "latency_ms": (time.perf_counter() - start) * 1000})  # fmt: skip

        task = asyncio.get_running_loop().create_task(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    def _provenance(self, ctx: bentoml.Context, family: dict[str, Any], seed: int, request_id: str, variant: str) -> None:
        ctx.response.headers["x-variant"] = variant
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
            variant = self._variant(ctx)
            described = await self._describe(ctx, variant, "text")
            model_text = self.delexicaliser.model_source(text) if self.delexicaliser is not None else text
            tokens = len(self.tokenizer(model_text, add_special_tokens=False)["input_ids"])
            room = described["max_length"] - max_new_tokens - 1  # >= 1: the schema caps max_new_tokens
            if tokens > room:
                field = "record" if record is not None else "prompt"
                raise InvalidArgument(f"{field}: {tokens} tokens; at most {room} fit with max_new_tokens={max_new_tokens}")
            request = TextRequest(text, decoding, temperature, top_p, num_beams, max_new_tokens, seed).__dict__
            (output,) = await self._call("models", "generate_text_batch", [{**request, "variant": variant}])
            self._shadow("generate_text", "models", "generate_text_batch", [[{**request, "variant": CHALLENGER}]], request_id)
            self._provenance(ctx, described, seed, request_id, variant)
            self._remember(request_id, "generate_text", variant, described["tag"], source=text)
            self.log.log({
                "request_id": request_id, "endpoint": "generate_text", "status": 200, "variant": variant,
                "model_tag": described["tag"],
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
        generator: Generator | None = None,
    ) -> ImageResult:
        """`n` images of class `label` (one of the trained labels) as base64 PNGs, from the `generator` asked
        for (gan or diffusion), else the served one with the lower FID. The same (label, n, seed, generator)
        gives the same images."""
        try:
            start, request_id = time.perf_counter(), uuid.uuid4().hex
            variant = self._variant(ctx)
            served = await self._variant_models("models", variant)
            kind = generator or served["default_generator"]
            if GENERATOR_FAMILY[kind] not in served:
                raise InvalidArgument(f"generator: no {kind} model is served; use {served['default_generator']}")
            described = await self._describe(ctx, variant, GENERATOR_FAMILY[kind])
            names = described["label_names"]
            if label not in names:
                raise InvalidArgument(f"label: not one of the trained labels {names}")  # the value is not echoed: logs
            request = {**ImageRequest(names.index(label), n, seed).__dict__, "generator": kind}
            (images,) = await self._call("models", "generate_image_batch", [{**request, "variant": variant}])
            self._shadow("generate_image", "models", "generate_image_batch", [[{**request, "variant": CHALLENGER}]], request_id,
                         family=GENERATOR_FAMILY[kind])  # fmt: skip
            self._provenance(ctx, described, seed, request_id, variant)
            self._remember(request_id, "generate_image", variant, described["tag"])
            self.log.log({
                "request_id": request_id, "endpoint": "generate_image", "status": 200, "variant": variant,
                "model_tag": described["tag"],
                "params_hash": described.get("params_hash"), "seed": seed, "label": label, "images": n,
                "latency_ms": (time.perf_counter() - start) * 1000,
            })  # fmt: skip
            return ImageResult(label=label, seed=seed, model=described["tag"], generator=kind, images=images)
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
            import asyncio

            from serving.inference import UploadError, decode_upload
            from serving.request_log import image_log_fields

            start, request_id = time.perf_counter(), uuid.uuid4().hex
            data = await asyncio.to_thread(image.read_bytes)  # off the event loop: text and image share it
            try:
                pixels = await asyncio.to_thread(decode_upload, data, max_pixels=LIMITS.restore_max_pixels)
            except UploadError as err:
                raise InvalidArgument(str(err)) from err
            variant = self._variant(ctx)
            described = await self._describe(ctx, variant, "restore")
            if task is not None and task != described["task"]:
                raise InvalidArgument(f"task: the served restorer does {described['task']!r}, not {task!r}")
            encoded = base64.b64encode(data).decode()
            restored = base64.b64decode(await self._call("restorer", "restore", encoded, 0, variant))
            features = await asyncio.to_thread(image_log_fields, pixels)
            self._shadow("restore_image", "restorer", "restore", [encoded, 0, CHALLENGER], request_id)
            out = Path(ctx.temp_dir) / f"restored-{request_id}.png"
            out.write_bytes(restored)
            self._provenance(ctx, described, 0, request_id, variant)
            self._remember(request_id, "restore_image", variant, described["tag"])
            self.log.log({
                "request_id": request_id, "endpoint": "restore_image", "status": 200, "variant": variant,
                "model_tag": described["tag"],
                "params_hash": described.get("params_hash"), "seed": 0, "task": described["task"],
                "latency_ms": (time.perf_counter() - start) * 1000, **features,
            })  # fmt: skip
            return out
        except Exception as err:
            failed(ctx, err)
            raise

    @bentoml.api
    async def feedback(
        self,
        ctx: bentoml.Context,
        request_id: Annotated[str, Field(min_length=1, max_length=64)],
        rating: Annotated[int, Ge(1), Le(5)] | None = None,
        click: bool | None = None,
        accept: bool | None = None,
        edited_text: Annotated[str, Field(max_length=MAX_EDITED_CHARS)] | None = None,
    ) -> FeedbackResult:
        """What a user did with an answer (its `x-request-id`): a `rating` 1-5, a `click`, `accept` (true) or
        reject (false), or the text as they `edited` it (which becomes a training reference at the next
        retrain). An unknown request id is a 400."""
        import asyncio

        try:
            if rating is None and click is None and accept is None and edited_text is None:
                raise InvalidArgument("rating, click, accept, edited_text: give at least one")
            answered = self.recent.get(request_id) or await asyncio.to_thread(self._logged, request_id)
            if answered is None:
                raise InvalidArgument("request_id: not a request this service answered")
            edited = " ".join(edited_text.split()) if edited_text is not None else None
            if edited is not None and answered["endpoint"] != "generate_text":
                raise InvalidArgument("edited_text: only a generate_text answer can be edited")
            self.feedback_log.log({
                "request_id": request_id, "endpoint": answered["endpoint"], "variant": answered["variant"],
                "model_tag": answered["model_tag"], "rating": rating, "click": click, "accept": accept,
                "edited_text": edited or None, "source": answered.get("source") if edited else None,
            })  # fmt: skip
            return FeedbackResult(request_id=request_id, variant=answered["variant"], stored=True)
        except Exception as err:
            failed(ctx, err)
            raise

    def _logged(self, request_id: str) -> dict[str, Any] | None:
        """An answered request older than the in-memory window (or from before a restart), from the log."""
        import pyarrow as pa
        import pyarrow.dataset as ds
        import pyarrow.parquet as pq

        parts = sorted(str(p) for p in self.log.folder.glob("requests-*.parquet"))
        if not parts:
            return None
        schema = pa.unify_schemas([pq.read_schema(part) for part in parts])  # older parts may lack a column
        condition = (ds.field("request_id") == request_id) & (ds.field("status") == 200)
        dataset = ds.dataset(parts, format="parquet", schema=schema)
        rows = dataset.to_table(filter=condition, columns=["endpoint", "variant", "model_tag"])
        return {**rows.to_pylist()[0], "source": None} if rows.num_rows else None


GUARD_OPTIONS = {"endpoints": endpoints_of(Gateway, ADMISSIONS), "limits": LIMITS, "health": HEALTH,
                 "log_row": lambda row: request_log().log(row)}  # fmt: skip
Gateway.add_asgi_middleware(GuardMiddleware, **GUARD_OPTIONS)
