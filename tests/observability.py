"""A real Prometheus and Pushgateway for the tests (the Debian packages `prometheus` and `prometheus-pushgateway`,
which .ci/run installs when missing), started on free ports and stopped by the fixtures that start them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_until_ready

PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "prometheus-pushgateway": "prometheus-pushgateway"}


def binary(name: str) -> str:
    """The program's path; without it, CI fails (it installs it) and a developer's run skips, saying how to get it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed: `apt-get install -y {PACKAGES[name]}` (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(f"SKIPPED, NOT TESTED: {reason}")
    return path


@dataclass
class Daemon:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _start(command: list[str], url: str, log: Path) -> Daemon:
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_until_ready(process, f"{url}/-/ready", 30, command[0], log.read_text)
    return Daemon(url, process, log)


def start_pushgateway(folder: Path) -> Daemon:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # Debian's build persists to /var/lib/prometheus by default: the test's pushes stay in the test's folder.
    command = [binary("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{port}",
               f"--persistence.file={folder / 'pushgateway.data'}"]  # fmt: skip
    return _start(command, f"http://127.0.0.1:{port}", folder / "pushgateway.log")


def start_prometheus(config: Path, folder: Path) -> Daemon:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    return _start(command, f"http://127.0.0.1:{port}", folder / "prometheus.log")


def query(prometheus: Daemon, expr: str) -> list[dict[str, Any]]:
    """An instant query's result vector (Prometheus's HTTP API)."""
    answer = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


Result = list[dict[str, Any]]


def wait_for(prometheus: Daemon, expr: str, ok: Callable[[Result], bool] = bool, seconds: float = 40) -> Result:
    """The query's result once `ok` holds for it; the last result in the failure message otherwise."""
    deadline = time.monotonic() + seconds
    while True:
        result = query(prometheus, expr)
        if ok(result) or time.monotonic() > deadline:
            assert ok(result), f"{expr}: {result}"
            return result
        time.sleep(0.5)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A /metrics page as {sample name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out
