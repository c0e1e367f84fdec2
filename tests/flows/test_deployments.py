"""The served deployments carry the schedules of params.yaml and the parameters the flows need."""

from __future__ import annotations

from pathlib import Path

from flows.deployments import build_deployments
from tests.conftest import REPO_ROOT


def test_deployments_have_the_configured_schedules(tmp_path: Path) -> None:
    deployments = {d.name: d for d in build_deployments(REPO_ROOT)}
    assert set(deployments) == {"scheduled-retrain", "drift-check", "retrain", "ab-decision"}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {
        "scheduled-retrain": ["0 3 * * 0"],
        "drift-check": ["0 * * * *"],
        "retrain": [],
        "ab-decision": ["30 * * * *"],
    }
    assert deployments["scheduled-retrain"].parameters["trigger"] == "schedule"
    assert deployments["drift-check"].parameters["via_deployment"] is True
    assert deployments["retrain"].parameters["repo_root"] == str(REPO_ROOT.resolve())
