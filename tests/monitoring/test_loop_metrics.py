"""The monitoring loop's metrics: a real drift check's decision, the retrain gate and the promotion record,
pushed to a real Pushgateway (monitoring/loop_metrics.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from monitoring.drift import DriftConfig, check_drift
from monitoring.loop_metrics import publish
from monitoring.retrain_gate import RetrainGate
from monitoring.simulate import write_simulated_log
from serving.promoted import promote
from tests.conftest import free_port, section
from tests.observability import Daemon, samples

JOB = "aigc_loop_test"


def loop_root(tmp_path: Path, params: dict[str, Any], pushgateway: str | None) -> Path:
    """A repository's loop files under tmp_path: params.yaml with the folders the loop writes, and the gateway."""
    params = {**params, "observability": {"pushgateway": pushgateway, "job": JOB}}
    params["monitor"] = {**params["monitor"], "min_rows": 50, "reports_dir": "reports", "retrain_dir": "retrain"}
    params["promotion"] = {**params["promotion"], "record": "promoted.json"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def pushed(gateway: Daemon) -> dict[str, list[tuple[dict[str, str], float]]]:
    return samples(httpx.get(f"{gateway.url}/metrics", timeout=10).text)


def value(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The one sample of `name` with `labels` in this test's group (other tests push to the same gateway)."""
    labels = {"job": JOB, **labels}
    (found,) = [v for have, v in metrics[name] if all(have.get(k) == w for k, w in labels.items())]
    return found


def test_a_drifted_log_pushes_drift_shares_above_the_threshold_and_the_loop_state(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path, pushgateway: Daemon
) -> None:
    root = loop_root(tmp_path, tiny_params, pushgateway.url)
    write_simulated_log(tiny_features / "reference", root / "logs", 400, shift=0.9, seed=1)
    config = DriftConfig.from_params({**section(tiny_params, "monitor"), "min_rows": 50})
    check_drift(config, root / "logs", tiny_features / "reference", root / "reports")
    with RetrainGate.from_params(root).claim("manual", "retrain-test") as answer:
        assert answer.start
    models = {"text": "aigc-text:a", "image": "aigc-image:b", "restore": "aigc-restore:c"}
    promote(root / "promoted.json", models, "aigc-pipeline:d", "tests", "a champion to publish")

    assert publish(root) == (logging.INFO, f"loop metrics pushed to {pushgateway.url} (job {JOB})")
    metrics = pushed(pushgateway)
    threshold = value(metrics, "aigc_drift_share_threshold")
    assert threshold == config.drift_share
    for family in ("text", "images"):
        assert value(metrics, "aigc_drift_share", family=family) >= threshold
        assert value(metrics, "aigc_drift_detected", family=family) == 1
    ours = {name: [(labels, v) for labels, v in found if labels.get("job") == JOB] for name, found in metrics.items()}
    drifted = {labels["feature"] for labels, v in ours["aigc_drift_feature_drifted"] if labels["family"] == "text" and v == 1}
    assert "source_chars" in drifted
    assert {labels["feature"] for labels, _ in ours["aigc_drift_feature_score"]} >= {"source_chars", "label"}
    now = time.time()
    for name in ("aigc_drift_check_last_success_timestamp_seconds", "aigc_last_retrain_timestamp_seconds",
                 "aigc_last_promotion_timestamp_seconds"):  # fmt: skip
        assert now - 300 < value(metrics, name) <= now
    assert value(metrics, "aigc_retrains_started") == 1 and value(metrics, "aigc_ab_test_running") == 0
    assert value(metrics, "aigc_champion_info", family="text", tag="aigc-text:a", bento="aigc-pipeline:d") == 1


def test_no_pushgateway_or_an_unreachable_one_is_one_line_never_an_error(
    tiny_params: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIGC_PUSHGATEWAY", raising=False)
    root = loop_root(tmp_path, tiny_params, None)
    assert publish(root)[1].startswith("loop metrics not pushed: params observability.pushgateway is null")

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AIGC_PUSHGATEWAY", closed)  # the environment wins over params
    level, line = publish(root)
    assert (
        level == logging.WARNING
        and line.startswith("loop metrics not pushed (URLError")
        and line.endswith("they go with the next push")
    )

    (root / "params.yaml").write_text(yaml.safe_dump({**tiny_params, "observability": {"pushgateway": 9091, "job": "x"}}))
    monkeypatch.delenv("AIGC_PUSHGATEWAY")
    assert "'observability.pushgateway' must be an address" in publish(root)[1]

    (root / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in tiny_params.items() if k != "observability"}))
    assert publish(root)[1].startswith("loop metrics not pushed: params")  # a params.yaml older than the section
