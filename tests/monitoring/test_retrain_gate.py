"""The retrain gate: one retrain per cooldown, never two at once, every decision recorded."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from monitoring.retrain_gate import RetrainGate

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_a_storm_of_triggers_within_the_cooldown_starts_one_retrain(tmp_path: Path) -> None:
    gate = RetrainGate(tmp_path, timedelta(hours=24))
    started = []
    for minute in range(0, 60, 10):
        with gate.claim(f"report-{minute}", f"exp-{minute}", now=T0 + timedelta(minutes=minute)) as decision:
            if decision.start:
                started.append(minute)
            else:
                assert decision.reason.startswith("cooldown: retrain exp-0 started at 2026-11-23T12:00:00+00:00")
    assert started == [0]
    with gate.claim("report-late", "exp-late", now=T0 + timedelta(hours=25)) as decision:
        assert decision.start
    history = gate.state()["history"]
    assert [h["experiment"] for h in history] == ["exp-0", "exp-late"] and history[0]["trigger"] == "report-0"


def test_two_concurrent_triggers_start_one_retrain_and_refuse_the_other(tmp_path: Path) -> None:
    gate = RetrainGate(tmp_path, timedelta(seconds=0))
    inside, release = threading.Event(), threading.Event()
    decisions: dict[str, object] = {}

    def first() -> None:
        with gate.claim("report-a", "exp-a") as decision:
            decisions["a"] = decision
            inside.set()
            release.wait(10)  # the retrain is running

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10)
    with gate.claim("report-b", "exp-b") as second:
        assert not second.start and "already running" in second.reason and "exp-a" in second.reason
    release.set()
    thread.join()
    assert decisions["a"].start  # type: ignore[attr-defined]
    with gate.claim("report-c", "exp-c") as third:  # the lock went with the finished retrain
        assert third.start


def test_a_callers_refusal_is_recorded_without_spending_the_cooldown_and_the_lock_can_be_held_alone(tmp_path: Path) -> None:
    gate = RetrainGate(tmp_path, timedelta(hours=24))
    with gate.claim("schedule", "exp-a", now=T0, refuse="the workspace is not the champion") as decision:
        assert not decision.start and decision.reason == "refused: the workspace is not the champion"
    with gate.held("an A/B decision") as free:
        assert free
        with gate.claim("manual", "exp-b", now=T0) as blocked:
            assert not blocked.start and "an A/B decision" in blocked.reason
    with gate.claim("manual", "exp-c", now=T0) as decision:  # neither the refusal nor the hold spent the cooldown
        assert decision.start
        with gate.held("an A/B decision") as free:
            assert not free
    assert [(r["experiment"], r["started"]) for r in gate.requests()] == [("exp-a", False), ("exp-b", False), ("exp-c", True)]
