"""The service's request log for monitoring: one row per request, written off the response path.

Rows go into a bounded in-memory queue (`log` never blocks: when the writer falls behind, rows are dropped and
counted, never the request, here and in the `aigc_request_log_rows_total` metric); a background thread writes
them as Parquet parts under the log folder, `requests-<UTC time>-<n>.parquet`, one part per flush (every
`flush_rows` rows or `flush_seconds`), keeping the newest `max_files` parts. Rows hold features (the same
definitions as the `features` stage's drift reference, `components.feature_defs`), an output summary, latency
and the model tag: never raw prompts, raw images or free-text attribute values. Which record attributes are
logged (`attr_<key>` columns) comes from the served model's record schema: its categorical keys
(components.records.infer_schema).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger(__name__)

BASE_SCHEMA = pa.schema(
    [
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("endpoint", pa.string()),
        ("status", pa.int32()),
        ("latency_ms", pa.float64()),
        ("model_tag", pa.string()),
        ("variant", pa.string()),  # champion, challenger (an A/B split) or shadow (run beside, never returned)
        ("params_hash", pa.string()),
        ("seed", pa.int64()),
        # text requests
        ("source_chars", pa.int64()),
        ("source_tokens", pa.int64()),
        ("num_attributes", pa.int64()),
        ("oov_share", pa.float64()),
        ("decoding", pa.string()),
        ("output_chars", pa.int64()),
        # image generation requests
        ("label", pa.string()),
        ("images", pa.int64()),
        # restoration requests (features of the upload)
        ("width", pa.float64()),
        ("height", pa.float64()),
        ("brightness", pa.float64()),
        ("contrast", pa.float64()),
        ("sharpness", pa.float64()),
        ("task", pa.string()),
        ("error", pa.string()),
    ]
)
BASE_COLUMNS = tuple(BASE_SCHEMA.names)
FEEDBACK_SCHEMA = pa.schema(
    [
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("request_id", pa.string()),
        ("endpoint", pa.string()),
        ("variant", pa.string()),
        ("model_tag", pa.string()),
        ("rating", pa.int32()),  # 1-5
        ("click", pa.bool_()),
        ("accept", pa.bool_()),
        # A user's corrected text and the source it was written for: the only raw text kept, because the
        # user handed it back to become a training reference (monitoring/landing.py turns it into one).
        ("edited_text", pa.string()),
        ("source", pa.string()),
    ]
)
"""Rows of `POST /feedback`, written beside the request log by the same writer (files `feedback-*.parquet`)."""


def log_schema(attributes: tuple[str, ...] = ()) -> pa.Schema:
    """The log's columns: the base ones, then `attr_<key>` for each logged record attribute."""
    from components.feature_defs import attribute_column

    return pa.schema([*BASE_SCHEMA, *[pa.field(attribute_column(key), pa.string()) for key in attributes]])


class RequestLog:
    def __init__(
        self, folder: Path, attributes: tuple[str, ...] = (), flush_rows: int = 256, flush_seconds: float = 5.0,
        max_files: int = 1000, max_queue: int = 100_000, schema: pa.Schema | None = None, prefix: str = "requests",
    ) -> None:  # fmt: skip
        self.folder = folder
        self.prefix = prefix
        self.schema = schema if schema is not None else log_schema(attributes)
        self.columns = tuple(self.schema.names)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.max_files = max_files
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=max_queue)
        self._parts = 0
        from serving.metrics import count_log_rows

        for outcome in ("written", "dropped"):
            count_log_rows(prefix, outcome, 0)
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def log(self, row: dict[str, Any]) -> None:
        """Queue one row (unknown keys are an error in the caller, caught here as a bug, not at write time)."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"request log has no column(s) {sorted(unknown)}")
        row.setdefault("timestamp", datetime.now(UTC))
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._drop(1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("request log queue full: %d rows dropped so far", self.dropped)

    def _drop(self, rows: int) -> None:
        from serving.metrics import count_log_rows

        self.dropped += rows
        count_log_rows(self.prefix, "dropped", rows)

    def close(self, timeout: float = 10.0) -> None:
        """Flush what is queued and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                item = ...
            if item is None:
                self._flush(pending)
                return
            if item is not ...:
                pending.append(item)  # type: ignore[arg-type]
            if len(pending) >= self.flush_rows or time.monotonic() >= deadline:
                self._flush(pending)
                pending = []
                deadline = time.monotonic() + self.flush_seconds

    def _flush(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        from components.tables import write_parquet_atomic
        from serving.metrics import count_log_rows

        try:
            table = pa.Table.from_pylist([{c: r.get(c) for c in self.columns} for r in rows], schema=self.schema)
            self._parts += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            write_parquet_atomic(table, self.folder / f"{self.prefix}-{stamp}-{self._parts:06d}.parquet")
        except Exception:  # the log must never take the service down
            self._drop(len(rows))
            log.exception("could not write %d request log rows", len(rows))
            return
        count_log_rows(self.prefix, "written", len(rows))
        try:
            parts = sorted(self.folder.glob(f"{self.prefix}-*.parquet"))
            for old in parts[: max(0, len(parts) - self.max_files)]:
                old.unlink(missing_ok=True)
        except OSError:
            log.exception("could not remove old request log parts")


def text_log_fields(
    prompt: str,
    prompt_tokens: int,
    vocabulary: frozenset[str] | None = None,
    attributes: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """The drift features of a text request: the categorical attributes (values training never saw as
    `(other)`), no free-text values."""
    from components.feature_defs import text_features

    features = text_features(prompt, prompt_tokens, vocabulary=vocabulary, attributes=attributes)
    return {k: v for k, v in features.items() if k not in ("reference_chars", "reference_tokens")}


def image_log_fields(pixels: Any) -> dict[str, Any]:
    from components.feature_defs import image_features

    return image_features(pixels)
