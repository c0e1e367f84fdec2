"""`dvc repro` killed with SIGKILL mid-training leaves no trainer behind, and the rerun resumes from its checkpoint.

The tiny configuration trains long enough to be killed after its first checkpoint. DVC runs the stage through
/bin/sh (what it does where $SHELL is unset: cron, CI, containers), so the trainer's parent is a shell that
outlives dvc: the case where a trainer used to train on as an orphan and overwrite the rerun's outputs.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import copy_repo, venv_env

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux only")]

MAX_STEPS = 600


def trainers(repo: Path) -> list[psutil.Process]:
    """Live `python -m components.train_text` processes working in repo."""
    found = []
    for process in psutil.process_iter(["cmdline", "cwd", "status"]):
        info = process.info
        if info["status"] != psutil.STATUS_ZOMBIE and "components.train_text" in (info["cmdline"] or []):
            if info["cwd"] and Path(info["cwd"]) == repo:
                found.append(process)
    return found


def wait_for(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def sh_env() -> dict[str, str]:
    """The venv's environment, with DVC running stage commands through /bin/sh."""
    return {**venv_env(), "SHELL": "/bin/sh"}


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", *args], cwd=repo, env=sh_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture
def repo(tmp_path: Path, tiny_params: dict[str, Any], tiny_features: Path) -> Iterator[Path]:
    """The tiny pipeline with a train_text long enough to kill after its first checkpoint, its features in place."""
    params = dict(tiny_params)
    params["train_text"] = {
        **tiny_params["train_text"],
        "max_steps": MAX_STEPS,
        "checkpoint_every": 50,
        "log_every": 50,
        "validate_every": 0,
    }
    root = copy_repo(tmp_path / "repo", params).resolve()
    # The upstream stages' outputs, built once per session: only train_text runs here (`--single-item`).
    shutil.copytree(tiny_features / "text", root / "data" / "features" / "text")
    yield root
    for process in trainers(root):  # only if the guard failed: no orphan outlives the test
        process.kill()


def test_a_killed_dvc_repro_leaves_no_trainer_and_the_rerun_resumes(repo: Path, tmp_path: Path) -> None:
    checkpoints = repo / "models" / "checkpoints" / "text"
    log = tmp_path / "killed.log"
    with log.open("wb") as out:
        command = ["dvc", "repro", "--single-item", "train_text"]
        killed = subprocess.Popen(command, cwd=repo, env=sh_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        started = wait_for(lambda: any(checkpoints.glob("*/step-*.ckpt")) or killed.poll() is not None, timeout=300)
        assert started and killed.poll() is None, log.read_text()[-3000:]
        (trainer,) = trainers(repo)
        assert trainer.parent().name() == "sh"  # DVC ran it through the shell, which will outlive dvc
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    stopped = time.monotonic()
    assert wait_for(lambda: not trainers(repo), timeout=5), "the trainer outlived the dvc that started it"
    assert time.monotonic() - stopped < 3
    assert f"train_text: the process that started it (pid {killed.pid}) is gone; stopping" in log.read_text()
    assert not (repo / "models" / "text" / "training.json").exists()

    rerun = dvc(repo, "repro", "--single-item", "train_text")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    resumed = re.search(rf"resuming from \S+step-(\d+)\.ckpt \(step (\d+) of {MAX_STEPS}\)", rerun.stdout + rerun.stderr)
    assert resumed is not None, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert 50 <= int(resumed.group(2)) < MAX_STEPS
    assert json.loads((repo / "models" / "text" / "training.json").read_text())["steps"] == MAX_STEPS

    status = dvc(repo, "status", "train_text")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout
    # What git tracks after the run stays as committed when nothing changed: a no-op repro rewrites nothing.
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "trained"], cwd=repo, check=True)
    again = dvc(repo, "repro", "--single-item", "train_text")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert dirty.stdout == ""
