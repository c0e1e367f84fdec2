"""The gateway's guard on its own: limits, admission, rate limits, error shapes and the log scrubber (no server)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from serving.guard import (
    Admission,
    BadRequest,
    Endpoint,
    GuardMiddleware,
    Health,
    Limits,
    Overloaded,
    RateLimit,
    check_content_type,
    error_message,
    install_log_filters,
    printable,
    scrub,
)


def test_limits_come_from_the_environment_and_bad_values_are_one_line() -> None:
    limits = Limits.from_env({"AIGC_RESTORE_MAX_PIXELS": "4096", "AIGC_GENERATE_TIMEOUT_S": "2.5"})
    assert (limits.restore_max_pixels, limits.generate_timeout_s, limits.restore_concurrency) == (4096, 2.5, 1)
    with pytest.raises(SystemExit, match="AIGC_RESTORE_CONCURRENCY='two' is not a number"):
        Limits.from_env({"AIGC_RESTORE_CONCURRENCY": "two"})
    with pytest.raises(SystemExit, match="AIGC_RESTORE_QUEUE must be positive"):
        Limits.from_env({"AIGC_RESTORE_QUEUE": "-1"})
    assert Limits.from_env({"AIGC_RATE_LIMIT_PER_S": "0"}).rate_limit_per_s == 0  # 0: off
    assert Limits.from_env({"AIGC_RESTORE_QUEUE": "0"}).restore_queue == 0  # no waiting
    with pytest.raises(SystemExit, match="AIGC_RESTORE_CONCURRENCY must be positive"):
        Limits.from_env({"AIGC_RESTORE_CONCURRENCY": "0"})


def test_admission_runs_queues_then_sheds_before_any_work() -> None:
    async def scenario() -> tuple[list[str], int]:
        admission = Admission(concurrency=1, queue=1, wait_s=5)
        release = asyncio.Event()
        outcomes: list[str] = []

        async def request(name: str) -> None:
            try:
                async with admission.admit():
                    outcomes.append(f"{name} ran")
                    await release.wait()
            except Overloaded as err:
                assert err.status == 503 and err.retry_after >= 1
                outcomes.append(f"{name} shed")

        first, second = asyncio.create_task(request("first")), asyncio.create_task(request("second"))
        await asyncio.sleep(0.05)
        await request("third")  # one running, one waiting: refused at once
        release.set()
        await asyncio.gather(first, second)
        return outcomes, admission.shed

    outcomes, shed = asyncio.run(scenario())
    assert outcomes == ["first ran", "third shed", "second ran"] and shed == 1


def test_a_request_that_waits_too_long_for_a_slot_is_shed() -> None:
    async def scenario() -> None:
        admission = Admission(concurrency=1, queue=5, wait_s=0.1)
        async with admission.admit():
            with pytest.raises(Overloaded, match="no slot within 0.1 s"):
                async with admission.admit():
                    pass

    asyncio.run(scenario())


def test_rate_limit_per_client_answers_429_with_retry_after() -> None:
    limit = RateLimit(rate=1.0, burst=2)
    limit.take("a")
    limit.take("a")
    with pytest.raises(Overloaded) as refused:
        limit.take("a")
    assert refused.value.status == 429 and refused.value.retry_after == 1
    limit.take("b")  # another client has its own bucket


def test_health_is_not_ready_while_a_probe_hangs_and_dead_only_after_the_grace() -> None:
    async def scenario() -> None:
        health = Health(timeout_s=0.2, grace_s=0.5)
        assert (await health.ready())[0] is False  # starting: nothing bound yet
        assert (await health.alive())[0] is True

        async def hangs() -> bool:
            await asyncio.sleep(30)
            return True

        async def answers() -> bool:
            return True

        health.probes = lambda: [answers(), hangs()]
        loop = asyncio.get_running_loop()
        start = loop.time()
        ok, reason = await health.ready()
        assert not ok and "did not answer in 0.2 s" in reason and loop.time() - start < 0.5
        assert (await health.alive())[0] is True  # down, but not for long
        await asyncio.sleep(0.6)
        assert (await health.alive())[0] is False
        health.probes = lambda: [answers(), answers()]
        assert (await health.ready())[0] is True and (await health.alive())[0] is True

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415)],
)
def test_json_endpoints_refuse_other_content_types(content_type: str, status: int) -> None:
    with pytest.raises(BadRequest) as refused:
        check_content_type(Endpoint("generate_text"), content_type)
    assert refused.value.status == status
    check_content_type(Endpoint("generate_text"), "application/json; charset=utf-8")
    check_content_type(Endpoint("generate_text"), "")  # no header: JSON, as BentoML reads it


def test_file_endpoints_need_multipart_with_a_boundary() -> None:
    upload = Endpoint("restore_image", file_fields=("image",), text_fields=("task",))
    with pytest.raises(BadRequest, match="takes multipart/form-data, not application/json"):
        check_content_type(upload, "application/json")
    with pytest.raises(BadRequest, match="without a boundary"):
        check_content_type(upload, "multipart/form-data")
    check_content_type(upload, "multipart/form-data; boundary=abc")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([{"error": "label: not one of the trained labels"}], "label: not one of the trained labels"),
        (
            {
                "error": "2 validation errors",
                "detail": [{"loc": ["n"], "msg": "too big"}, {"loc": ["record", "a b"], "msg": "bad"}],
            },
            "n: too big; record.a b: bad",
        ),
        ({"detail": "Not Found"}, "Not Found"),
        ("not json at all", "not json at all"),
    ],
)
def test_every_error_shape_becomes_one_message(body: object, message: str) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert error_message(400, raw) == message


def test_a_client_chosen_field_name_stays_one_short_line() -> None:
    assert printable("colour\n2026-11-30 [INFO] forged") == "colour\\n2026-11-30 [INFO] forged"
    assert printable("k" * 500) == "k" * 64 + "…"
    assert error_message(400, json.dumps({"detail": [{"loc": ["record", "a\rb"], "msg": "Extra inputs"}]}).encode()) == (
        "record.a\\rb: Extra inputs"
    )


def test_scrubber_masks_emails_cards_and_phones_but_not_numbers_we_log() -> None:
    line = "from jane.doe+x@mail.example.co.uk, card 4111 1111 1111 1111 or 4111-1111-1111-1111, call +44 20 7946 0958"
    assert scrub(line) == "from [email], card [card] or [card], call [phone]"
    assert scrub("(555) 867-5309 and 555.867.5309") == "[phone] and [phone]"
    kept = "/generate_text 400 InvalidArgument: max_new_tokens: at most 126; latency 12.5 ms at 2026-11-30T07:17:30"
    assert scrub(kept) == kept


def test_every_log_record_is_scrubbed_traceback_included(caplog: pytest.LogCaptureFixture) -> None:
    install_log_filters()
    log = logging.getLogger("tests.pii")
    with caplog.at_level(logging.INFO, logger="tests.pii"):
        log.info("user %s wrote", "bob@example.com")
        try:
            raise ValueError("card 4111 1111 1111 1111")
        except ValueError:
            log.exception("failed for %s", "+1 415 555 0132")
    text = caplog.text
    assert "bob@example.com" not in text and "4111" not in text and "415 555" not in text
    assert "user [email] wrote" in text and "ValueError: card [card]" in text and "failed for [phone]" in text


@pytest.mark.parametrize("refusal", ["shed", "unauthorised", "wrong type"])
def test_a_refused_upload_is_read_to_its_end_before_the_refusal_is_sent(refusal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Answered with its upload unread, the connection is closed with data in the socket's buffer, and the
    # kernel's reset can destroy the refusal in flight (the client saw ReadError instead of 503 under load).
    monkeypatch.setenv("AIGC_API_KEY", "k")
    chunks = [b"x" * 65536, b"y" * 65536, b"z" * 100]
    events: list[str] = []

    async def scenario() -> None:
        admission = Admission(concurrency=1, queue=0, wait_s=5)
        endpoint = Endpoint("restore_image", ("image",), (), admission)
        guard = GuardMiddleware(None, {"/restore_image": endpoint}, Limits(), Health(1, 60), lambda row: None)
        pending = list(enumerate(chunks))

        async def receive() -> dict[str, object]:
            index, chunk = pending.pop(0)
            events.append(f"read {index}")
            return {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start":
                events.append(f"sent {message['status']}")

        media = "text/plain" if refusal == "wrong type" else "multipart/form-data; boundary=b"
        token = "nope" if refusal == "unauthorised" else "k"
        scope = {"type": "http", "method": "POST", "path": "/restore_image", "client": ("127.0.0.1", 1),
                 "headers": [(b"content-type", media.encode()), (b"authorization", f"Bearer {token}".encode())]}  # fmt: skip
        release = asyncio.Event()

        async def busy() -> None:
            async with admission.admit():
                await release.wait()

        holder = asyncio.create_task(busy())
        await asyncio.sleep(0.01)
        await guard(scope, receive, send)
        release.set()
        await holder

    asyncio.run(scenario())
    status = {"shed": 503, "unauthorised": 401, "wrong type": 415}[refusal]
    assert events == ["read 0", "read 1", "read 2", f"sent {status}"]
