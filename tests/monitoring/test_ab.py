"""The A/B report on synthetic logs: per-variant intervals are scipy's, the decision follows Welch's interval,
and edited texts from feedback land as training references under the configured columns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats

from monitoring.ab import BETTER, UNKNOWN, WORSE, ABConfig, ab_report, compare
from monitoring.landing import feedback_to_landing
from serving.request_log import FEEDBACK_SCHEMA, log_schema

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
AB = {"at": T0.isoformat(), "mode": "split", "share": 0.5, "models": {"text": "aigc-text:c"}, "experiment": None}


def write_logs(folder: Path, clicks: dict[str, list[int]], ratings: dict[str, list[int]] | None = None) -> None:
    """One answered request per outcome, then feedback rows: each click, and (optionally) a rating too."""
    requests, feedback = [], []
    for variant, values in clicks.items():
        for i, click in enumerate(values):
            request_id = f"{variant}-{i}"
            at = T0 + timedelta(seconds=i + 1)
            requests.append({"timestamp": at, "request_id": request_id, "endpoint": "generate_text", "status": 200,
                             "variant": variant, "latency_ms": 10.0})  # fmt: skip
            if click:  # clients report clicks, never "not clicked"
                feedback.append({"timestamp": at, "request_id": request_id, "variant": variant, "click": True})
            if ratings:
                feedback.append({"timestamp": at + timedelta(seconds=1), "request_id": request_id, "variant": variant,
                                 "rating": ratings[variant][i]})  # fmt: skip
    requests.append({"timestamp": T0 + timedelta(seconds=5), "request_id": "bad", "endpoint": "generate_text", "status": 400,
                     "variant": None, "latency_ms": 1.0, "error": "InvalidArgument"})  # fmt: skip
    requests.append(
        {
            "timestamp": T0 - timedelta(days=1),
            "request_id": "before",
            "endpoint": "generate_text",
            "status": 200,
            "variant": "champion",
            "latency_ms": 1.0,
        }
    )  # fmt: skip  (before the test: not counted)
    folder.mkdir(parents=True, exist_ok=True)
    schema = log_schema()
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in requests], schema=schema),
                   folder / "requests-1.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in FEEDBACK_SCHEMA.names} for r in feedback], schema=FEEDBACK_SCHEMA),
                   folder / "feedback-1.parquet")  # fmt: skip


def config(metric: str, min_feedback: int = 30) -> ABConfig:
    return ABConfig(metric=metric, min_feedback=min_feedback, share=0.5, mode="split", reports_dir=Path("ab"))


def test_per_variant_intervals_are_scipys_and_a_clear_lift_is_better(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clicks = {"champion": list((rng.random(400) < 0.10).astype(int)), "challenger": list((rng.random(400) < 0.25).astype(int))}
    ratings = {v: list(rng.integers(1, 6, 400)) for v in clicks}
    write_logs(tmp_path, clicks, ratings)
    report = ab_report(tmp_path, AB, config("click"))
    for variant, values in clicks.items():
        got = report["variants"][variant]
        wilson = stats.binomtest(sum(values), len(values)).proportion_ci(confidence_level=0.95, method="wilson")
        assert got["requests"] == 400 and got["outcomes"] == 400 and got["feedback_rate"] == 1.0  # every one rated
        assert (got["ci_low"], got["ci_high"]) == pytest.approx((wilson.low, wilson.high))
        assert got["click"] == pytest.approx(np.mean(values), abs=1e-4)
    welch = stats.ttest_ind(clicks["challenger"], clicks["champion"], equal_var=False).confidence_interval(0.95)
    assert (report["comparison"]["ci_low"], report["comparison"]["ci_high"]) == pytest.approx((welch.low, welch.high))
    assert report["comparison"]["decision"] == BETTER

    rated = ab_report(tmp_path, AB, config("rating"))
    t = stats.ttest_1samp(ratings["champion"], 0.0).confidence_interval(0.95)
    assert (rated["variants"]["champion"]["ci_low"], rated["variants"]["champion"]["ci_high"]) == pytest.approx((t.low, t.high))
    assert rated["comparison"]["decision"] == UNKNOWN  # the same rating distribution: no difference shown


def test_too_little_feedback_is_not_yet_known_and_a_clear_drop_is_worse(tmp_path: Path) -> None:
    write_logs(tmp_path / "few", {"champion": [1, 0, 1], "challenger": [0, 0, 0]})
    few = ab_report(tmp_path / "few", AB, config("click"))
    assert few["comparison"]["decision"] == UNKNOWN
    assert (
        few["variants"]["champion"]["click"] == pytest.approx(2 / 3, abs=1e-4)
        and few["variants"]["challenger"]["feedback_rate"] == 0
    )
    assert compare(np.array([1.0] * 60 + [0.0] * 40), np.array([1.0] * 20 + [0.0] * 80), 30)["decision"] == WORSE


def test_edited_texts_land_once_under_the_configured_columns(tmp_path: Path) -> None:
    params = {"ingest": {"landing": "data/landing", "text": {"source_column": "mr", "reference_column": "ref"}},
              "monitor": {"log_dir": "logs"}}  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rows = [
        {"request_id": "a", "edited_text": "Better copy.", "source": "name: A"},
        {"request_id": "b", "click": True},  # no edit: not a reference
        {"request_id": "c", "edited_text": "Orphan edit.", "source": None},  # source unknown (after a restart): skipped
    ]
    (tmp_path / "logs").mkdir()
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in FEEDBACK_SCHEMA.names} for r in rows], schema=FEEDBACK_SCHEMA),
                   tmp_path / "logs" / "feedback-20261130-000001.parquet")  # fmt: skip
    (written,) = feedback_to_landing(tmp_path)
    assert written == tmp_path / "data" / "landing" / "text" / "feedback-20261130-000001.csv"
    assert pacsv.read_csv(written).to_pylist() == [{"mr": "name: A", "ref": "Better copy."}]
    assert feedback_to_landing(tmp_path) == []  # the same part never lands twice


def test_a_test_with_no_log_yet_reports_nothing_known(tmp_path: Path) -> None:
    report = ab_report(tmp_path / "no-log-yet", AB, config("click"))
    assert report["comparison"]["decision"] == UNKNOWN
    assert report["variants"]["champion"]["requests"] == 0 and report["variants"]["challenger"]["click"] is None
