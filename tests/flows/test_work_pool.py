"""The pipeline on a Prefect work pool, as several machines run it: a real `prefect server`, the `aigc` process
pool, `prefect deploy --all --prefect-file flows/prefect.yaml` from the repository root, and a worker started
elsewhere that finds the checkout through AIGC_REPO_ROOT (the pull step) and runs the training deployment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import free_port, venv_env

pytestmark = pytest.mark.slow

CRONS = {"retrain_cron": "5 4 * * 1", "drift_cron": "*/10 * * * *", "ab_cron": "45 2 * * *"}
"""The tiny repo's schedule: unlike the real one, so a cron not templated from its params.yaml shows."""
STARTUP_S = 60
RUN_TIMEOUT_S = 300
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class Server:
    api: str
    env: dict[str, str]
    """The environment every `prefect` command of the test runs with: this server's API, its own home."""
    logs: Path


def start(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """A process in its own session, output to `log`, so teardown can stop it and everything it started."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill, the process, its process group and every descendant (a flow run the worker started
    may run in a session of its own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _, alive = psutil.wait_procs(family, timeout=10)
        if not alive and proc.poll() is not None:
            break
    proc.wait(timeout=10)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""


def prefect(server: Server, *args: str, cwd: Path) -> str:
    """Run a prefect CLI command against the server; its output, or a failure that shows it."""
    result = subprocess.run(
        ["prefect", *args], env=server.env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture
def tiny_params(tiny_params: dict[str, Any]) -> dict[str, Any]:
    return {**tiny_params, "schedule": CRONS}


@pytest.fixture
def launch() -> Iterator[Callable[[list[str], dict[str, str], Path, Path], subprocess.Popen[bytes]]]:
    """Start processes that are stopped at teardown, last started first (the worker before the server: a worker
    that lost its API keeps retrying instead of stopping), whatever the test's outcome."""
    started: list[subprocess.Popen[bytes]] = []

    def launch_one(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
        started.append(start(cmd, env, cwd, log))
        return started[-1]

    try:
        yield launch_one
    finally:
        for proc in reversed(started):
            stop(proc)


@pytest.fixture
def server(tmp_path: Path, launch: Callable[..., subprocess.Popen[bytes]]) -> Server:
    """A real `prefect server` on a free port, with its own home and SQLite database."""
    home = tmp_path / "prefect-home"
    logs = tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        **venv_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": api_url,
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # No runs from the crons: a drift check falling due during the test would run beside the training.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    proc = launch(["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path, logs / "server.log")
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert proc.poll() is None, f"prefect server exited:\n{tail(logs / 'server.log')}"
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return Server(api_url, env, logs)
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"no /api/health after {STARTUP_S} s:\n{tail(logs / 'server.log')}"
        time.sleep(0.5)


def api(server: Server, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    response = httpx.request(method, f"{server.api}{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def run_logs(server: Server, flow_run_id: str) -> str:
    logs = api(server, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"})
    return "\n".join(entry["message"] for entry in logs)


def test_training_deployment_runs_on_a_worker_of_the_pool(
    server: Server, launch: Callable[..., subprocess.Popen[bytes]], tiny_repo: Path, tmp_path: Path
) -> None:
    prefect(server, "work-pool", "create", "aigc", "--type", "process", cwd=tiny_repo)
    prefect(server, "deploy", "--all", "--prefect-file", "flows/prefect.yaml", cwd=tiny_repo)

    deployed = {d["name"]: d for d in api(server, "POST", "/deployments/filter", {})}
    # The crons are the tiny repo's params.yaml values, templated by the build step.
    assert {name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployed.items()} == {
        "training": [],
        "scheduled-retrain": [CRONS["retrain_cron"]],
        "drift-check": [CRONS["drift_cron"]],
        "retrain": [],
        "ab-decision": [CRONS["ab_cron"]],
        "sweep": [],
    }
    assert {d["work_pool_name"] for d in deployed.values()} == {"aigc"}
    assert deployed["drift-check"]["parameters"] == {"repo_root": ".", "via_deployment": True}

    # A worker on "another machine": started outside the checkout, which it finds through AIGC_REPO_ROOT.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    env = {**server.env, "AIGC_REPO_ROOT": str(tiny_repo)}
    worker = launch(["prefect", "worker", "start", "--pool", "aigc"], env, elsewhere, server.logs / "worker.log")
    stages = json.dumps({"stages": ["ingest", "validate"]})
    out = prefect(server, "deployment", "run", "training/training", "--params", stages, cwd=elsewhere)
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    flow_run_id = match.group(1)

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (state := api(server, "GET", f"/flow_runs/{flow_run_id}")["state_type"]) not in TERMINAL:
        assert worker.poll() is None, f"the worker exited:\n{tail(server.logs / 'worker.log')}"
        assert time.monotonic() < deadline, f"flow run still {state} after {RUN_TIMEOUT_S} s:\n{tail(server.logs / 'worker.log')}"
        time.sleep(1)
    assert state == "COMPLETED", f"flow run {state}:\n{run_logs(server, flow_run_id)}\n{tail(server.logs / 'worker.log')}"

    # The stages ran in the checkout, through DVC, and nothing landed where the worker was started.
    for output in ("data/raw/text.parquet", "data/validated/text.parquet", "data/validation/report.json"):
        assert (tiny_repo / output).is_file(), output
    lock = (tiny_repo / "dvc.lock").read_text(encoding="utf-8")
    assert "ingest:" in lock and "validate:" in lock
    assert not (elsewhere / "data").exists()
