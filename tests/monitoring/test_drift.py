"""The drift check on generated request logs against the tiny pipeline's reference tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from monitoring.drift import DriftConfig, check_drift
from monitoring.simulate import write_simulated_log
from tests.conftest import section


def config(params: dict[str, Any], **overrides: Any) -> DriftConfig:
    raw = section(params, "monitor")
    raw.update(min_rows=50, **overrides)
    return DriftConfig.from_params(raw)


def run(params: dict[str, Any], features: Path, tmp_path: Path, rows: int, shift: float, **overrides: Any) -> Any:
    log_dir = tmp_path / "logs"
    if rows:
        write_simulated_log(features / "reference", log_dir, rows, shift, seed=1)  # stamped within the last hour
    return check_drift(config(params, **overrides), log_dir, features / "reference", tmp_path / "reports")


def test_a_drifted_log_is_detected_and_reported_per_feature(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    report_dir, results = run(tiny_params, tiny_features, tmp_path, rows=400, shift=0.9)
    assert results["images"].decision == "drift" and results["text"].decision == "drift"
    decision = json.loads((report_dir / "decision.json").read_text())
    assert decision["drift"] is True
    text_features = {f["feature"]: f for f in decision["families"]["text"]["features"]}
    assert text_features["source_chars"]["drifted"] and "score" in text_features["source_chars"]
    evidently_json = json.loads((report_dir / "text.json").read_text())
    assert any("ValueDrift" in m["metric_name"] for m in evidently_json["metrics"])
    parser = HTMLParser()
    parser.feed((report_dir / "text.html").read_text())  # well-formed enough to parse, and Evidently's
    assert (report_dir / "text.html").read_text().lstrip().lower().startswith("<html") or "<html" in (
        report_dir / "text.html"
    ).read_text()[:500].lower()


def test_a_clean_log_shows_no_drift(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    _, results = run(tiny_params, tiny_features, tmp_path, rows=400, shift=0.0)
    assert {name: r.decision for name, r in results.items()} == {"text": "no drift", "images": "no drift", "restore": "no drift"}


def test_empty_and_small_logs_are_skipped_with_the_reason(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    report_dir, results = run(tiny_params, tiny_features, tmp_path, rows=0, shift=0.0)
    assert all(r.decision == "skipped" and "fewer than monitor.min_rows=50" in r.reason for r in results.values())
    assert json.loads((report_dir / "decision.json").read_text())["drift"] is False
    _, small = run(tiny_params, tiny_features, tmp_path / "small", rows=20, shift=1.0)
    assert small["images"].decision == "skipped" and small["images"].reason.startswith("20 requests")


def test_rows_outside_the_window_do_not_count(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    write_simulated_log(tiny_features / "reference", tmp_path / "logs", 400, 1.0, seed=2)
    later = datetime.now(UTC) + timedelta(hours=48)
    _, results = check_drift(config(tiny_params), tmp_path / "logs", tiny_features / "reference", tmp_path / "r", now=later)
    assert all(r.decision == "skipped" for r in results.values())


def test_bad_monitor_params_name_the_key(tiny_params: dict[str, Any]) -> None:
    from components.common import ConfigError

    with pytest.raises(ConfigError, match="'monitor.drift_share'"):
        config(tiny_params, drift_share=0)
    with pytest.raises(ConfigError, match="'monitor.stattest_threshold'"):
        config(tiny_params, stattest_threshold=5)


def test_a_stricter_test_threshold_flags_fewer_features(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    _, default = run(tiny_params, tiny_features, tmp_path / "a", rows=400, shift=0.3)
    _, strict = run(tiny_params, tiny_features, tmp_path / "b", rows=400, shift=0.3, stattest_threshold=1e-12)
    drifted = {name: sum(f["drifted"] for f in r.features) for name, r in default.items()}
    strict_drifted = {name: sum(f["drifted"] for f in r.features) for name, r in strict.items()}
    assert sum(strict_drifted.values()) < sum(drifted.values())


def test_text_drift_tests_the_schemas_categorical_attributes_across_log_schemas(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    import shutil

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from serving.request_log import RequestLog

    reference = tmp_path / "reference"
    shutil.copytree(tiny_features / "reference", reference)
    rng = np.random.default_rng(0)
    n = 300
    pq.write_table(
        pa.table(
            {
                "record_id": [str(i) for i in range(n)],
                "split": ["train"] * n,
                "source_chars": rng.integers(40, 80, n),
                "source_tokens": rng.integers(10, 20, n),
                "num_attributes": rng.integers(3, 5, n),
                "oov_share": rng.random(n) * 0.1,
                "reference_chars": rng.integers(40, 90, n),
                "reference_tokens": rng.integers(10, 25, n),
                "attr_cuisine": rng.choice(["Thai", "Italian", "French"], n),
                "attr_price range": rng.choice(["cheap", "high"], n),
            }
        ),
        reference / "text.parquet",
    )
    write_simulated_log(reference, tmp_path / "logs", 400, 1.0, seed=3)
    # An older part, written by a model whose schema had other categorical keys.
    old = RequestLog(tmp_path / "logs", attributes=("size",), flush_seconds=0.01)
    old.log({"request_id": "old", "endpoint": "generate_text", "status": 200, "attr_size": "XL", "source_chars": 10})
    old.close()
    _, results = check_drift(config(tiny_params), tmp_path / "logs", reference, tmp_path / "reports")
    tested = {f["feature"]: f["drifted"] for f in results["text"].features}
    assert tested["attr_cuisine"] and tested["attr_price range"]  # every shifted row has an unseen value
    assert "attr_size" not in tested and results["text"].rows == 401
