"""How the service's metrics name a request's refusal: bounded labels whatever the client sends."""

from __future__ import annotations

import logging

import pytest

from serving.metrics import OTHER_FIELD, count_request, refusal_reason, refused_field, status_class

FIELDS = ("record", "prompt", "seed", "max_new_tokens")


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (200, None, None),
        (401, "Unauthorized", "auth"),
        (413, None, "body_size"),  # raised inside BentoML's app: known by its status alone
        (415, "UnsupportedMediaType", "content_type"),
        (503, "Overloaded", "overload"),  # shed before any work; a model service down is a failure
        (503, "ServiceUnavailable", None),
        (504, "ModelTimeout", None),
        (429, "RateLimited", "rate_limit"),
        (400, "InvalidArgument", "validation"),
        (422, "ValidationError", "validation"),
    ],
)
def test_refusals_are_named_by_reason_and_failures_are_not_refusals(status: int, error: str | None, reason: str | None) -> None:
    assert refusal_reason(status, error) == reason


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ("seed: Input should be greater than or equal to 0", "seed"),
        ("record.colour: Extra inputs are not permitted", "record"),
        ("body.max_new_tokens: too large", "max_new_tokens"),
        ("record, prompt: give exactly one of them", "record"),
        ("body: malformed multipart/form-data (boundary)", "body"),
        ("x" * 500 + ": a made-up field", OTHER_FIELD),
        ("drop table users; --: not a field", OTHER_FIELD),
        ("", OTHER_FIELD),
    ],
)
def test_a_validation_refusal_is_counted_under_a_schema_field_or_other(message: str, field: str) -> None:
    assert refused_field(message, FIELDS) == field


def test_status_classes() -> None:
    assert [status_class(s) for s in (200, 401, 503)] == ["2xx", "4xx", "5xx"]


def test_a_metric_that_fails_is_logged_and_never_fails_what_it_counts(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="serving.metrics"):
        count_request("generate_text", "not a status", 0.1, "champion", "aigc-text:x")  # type: ignore[arg-type]
    assert "metrics: count_request failed; not counted" in caplog.text
