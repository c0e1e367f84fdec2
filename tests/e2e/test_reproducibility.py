"""A fresh `dvc repro` reproduces dvc.lock byte for byte, and experiments compare in `dvc exp show` / `dvc plots diff`.

Two fresh copies of the tiny pipeline at different paths, with different hash seeds and thread counts in the
environment, one built by `dvc repro` and one by the Prefect training flow (the session's two from-scratch
runs, tests/conftest.py `reproduced`), must write the same dvc.lock, byte for byte: every hashed output is a
function of params, code and data, and the flow runs the stages in `dvc repro`'s order. Then two experiments of one copy render
side by side: both runs' curves and sample grids in the plots HTML.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Reproduced, copy_reproduced, machine, venv_env

pytestmark = pytest.mark.slow


def dvc(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(["dvc", *args], cwd=repo, env={**venv_env(), **env}, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"dvc {' '.join(args)}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def test_two_fresh_copies_write_the_same_dvc_lock_and_experiments_compare(reproduced: Reproduced, tmp_path: Path) -> None:
    # The session's two from-scratch runs: `dvc repro` with the environment's thread count and a random hash seed,
    # and at the same time the training flow at another path, deeper, with one thread and another hash seed
    # (tests/conftest.py ELSEWHERE).
    lock = (reproduced.repo / "dvc.lock").read_text()
    assert lock == (reproduced.elsewhere / "dvc.lock").read_text()
    assert str(reproduced.repo) not in lock and str(reproduced.elsewhere) not in lock
    assert "cmd: python -m" in lock and "md5:" in lock

    first = copy_reproduced(reproduced, tmp_path / "a")
    # Retrain in place on another "machine": no checkpoint to resume, every step runs again.
    shutil.rmtree(first / "models" / "checkpoints")
    again = dvc(first, "repro", "--force", "--single-item", "train_restore", "train_image", **machine(1, 7))
    assert "Running stage 'train_restore'" in again.stdout and "Running stage 'train_image'" in again.stdout
    status = subprocess.run(["git", "status", "--porcelain"], cwd=first, capture_output=True, text=True, check=True)
    assert status.stdout == "", status.stdout

    for name, lr in (("slow-gan", "1.0e-4"), ("fast-gan", "4.0e-4")):
        dvc(first, "exp", "run", "-n", name, "-S", f"train_image.lr={lr}")
    shown = json.loads(dvc(first, "exp", "show", "--json").stdout)
    runs = {group["name"]: group["revs"][0]["data"] for commit in shown for group in commit.get("experiments") or []}
    assert set(runs) == {"slow-gan", "fast-gan"}
    assert {name: data["params"]["params.yaml"]["data"]["train_image"]["lr"] for name, data in runs.items()} == {
        "slow-gan": 1.0e-4,
        "fast-gan": 4.0e-4,
    }
    assert all("fid_domain" in data["metrics"]["metrics/image.json"]["data"] for data in runs.values())
    html = tmp_path / "plots"
    dvc(first, "plots", "diff", "slow-gan", "fast-gan", "-o", str(html))
    page = (html / "index.html").read_text()
    for name in ("slow-gan", "fast-gan"):
        assert name in page
    assert "loss_generator" in page
    grids = [p.name for p in (html / "static").glob("*.png")]
    for name in ("slow-gan", "fast-gan"):
        assert any(name in grid and "samples" in grid for grid in grids), grids
