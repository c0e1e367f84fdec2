"""Observability end to end: a real Prometheus, with the shipped config and alert rules, scrapes a running
service (with an API key and a metrics key) and the Pushgateway the monitoring loop pushes to; after a valid,
an invalid and an unauthorised request and a drifted drift check, every dashboard panel's query has data."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from monitoring.drift import DriftConfig, check_drift
from monitoring.retrain_gate import RetrainGate
from monitoring.simulate import write_simulated_log
from tests.conftest import REPO_ROOT, section
from tests.observability import Daemon, query, samples, start_prometheus, wait_for
from tests.serving.conftest import Server, receipt, service_env, start_server, stop_server

pytestmark = pytest.mark.slow
API_KEY, METRICS_KEY = "api-k3y", "metrics-k3y"
AUTH = {"authorization": f"Bearer {API_KEY}"}
DASHBOARD = REPO_ROOT / "monitoring" / "grafana" / "dashboard.json"


@pytest.fixture(scope="module")
def keyed_server(bento_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(bento_home, tmp_path_factory.mktemp("observed") / "requests",
                           AIGC_API_KEY=API_KEY, AIGC_METRICS_KEY=METRICS_KEY)  # fmt: skip
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def prometheus(keyed_server: Server, pushgateway: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Prometheus on the shipped config, its targets pointed at the test's service and Pushgateway, scraping
    every second with the metrics key."""
    folder = tmp_path_factory.mktemp("prometheus")
    shipped = REPO_ROOT / "monitoring" / "prometheus" / "prometheus.yml"
    config = yaml.safe_load(shipped.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(shipped.parent / rules) for rules in config["rule_files"]]
    targets = {"aigc-service": keyed_server.url, "aigc-loop": pushgateway.url}
    (folder / "metrics-key").write_text(METRICS_KEY)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets.pop(job["job_name"]).removeprefix("http://")]}]
        if job["job_name"] == "aigc-service":
            job["authorization"] = {"type": "Bearer", "credentials_file": str(folder / "metrics-key")}
    assert not targets, f"the shipped config has no job {sorted(targets)}"
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    daemon = start_prometheus(folder / "prometheus.yml", folder)
    yield daemon
    daemon.stop()


def png(side: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def send_traffic(server: Server) -> None:
    schema = httpx.get(f"{server.url}/docs.json", timeout=30).json()["components"]["schemas"].get("TextRecord")
    text: dict[str, Any] = {"prompt": "write one line", "max_new_tokens": 8}
    if schema:
        name, field = next((k, v) for k, v in schema["properties"].items() if v.get("examples"))
        text = {"record": {name: field["examples"][0]}, "max_new_tokens": 8}
    answers = [
        httpx.post(f"{server.url}/generate_text", json=text, headers=AUTH, timeout=60),
        httpx.post(f"{server.url}/generate_image", json={"label": "1", "n": 2}, headers=AUTH, timeout=60),
        httpx.post(f"{server.url}/restore_image", files={"image": ("x.png", png(), "image/png")}, headers=AUTH, timeout=60),
        httpx.post(f"{server.url}/generate_text", json={**text, "seed": -1}, headers=AUTH, timeout=60),  # invalid
        httpx.post(f"{server.url}/generate_text", json=text, timeout=60),  # unauthorised
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 400, 401], [a.text for a in answers]


def publish_loop(bento_home: Path, pushgateway: Daemon, params: dict[str, Any], features: Path, root: Path) -> None:
    """A drifted window checked for drift, a retrain started and the store's champion, pushed by the CLI."""
    params = {**params, "observability": {"pushgateway": None, "job": "aigc_loop_observed"}}  # its own group
    params["monitor"] = {**params["monitor"], "min_rows": 50, "reports_dir": "reports", "retrain_dir": "retrain"}
    params["promotion"] = {**params["promotion"], "record": str(bento_home / "promoted.json")}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_simulated_log(features / "reference", root / "logs", 400, shift=0.9, seed=1)
    check_drift(DriftConfig.from_params(section(params, "monitor")), root / "logs", features / "reference", root / "reports")
    with RetrainGate.from_params(root).claim("manual", "retrain-observed") as answer:
        assert answer.start
    command = [sys.executable, "-m", "monitoring.loop_metrics", "--push", "--repo", str(root)]
    run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(bento_home, AIGC_PUSHGATEWAY=pushgateway.url),
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and "loop metrics pushed" in run.stdout, run.stdout + run.stderr


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]
    ]


def test_prometheus_scrapes_the_service_and_the_loop_and_every_panel_has_data(
    keyed_server: Server, prometheus: Daemon, pushgateway: Daemon, bento_home: Path, tiny_params: dict[str, Any],
    tiny_features: Path, tmp_path: Path,
) -> None:  # fmt: skip
    wait_for(prometheus, 'up{job=~"aigc-service|aigc-loop"} == 1', lambda r: len(r) == 2)
    send_traffic(keyed_server)
    publish_loop(bento_home, pushgateway, tiny_params, tiny_features, tmp_path)
    tags = receipt(bento_home)["models"]

    # Counters by endpoint, status and model tag; refusals by reason and field; the served models.
    answered = wait_for(prometheus, 'aigc_requests_total{endpoint="generate_text",status_class="2xx",variant="champion"}')
    assert {r["metric"]["model_tag"] for r in answered} == {tags["text"]}
    assert float(answered[0]["value"][1]) >= 1
    wait_for(prometheus, 'aigc_requests_total{endpoint="generate_text",code="400",model_tag=""}')
    assert wait_for(prometheus, 'aigc_refusals_total{endpoint="generate_text",reason="validation",field="seed"}')
    assert wait_for(prometheus, 'aigc_refusals_total{endpoint="generate_text",reason="auth"}')
    assert not query(prometheus, 'aigc_refusals_total{reason="validation",field!~"seed|other|record|prompt|label|n|image|task"}')
    served = wait_for(prometheus, "aigc_model_info", lambda r: len(r) == len(tags))
    assert {r["metric"]["family"]: r["metric"]["tag"] for r in served} == tags
    assert all(r["metric"]["variant"] == "champion" for r in served)
    # The loop: the drift share of a drifted window over its threshold, and the champion's metrics.
    share = wait_for(prometheus, 'aigc_drift_share{family="text"} >= ignoring(family) aigc_drift_share_threshold')
    assert float(share[0]["value"][1]) > 0
    assert wait_for(prometheus, 'aigc_champion_metric{family="text",metric="bleu"}')

    # Every dashboard query has data (the acceptance check, as `curl .../api/v1/query?query=...` would).
    queries = [(title, expr.replace("$__rate_interval", "1m")) for title, expr in panel_queries()]
    for title, expr in queries:
        assert wait_for(prometheus, expr, seconds=20), f"panel {title!r}: no data for {expr}"


def test_metrics_take_the_metrics_key_and_panels_name_only_metrics_really_exported(
    keyed_server: Server, pushgateway: Daemon, prometheus: Daemon
) -> None:
    assert httpx.get(f"{keyed_server.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{keyed_server.url}/metrics", headers=AUTH, timeout=10).status_code == 401  # the API's key is not it
    service = httpx.get(f"{keyed_server.url}/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
    assert service.status_code == 200
    exported = set(samples(service.text)) | set(samples(httpx.get(f"{pushgateway.url}/metrics", timeout=10).text))
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [expr for _, expr in panel_queries()] + [a["expr"] for a in dashboard["annotations"]["list"]]
    alerts = yaml.safe_load((REPO_ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    named = {name for expr in expressions for name in re.findall(r"\baigc_[a-z_]+", expr)}
    assert named and named <= exported, f"named but not exported: {sorted(named - exported)}"
