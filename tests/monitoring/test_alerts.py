"""The shipped Prometheus configuration, alert rules and Grafana dashboard, checked by Prometheus's own tool."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.observability import binary

PROMETHEUS = REPO_ROOT / "monitoring" / "prometheus"


@pytest.mark.parametrize(
    "check",
    [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"), ("test", "rules", "alerts_test.yml")],
    ids=" ".join,
)
def test_promtool_accepts_the_config_and_the_rules_and_every_alert_fires_when_it_should(check: tuple[str, ...]) -> None:
    run = subprocess.run([binary("promtool"), *check], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS" in run.stdout


def test_every_alert_has_its_meaning_and_first_response_in_the_readme_and_a_unit_test() -> None:
    alerts = [r["alert"] for g in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    tested = {a["alertname"] for t in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
              for a in t.get("alert_rule_test", [])}  # fmt: skip
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(alerts) >= 6 and set(alerts) == tested
    for alert in alerts:
        assert f"| `{alert}` |" in readme, f"README's alert table has no row for {alert}"


def test_the_dashboard_is_a_grafana_dashboard_whose_panels_all_query_prometheus() -> None:
    dashboard = json.loads((REPO_ROOT / "monitoring" / "grafana" / "dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] and len(panels) >= 10
    assert all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in panels)
    assert {p["datasource"]["uid"] for p in panels} == {"${datasource}"}
    assert [a["name"] for a in dashboard["annotations"]["list"]] == ["Promotions", "Retrains"]
    provider = yaml.safe_load((REPO_ROOT / "monitoring/grafana/provisioning/dashboards/aigc.yml").read_text())
    assert provider["providers"][0]["type"] == "file"
