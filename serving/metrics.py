"""The service's own Prometheus metrics, on the gateway's `/metrics` beside BentoML's.

BentoML runs each service (gateway, models, restorer) in its own processes, all writing prometheus_client's
multiprocess files into one folder (`PROMETHEUS_MULTIPROC_DIR`), and `/metrics` reads them all: a batch size
observed in the models process is scraped from the gateway. prometheus_client picks its storage when it is
first imported, which must be after BentoML has set that folder for the worker, so this module imports it
only when a metric is first used (BentoML's own advice, bentoml/metrics.py).

Every label has a bounded set of values: endpoints, status classes, model tags, variants, reasons, and the
fields of the endpoint's schema (a client's made-up field name is counted as `other`, never as a label).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Collection
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
Function = TypeVar("Function", bound=Callable[..., None])

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# A request refused before any model ran, by the middleware's error class or, for errors raised inside
# BentoML's app, by status; every other 4xx is a validation refusal, named by its field.
REFUSAL_BY_ERROR = {
    "Unauthorized": "auth",
    "PayloadTooLarge": "body_size",
    "Overloaded": "overload",
    "RateLimited": "rate_limit",
    "UnsupportedMediaType": "content_type",
    "RequestTimeout": "body_timeout",
    "ClientDisconnected": "client_gone",
}
REFUSAL_BY_STATUS = {401: "auth", 408: "body_timeout", 413: "body_size", 415: "content_type", 429: "rate_limit"}
OTHER_FIELD = "other"


_created: dict[str, Any] = {}
_creating = threading.Lock()  # the request-log writer thread and the event loop may both be first


def _metrics() -> dict[str, Any]:
    with _creating:
        if not _created:
            _created.update(_create())
    return _created


def _never_raises(function: Function) -> Function:
    """A metric must never fail what it counts (a request, a model batch, the request-log writer): an error
    is logged, and the work goes on uncounted."""

    @functools.wraps(function)
    def counted(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception:
            logger.exception("metrics: %s failed; not counted", function.__name__)

    return counted  # type: ignore[return-value]


def _create() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "requests": Counter(
            "aigc_requests", "API requests answered, by endpoint, status, model tag and A/B variant",
            ["endpoint", "code", "status_class", "model_tag", "variant"],
        ),
        "latency": Histogram(
            "aigc_request_duration_seconds", "API request latency, from the first byte in to the last byte out",
            ["endpoint", "variant"], buckets=LATENCY_BUCKETS,
        ),
        "refusals": Counter(
            "aigc_refusals", "Requests refused before any model ran, by reason (and, for validation, the field)",
            ["endpoint", "reason", "field"],
        ),
        "batch": Histogram(
            "aigc_batch_size", "Requests per call of a model method (adaptive batching)", ["method"], buckets=BATCH_BUCKETS
        ),
        "tokens": Counter("aigc_generated_tokens", "Tokens of generated texts (the served tokenizer's count)", ["variant"]),
        "images": Counter("aigc_generated_images", "Images generated or restored", ["method", "variant"]),
        "log_rows": Counter("aigc_request_log_rows", "Request-log rows written or dropped", ["log", "outcome"]),
        # Info metrics are a gauge at 1 in multiprocess mode (prometheus_client's Info is not supported there).
        "model": Gauge(
            "aigc_model_info", "The served models: one series per family and variant, labelled with its tag",
            ["family", "variant", "tag", "params_hash", "data_hash"], multiprocess_mode="livemax",
        ),
        "model_created": Gauge(
            "aigc_model_created_timestamp_seconds", "When the served model entered the model store (Unix time)",
            ["family", "variant", "tag"], multiprocess_mode="livemax",
        ),
    }  # fmt: skip


def status_class(status: int) -> str:
    return f"{status // 100}xx"


def refusal_reason(status: int, error: str | None) -> str | None:
    """Why a request was refused before any model ran; None when it was answered or failed (a 5xx)."""
    if error in REFUSAL_BY_ERROR:
        return REFUSAL_BY_ERROR[error]
    if not 400 <= status < 500:
        return None
    return REFUSAL_BY_STATUS.get(status, "validation")


def refused_field(message: str, fields: Collection[str]) -> str:
    """The input field a validation message (`<field>: <reason>`) names, when it is one of `fields`; a nested
    one (`record.key`) counts as its top-level field, `body` as itself, anything else as `other`."""
    head = message.partition(":")[0].split(",")[0].strip()
    head = head.removeprefix("body.").split(".")[0].split("[")[0]
    return head if head in fields or head == "body" else OTHER_FIELD


@_never_raises
def count_request(
    endpoint: str, status: int, seconds: float, variant: str | None, model_tag: str | None,
    error: str | None = None, message: str = "", fields: Collection[str] = (),
) -> None:  # fmt: skip
    """One API request: its count and latency, and its refusal reason when it was refused."""
    metrics = _metrics()
    variant = variant or ""
    metrics["requests"].labels(endpoint, str(status), status_class(status), model_tag or "", variant).inc()
    metrics["latency"].labels(endpoint, variant).observe(seconds)
    reason = refusal_reason(status, error)
    if reason is not None:
        field = refused_field(message, fields) if reason == "validation" else ""
        metrics["refusals"].labels(endpoint, reason, field).inc()


@_never_raises
def observe_batch(method: str, size: int) -> None:
    _metrics()["batch"].labels(method).observe(size)


@_never_raises
def count_tokens(variant: str, tokens: int) -> None:
    _metrics()["tokens"].labels(variant).inc(tokens)


@_never_raises
def count_images(method: str, variant: str, images: int) -> None:
    _metrics()["images"].labels(method, variant).inc(images)


@_never_raises
def count_log_rows(log: str, outcome: str, rows: int) -> None:
    """`outcome`: written, or dropped (a full queue, or a part that could not be written). Counting 0 creates
    the series, so the first drop is an increase an alert can see, not a series born at its value."""
    _metrics()["log_rows"].labels(log, outcome).inc(rows)


@_never_raises
def served_model(family: str, variant: str, model: Any) -> None:
    """Publish one served BentoML model: its tag and provenance, and when it entered the store."""
    labels = model.info.labels or {}
    tag = str(model.tag)
    metrics = _metrics()
    metrics["model"].labels(family, variant, tag, str(labels.get("params_hash", "")), str(labels.get("data_hash", ""))).set(1)
    metrics["model_created"].labels(family, variant, tag).set(model.info.creation_time.timestamp())
