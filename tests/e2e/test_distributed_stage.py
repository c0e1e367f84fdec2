"""`dvc repro train_text` with `nproc_per_node: 2` trains a DDP model (gloo, CPU) as a versioned output, and
resumes it after the whole run is killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import copy_repo, venv_env

pytestmark = pytest.mark.slow


def dvc_repro(repo: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["dvc", "repro", "train_text"], cwd=repo, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def processes_in(repo: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(str(repo) in part for part in process.info["cmdline"] or []) or Path(process.cwd()) == repo:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_dvc_repro_trains_on_two_processes_and_resumes_after_sigkill(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    params = dict(tiny_params)
    params["train_text"] = {
        **tiny_params["train_text"],
        "max_steps": 24, "checkpoint_every": 4, "validate_every": 12, "log_every": 4,
        "distributed": {"nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None},
    }  # fmt: skip
    repo = copy_repo(tmp_path / "repo", params)
    checkpoints = repo / "models" / "checkpoints" / "text"

    first = dvc_repro(repo)
    deadline = time.monotonic() + 400
    while not list(checkpoints.glob("*/step-00000008.ckpt")):
        assert first.poll() is None, f"the run ended before it could be killed:\n{first.stdout.read()[-3000:]}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "no checkpoint in 400 s"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # dvc, the shell, the stage (the agent); its workers follow it
    first.wait(timeout=30)
    deadline = time.monotonic() + 15
    while processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(repo) == [], "a worker outlived the killed run"
    assert not (repo / "models" / "text" / "model.safetensors").exists()

    second = dvc_repro(repo)
    output = second.communicate(timeout=400)[0]
    assert second.returncode == 0, output[-4000:]
    assert "Running stage 'train_text'" in output and "Running stage 'features'" not in output
    assert "starting 2 workers" in output and "resuming from" in output
    record = json.loads((repo / "models" / "text" / "training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 24
    timing = json.loads((repo / "metrics" / "train_text" / "timing.json").read_text())
    assert timing["processes"] == 2 and timing["resumed_from"] >= 8
    assert "models/text" in (repo / "dvc.lock").read_text()
    status = subprocess.run(["dvc", "status", "train_text"], cwd=repo, env=venv_env(), capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr

    # Resuming is exact under DDP too (every rank's RNG state, the optimizer, the selection): the same stage on
    # 2 processes that never stopped writes the same bytes.
    plain = tmp_path / "uninterrupted"
    command = ["python", "-m", "components.train_text", "data/features/text", str(plain / "model"),
               "--checkpoints", str(plain / "ckpt")]  # fmt: skip
    run = subprocess.run(command, cwd=repo, env=venv_env(), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("model.safetensors", "training.json"):
        assert (plain / "model" / name).read_bytes() == (repo / "models" / "text" / name).read_bytes(), name
