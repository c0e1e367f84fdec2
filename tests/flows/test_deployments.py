"""flows/prefect.yaml holds the deployments once: `prefect deploy` and the served ones carry params.yaml's crons
and the flows' parameters, and the worker's pull step finds the checkout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from components.common import ConfigError
from flows import deployments as deployments_module
from flows.deployments import build_deployments, enter_repository, load_prefect_file, read_schedule
from tests.conftest import REPO_ROOT, write_params

CRONS = {"retrain_cron": "5 4 * * 1", "drift_cron": "*/10 * * * *", "ab_cron": "45 2 * * *"}
"""A schedule section unlike the real one, so a cron not read from it shows."""


def test_deployments_have_the_configured_schedules() -> None:
    deployments = {d.name: d for d in build_deployments(REPO_ROOT)}
    assert set(deployments) == {"training", "scheduled-retrain", "drift-check", "retrain", "ab-decision", "sweep"}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {
        "training": [],
        "scheduled-retrain": ["0 3 * * 0"],
        "drift-check": ["0 * * * *"],
        "retrain": [],
        "ab-decision": ["30 * * * *"],
        "sweep": [],
    }
    assert {name: d.flow_name for name, d in deployments.items()} == {
        "training": "training",
        "scheduled-retrain": "retrain",
        "drift-check": "drift-check",
        "retrain": "retrain",
        "ab-decision": "ab-decision",
        "sweep": "sweep",
    }
    assert deployments["scheduled-retrain"].parameters["trigger"] == "schedule"
    assert deployments["drift-check"].parameters["via_deployment"] is True
    assert {d.parameters["repo_root"] for d in deployments.values()} == {str(REPO_ROOT.resolve())}


def test_prefect_file_deploys_every_served_deployment_to_the_pool() -> None:
    spec = load_prefect_file()
    served = {d.name: d.entrypoint for d in build_deployments(REPO_ROOT)}
    assert {d["name"]: d["entrypoint"] for d in spec["deployments"]} == served
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {"aigc"}
    # Relative to the repository root, where `prefect deploy` runs and where the pull step puts the worker.
    assert {d["parameters"]["repo_root"] for d in spec["deployments"]} == {"."}
    assert spec["pull"] == [{"flows.deployments.enter_repository": {}}]


def test_prefect_file_crons_are_the_params_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_params: dict[str, Any]
) -> None:
    """The build steps run as `prefect deploy` runs them (from the repo root), and the schedules templated with
    their outputs: the crons are params.yaml's, and the served deployments get the same ones."""
    from prefect.deployments.steps.core import run_steps
    from prefect.utilities.templating import apply_values

    write_params({**real_params, "schedule": CRONS}, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    spec = load_prefect_file()
    outputs = asyncio.run(run_steps(spec["build"]))
    deployed = {d["name"]: [s["cron"] for s in apply_values(d.get("schedules", []), outputs)] for d in spec["deployments"]}
    expected = {
        "training": [],
        "scheduled-retrain": [CRONS["retrain_cron"]],
        "drift-check": [CRONS["drift_cron"]],
        "retrain": [],
        "ab-decision": [CRONS["ab_cron"]],
        "sweep": [],
    }
    assert deployed == expected
    served = {d.name: [s.schedule.cron for s in d.schedules] for d in build_deployments(tmp_path)}
    assert served == expected


def test_a_bad_cron_is_one_clear_error(tmp_path: Path, real_params: dict[str, Any]) -> None:
    params = write_params({**real_params, "schedule": {**CRONS, "drift_cron": "61 * * * *"}}, tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match=r"^params key 'schedule.drift_cron' is not a valid cron string: '61 \* \* \* \*'$"):
        read_schedule(str(params))
    with pytest.raises(ConfigError, match="schedule.drift_cron"):
        build_deployments(tmp_path)


def test_enter_repository_goes_to_the_configured_or_installed_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # restored after the test: the step changes the working directory
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")

    monkeypatch.setenv("AIGC_REPO_ROOT", str(checkout))
    assert enter_repository() == {"directory": str(checkout.resolve())}
    assert Path.cwd() == checkout.resolve()

    monkeypatch.delenv("AIGC_REPO_ROOT")
    assert enter_repository() == {"directory": str(REPO_ROOT.resolve())}  # `pip install -e .` from this checkout
    assert Path.cwd() == REPO_ROOT.resolve()


def test_enter_repository_without_dvc_yaml_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.setenv("AIGC_REPO_ROOT", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^AIGC_REPO_ROOT={tmp_path} holds no dvc.yaml: set AIGC_REPO_ROOT to"):
        enter_repository()

    monkeypatch.delenv("AIGC_REPO_ROOT")
    monkeypatch.setattr(deployments_module, "installed_checkout", lambda: tmp_path)
    with pytest.raises(ConfigError, match=rf"^{tmp_path} \(where flows is installed from\) holds no dvc.yaml"):
        enter_repository()
    assert Path.cwd() == tmp_path  # it stays where it was
