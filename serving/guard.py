"""What stands in front of the gateway's endpoints, as one ASGI middleware, and the limits it enforces.

Order of checks on an API request, each answered before any work is done:
auth (401) → per-client rate (429, optional) → body size (413) → content type (415) → admission (503 with
`Retry-After` when the endpoint's running and waiting requests are full) → a multipart body read and checked
field by field (400) → the endpoint. Every error leaves as one JSON shape, `{"error": "<field>: <reason>"}`
(the OpenAPI error schema), whatever raised it: BentoML answers some 4xx as a list or with pydantic's error
list, and a malformed multipart body or a file under the wrong field as a 500.

Metrics: every API request is counted by endpoint, status, model tag and variant, timed, and, when refused,
counted by reason (serving/metrics.py). `/metrics` is open like the health endpoints, for a scraper; with
`AIGC_METRICS_KEY` set it takes `Authorization: Bearer <that key>` (a key of its own, so a scraper never holds
the API's).

Health that means something: `/readyz` probes every model service and answers within `ready_timeout_s`
(503 while one is down or not answering); `/livez` (and `/healthz`) fail once a model service has been down
for `liveness_grace_s`, so a liveness probe restarts a frozen worker that readiness alone would only hide.

Logs carry no personal data: a client error is one INFO line with the field and the reason (never the value),
BentoML's traceback for it is dropped, and every log record of the process passes a scrubber (e-mail
addresses, card and phone numbers) as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any

logger = logging.getLogger(__name__)

JSON_TYPES = ("application/json",)
MULTIPART = "multipart/form-data"
# Set in the ASGI scope by the endpoints: the class of the error that failed a request, the variant chosen
# for it (an error during an A/B test belongs to one arm), a message for a 5xx (BentoML hides them), and the
# tag of the model that answered.
ERROR_KEY, VARIANT_KEY, MESSAGE_KEY, MODEL_TAG_KEY = "aigc.error", "aigc.variant", "aigc.message", "aigc.model_tag"


@dataclass(frozen=True)
class Limits:
    """The service's limits; each is an environment variable `AIGC_<NAME>` (e.g. AIGC_RESTORE_MAX_PIXELS)."""

    max_body_bytes: int = 8 * 1024 * 1024  # refused with 413 before the body is read
    restore_max_pixels: int = 1024 * 1024  # ~3 s of one CPU core for the default restorer
    restore_threads: int = 1  # torch threads of the restorer service
    restore_concurrency: int = 1  # restorations running at once (each on its own core, in its own service)
    restore_queue: int = 1  # waiting for a slot (0: none); the next one gets 503 + Retry-After
    generate_concurrency: int = 32  # text / image requests at the models at once, per endpoint (= a batch)
    generate_queue: int = 224
    generate_timeout_s: float = 15.0  # waiting for a slot at most this (then 503), the model call too (then 504)
    restore_timeout_s: float = 30.0
    body_timeout_s: float = 10.0  # an upload must arrive within this, or 408 (it holds its slot meanwhile)
    ready_timeout_s: float = 0.8  # /readyz answers within this, 503 when a model service has not
    liveness_grace_s: float = 60.0  # /livez fails when a model service has been down this long
    rate_limit_per_s: float = 0.0  # per client address, 0 = off; over it: 429 + Retry-After
    rate_burst: int = 20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        values: dict[str, Any] = {}
        for spec in fields(cls):
            name = f"AIGC_{spec.name.upper()}"
            if environ.get(name, "").strip():
                kind = int if spec.type == "int" else float
                try:
                    values[spec.name] = kind(environ[name])
                except ValueError:
                    raise SystemExit(f"aigc service: {name}={environ[name]!r} is not a number") from None
                zero_ok = spec.name in ("rate_limit_per_s", "restore_queue", "generate_queue")
                if values[spec.name] < 0 or (values[spec.name] == 0 and not zero_ok):
                    raise SystemExit(f"aigc service: {name} must be positive, got {environ[name]}")
        return cls(**values)


class Overloaded(Exception):
    """A request refused before any work, with how long to wait (seconds) before trying again."""

    def __init__(self, reason: str, retry_after: int, status: int = 503) -> None:
        super().__init__(reason)
        self.retry_after, self.status = retry_after, status


class Admission:
    """Requests of one endpoint that may run at once and wait for a slot; beyond that, refused at once.

    The answer to a refused request says when to retry: the mean time of a request so far, times the
    requests ahead of it per slot.
    """

    def __init__(self, concurrency: int, queue: int, wait_s: float) -> None:
        self.concurrency, self.limit, self.wait_s = concurrency, concurrency + queue, wait_s
        self.inside = 0
        self.shed = 0
        self._slots: asyncio.Semaphore | None = None
        self._mean_s = 1.0

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s * max(1, self.inside) / self.concurrency))

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        if self.inside >= self.limit:
            self.shed += 1
            raise Overloaded(f"busy: {self.inside} requests running or waiting; retry later", self.retry_after())
        self.inside += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self.wait_s)
            except TimeoutError:
                self.shed += 1
                raise Overloaded(f"busy: no slot within {self.wait_s:g} s; retry later", self.retry_after()) from None
            start = time.monotonic()
            try:
                yield
            finally:
                self._slots.release()
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.monotonic() - start)
        finally:
            self.inside -= 1


class RateLimit:
    """A token bucket per client: `rate` requests a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> None:
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            raise Overloaded("rate: over this client's request rate", math.ceil((1 - tokens) / self.rate), status=429)
        self._buckets[client] = (tokens - 1, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)


class Health:
    """Readiness and liveness from probes of the model services, each answered within `timeout_s`."""

    def __init__(self, timeout_s: float, grace_s: float) -> None:
        self.timeout_s, self.grace_s = timeout_s, grace_s
        self.probes: Callable[[], list[Awaitable[bool]]] | None = None  # bound by the gateway once it runs
        self.down_since: float | None = None

    async def ready(self) -> tuple[bool, str]:
        if self.probes is None:
            return False, "starting"
        try:
            answers = await asyncio.wait_for(asyncio.gather(*self.probes(), return_exceptions=True), self.timeout_s)
            ok = all(answer is True for answer in answers)
            reason = "ready" if ok else "a model service is down"
        except TimeoutError:
            ok, reason = False, f"a model service did not answer in {self.timeout_s:g} s"
        if ok:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = time.monotonic()
        return ok, reason

    async def alive(self) -> tuple[bool, str]:
        ok, reason = await self.ready()
        if ok or self.probes is None or self.down_since is None:
            return True, "alive"
        down_for = time.monotonic() - self.down_since
        return down_for < self.grace_s, f"{reason}, for {down_for:.0f} s (grace {self.grace_s:g} s)"


@dataclass(frozen=True)
class Endpoint:
    """How one API endpoint takes its body: JSON, or multipart with these file and text fields."""

    name: str
    file_fields: tuple[str, ...] = ()
    text_fields: tuple[str, ...] = ()
    admission: Admission | None = None
    fields: tuple[str, ...] = ()  # every input field, whatever the body's type (refusals are counted by field)

    @property
    def media_type(self) -> str:
        return MULTIPART if self.file_fields else JSON_TYPES[0]


def endpoints_of(service: Any, admissions: Mapping[str, Admission]) -> dict[str, Endpoint]:
    """Each API route of a BentoML service, with its fields as BentoML parses them (files are multipart)."""
    table = {}
    for name, method in service.apis.items():
        spec = method.input_spec
        files = tuple(getattr(spec, "multipart_fields", ()) or ())
        texts = tuple(k for k in spec.model_fields if k not in files) if files else ()
        table[method.route] = Endpoint(name, files, texts, admissions.get(name), tuple(spec.model_fields))
    return table


class BadRequest(Exception):
    def __init__(self, status: int, message: str, error: str) -> None:
        super().__init__(message)
        self.status, self.error = status, error


def check_content_type(endpoint: Endpoint, content_type: str) -> None:
    media = content_type.split(";")[0].strip().lower()
    if endpoint.file_fields:
        if media != MULTIPART:
            message = f"content-type: {endpoint.name} takes {MULTIPART}, not {media or 'none'}"
            raise BadRequest(415, message, "UnsupportedMediaType")
        if "boundary=" not in content_type.lower():
            raise BadRequest(400, "content-type: multipart/form-data without a boundary", "MalformedMultipart")
    elif media and media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        raise BadRequest(415, f"content-type: {endpoint.name} takes application/json, not {media}", "UnsupportedMediaType")


async def check_multipart(endpoint: Endpoint, scope: dict[str, Any], body: bytes) -> None:
    """A multipart body parses, names only the endpoint's fields, has each file field once as a file and
    each text field as text (BentoML would fetch a URL given as text for a file field)."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    try:
        form = await Request(scope, _replay(body)).form(max_files=len(endpoint.file_fields), max_fields=16)
    except Exception as err:  # starlette answers HTTPException, python-multipart its own errors
        reason = getattr(err, "detail", None) or type(err).__name__
        raise BadRequest(400, f"body: malformed multipart/form-data ({reason})", "MalformedMultipart") from None
    try:
        known = (*endpoint.file_fields, *endpoint.text_fields)
        for key, value in form.multi_items():
            if key not in known:
                takes = ", ".join(known)
                raise BadRequest(400, f"{printable(key)}: not a field of {endpoint.name} (it takes {takes})", "UnknownField")
            if key in endpoint.file_fields and not isinstance(value, UploadFile):
                raise BadRequest(400, f"{key}: must be a file part, not text", "InvalidField")
            if key in endpoint.text_fields and isinstance(value, UploadFile):
                raise BadRequest(400, f"{key}: must be text, not a file", "InvalidField")
        for key in endpoint.file_fields:
            count = len(form.getlist(key))
            if count != 1:
                raise BadRequest(400, f"{key}: {'missing' if count == 0 else 'given more than once'}", "InvalidField")
    finally:
        await form.close()


def printable(name: str, limit: int = 64) -> str:
    """A client-chosen field name as it may appear in a message and a log line: one line, short."""
    name = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)
    return name if len(name) <= limit else f"{name[:limit]}…"


def error_message(status: int, body: bytes) -> str:
    """The one message of an error response, whatever shape BentoML or Starlette gave it: pydantic errors
    become `field: reason` (their input values are not included)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:500] or HTTPStatus(status).phrase
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # BentoML answers a 4xx BentoMLException as a one-element list
    if isinstance(data, dict):
        detail = data.get("detail")
        if isinstance(detail, list) and detail:
            errors = [e for e in detail if isinstance(e, dict)]
            fields = [printable(".".join(str(part) for part in e.get("loc", ())) or "body") for e in errors]
            return "; ".join(f"{field}: {e.get('msg', 'invalid')}" for field, e in zip(fields, errors, strict=True))
        if data.get("error"):
            return str(data["error"])
        if detail:
            return str(detail)
    return HTTPStatus(status).phrase


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}
# A 503 carries Retry-After only when the request was shed before any work; OpenAPI cannot say "sometimes" of
# a header but through its description.


def document_errors(spec: dict[str, Any], endpoints: Mapping[str, Endpoint], api_key: bool, rate_limited: bool) -> dict[str, Any]:
    """The OpenAPI document with every error an endpoint can answer, in the one error shape: BentoML
    documents 400, 404 and 500 only."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    message = {"type": "string", "title": "Message", "description": "<field>: <reason>"}
    schemas["Error"] = {"type": "object", "title": "Error", "required": ["error"], "properties": {"error": message}}
    errors = {
        "413": "The body is over the size limit.",
        "415": "The endpoint does not take this content type.",
        "503": "Busy (with Retry-After: running and waiting requests are full, nothing was done), or a model service is down.",
        "504": "A model service did not answer in time.",
    }
    if api_key:
        errors["401"] = "Missing or wrong bearer token."
    if rate_limited:
        errors["429"] = "Over this client's request rate: retry after Retry-After seconds."
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for route, endpoint in endpoints.items():
        operation = spec.get("paths", {}).get(route, {}).get("post")
        if operation is None:
            continue
        uploads = {"408": "The upload did not arrive within the body timeout."} if endpoint.file_fields else {}
        for status, description in {**errors, **uploads}.items():
            response: dict[str, Any] = {"description": description, "content": content}
            if status == "429":
                response["headers"] = RETRY_AFTER
            operation.setdefault("responses", {}).setdefault(status, response)
    return spec


async def send_json(send: Any, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
    payload = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class GuardMiddleware:
    """The gateway's ASGI middleware (module docstring); `log_row` writes a request-log row for every API
    request that ends in a 4xx or 5xx (answered ones are logged by their endpoint, with their features)."""

    def __init__(
        self, app: Any, endpoints: Mapping[str, Endpoint], limits: Limits, health: Health,
        log_row: Callable[[dict[str, Any]], None],
    ) -> None:  # fmt: skip
        self.app, self.endpoints, self.limits, self.health, self.log_row = app, endpoints, limits, health, log_row
        self.api_key = os.environ.get("AIGC_API_KEY") or None
        self.metrics_key = os.environ.get("AIGC_METRICS_KEY") or None
        self.rate = RateLimit(limits.rate_limit_per_s, limits.rate_burst) if limits.rate_limit_per_s > 0 else None
        install_log_filters()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in ("/readyz", "/livez", "/healthz"):
            ok, reason = await (self.health.ready() if path == "/readyz" else self.health.alive())
            if ok:
                await _plain(send, reason)
            else:
                await send_json(send, 503, reason)
            return
        if path == "/docs.json":
            await self._documented(scope, receive, send)
            return
        if path == "/metrics" and self.metrics_key and not _bearer_matches(_headers(scope), self.metrics_key):
            await send_json(
                send, 401, "authorization: missing or wrong bearer token (AIGC_METRICS_KEY)", {"www-authenticate": "Bearer"}
            )
            return
        endpoint = self.endpoints.get(path)
        if endpoint is None or scope.get("method") != "POST":  # health, docs, metrics, UI: open, and not ours to check
            await self.app(scope, receive, send)
            return
        start, status, message, error = time.perf_counter(), 500, "", None
        try:
            status, message, error = await self._guarded(endpoint, scope, receive, send)
        except BaseException as err:  # logged as the 500 the client sees, then raised to the server as before
            error = type(err).__name__
            raise
        finally:
            seconds = time.perf_counter() - start
            if status >= 400:
                error = scope.get(ERROR_KEY) or error or f"HTTP{status}"
                if status < 500:
                    logger.info("%s %d %s: %s", path, status, error, message)
                self.log_row({"request_id": uuid.uuid4().hex, "endpoint": endpoint.name, "status": status,
                              "latency_ms": seconds * 1000, "error": error, "variant": scope.get(VARIANT_KEY)})  # fmt: skip
            self._count(endpoint, status, seconds, scope, error, message)

    def _count(
        self, endpoint: Endpoint, status: int, seconds: float, scope: dict[str, Any], error: str | None, message: str
    ) -> None:
        from serving.metrics import count_request  # never raises: a metric must not fail the request it counts

        count_request(endpoint.name, status, seconds, scope.get(VARIANT_KEY), scope.get(MODEL_TAG_KEY), error, message,
                      endpoint.fields)  # fmt: skip

    async def _guarded(self, endpoint: Endpoint, scope: dict[str, Any], receive: Any, send: Any) -> tuple[int, str, str | None]:
        headers = _headers(scope)
        body_read = False
        try:
            self._authorise(headers)
            if sum(key.lower() == b"content-type" for key, _ in scope.get("headers", [])) > 1:
                raise BadRequest(400, "content-type: given more than once", "InvalidHeader")
            if self.rate is not None:  # by address: a token is shared by many clients, or made up per request
                self.rate.take((scope.get("client") or ("?",))[0])
            length, limit = headers.get("content-length", ""), self.limits.max_body_bytes
            if length.isdigit() and int(length) > limit:
                raise BadRequest(413, f"body: {int(length)} bytes is over the limit of {limit}", "PayloadTooLarge")
            check_content_type(endpoint, headers.get("content-type", ""))
            admitted = endpoint.admission.admit() if endpoint.admission is not None else contextlib.nullcontext()
            async with admitted:
                if endpoint.file_fields:
                    body_read = True  # from here on, read (or given up on) by _read_body
                    body = await self._read_body(receive, self.limits.body_timeout_s)
                    await check_multipart(endpoint, scope, body)
                    receive = _replay(body)
                return await self._respond(scope, self._limited(receive), send)
        except BadRequest as err:
            if not body_read and err.status != 413:
                await self._discard_body(receive)
            extra = {"www-authenticate": "Bearer"} if err.status == 401 else {}
            await send_json(send, err.status, str(err), extra)
            return err.status, str(err), err.error
        except Overloaded as err:
            if not body_read:
                await self._discard_body(receive)
            await send_json(send, err.status, str(err), {"retry-after": str(err.retry_after)})
            return err.status, str(err), "RateLimited" if err.status == 429 else "Overloaded"

    async def _documented(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """BentoML's OpenAPI document, with the errors it leaves out (document_errors)."""
        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def collect(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        body = b"".join(chunks)
        if start.get("status") == 200:
            spec = document_errors(json.loads(body), self.endpoints, bool(self.api_key), self.rate is not None)
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({"type": "http.response.start", "status": start.get("status", 500),
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    def _authorise(self, headers: Mapping[str, str]) -> None:
        """The bearer token, when the service has one (the scheme's name is case-insensitive, RFC 9110)."""
        if self.api_key and not _bearer_matches(headers, self.api_key):
            raise BadRequest(401, "authorization: missing or wrong bearer token", "Unauthorized")

    async def _discard_body(self, receive: Any) -> None:
        """Read and drop the body of a request refused before reading it (shed, unauthorised, wrong type).

        Answered with its upload still unread, the connection cannot be reused, and the server closes it with
        the upload's rest in the socket's buffer: the kernel then resets it, which can destroy the refusal in
        flight, so the client sees a read error instead of its 503. Reading costs no decoding, and stops at
        the size limit or the body timeout (a slow sender then gets its refusal on a closed connection)."""
        size, deadline = 0, time.monotonic() + self.limits.body_timeout_s
        while size <= self.limits.max_body_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))

    async def _read_body(self, receive: Any, seconds: float) -> bytes:
        """The whole body, within `seconds`: a slow uploader must not hold a slot of a heavy endpoint."""
        chunks, size = [], 0
        deadline = time.monotonic() + seconds
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise BadRequest(408, f"body: not received within {seconds:g} s", "RequestTimeout") from None
            if message["type"] == "http.disconnect":
                raise BadRequest(400, "body: the client went away before sending it", "ClientDisconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise BadRequest(413, f"body: over the limit of {self.limits.max_body_bytes} bytes", "PayloadTooLarge")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _limited(self, receive: Any) -> Any:
        """`receive`, refusing a body that grows past the limit without declaring its length."""
        received = 0

        async def limited() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_body_bytes:
                    from bentoml.exceptions import BentoMLException  # raised inside BentoML's app: its error type

                    too_large = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
                    raise BentoMLException(f"body: over the limit of {self.limits.max_body_bytes} bytes", error_code=too_large)
            return message

        return limited

    async def _respond(self, scope: dict[str, Any], receive: Any, send: Any) -> tuple[int, str, str | None]:
        """Run the endpoint; an error response is rewritten into the one error shape."""
        status, held, chunks = 200, None, []

        async def normalising_send(message: dict[str, Any]) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status < 400:
                    await send(message)
                else:
                    held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            text = scope.get(MESSAGE_KEY) or error_message(status, b"".join(chunks))
            chunks.clear()
            chunks.append(text.encode())
            drop = {b"content-type", b"content-length"}
            extra = {k.decode("latin-1"): v.decode("latin-1") for k, v in held["headers"] if k.lower() not in drop}
            await send_json(send, status, text, extra)

        await self.app(scope, receive, normalising_send)
        return status, b"".join(chunks).decode() if held is not None else "", None


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers, names lower-cased; the first of a repeated header, as Starlette reads it."""
    headers: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _bearer_matches(headers: Mapping[str, str], key: str) -> bool:
    """The bearer token is `key` (the scheme's name is case-insensitive, RFC 9110; compared in constant time)."""
    scheme, _, token = headers.get("authorization", "").strip().partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    return hmac.compare_digest(token.encode(), key.encode())


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # as a real connection does: nothing more until the client leaves
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _plain(send: Any, text: str) -> None:
    payload = f"{text}\n".encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


# ---- logs without personal data ---------------------------------------------------------------------------

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\w.])\d(?:[ -]?\d){12,18}(?![\w.])")
PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w.])")


def scrub(text: str) -> str:
    """`text` with e-mail addresses, card-like and phone-like numbers replaced by a placeholder."""
    return PHONE.sub("[phone]", CARD.sub("[card]", EMAIL.sub("[email]", text)))


def _is_client_error(record: logging.LogRecord) -> bool:
    """BentoML logs a traceback at ERROR for every 4xx it raises; that traceback quotes the input."""
    if not record.exc_info or record.exc_info[1] is None:
        return False
    err = record.exc_info[1]
    if type(err).__name__ == "ValidationError":  # pydantic's
        return True
    code = getattr(getattr(err, "error_code", None), "value", None)
    return isinstance(code, int) and 400 <= code < 500


class _DropClientErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "aigc_client_error", False) and not _is_client_error(record)


_installed = False


def install_log_filters() -> None:
    """Once per process: drop BentoML's 4xx tracebacks (the middleware logs one line instead), and scrub
    every log record as it is made, traceback included (a record factory reaches every logger and handler)."""
    global _installed
    if _installed:
        return
    _installed = True
    logging.getLogger("bentoml._internal.server.http_app").addFilter(_DropClientErrorTracebacks())
    logger.setLevel(logging.INFO)  # BentoML sets its own loggers to INFO, not ours: the client-error lines
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = scrub(record.getMessage()), None
            if record.exc_info and record.exc_info[1] is not None:
                record.aigc_client_error = _is_client_error(record)  # the filter decides after the scrub
                import traceback

                record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
                record.exc_info = None
        except Exception:  # a record that cannot be formatted is left to the handler, as logging would
            pass
        return record

    logging.setLogRecordFactory(scrubbed_record)
