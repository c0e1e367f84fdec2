"""The unattended loop end to end on tiny params, with real DVC experiments, Prefect flows and services:
a worse challenger is rejected and nothing served changes; two triggers at once start one retrain; landed
data is snapshotted and reproducible after the landing folder is emptied; a challenger the gate lets
through is served from the next start; `--rollback` serves the old champion again. Every retrain, promoted or
not, is pushed to the git remote (`dvc exp push`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from flows.monitoring import drift_check, retrain
from monitoring.simulate import write_simulated_log
from tests.conftest import Reproduced, copy_reproduced, venv_env, write_params
from tests.serving.conftest import Server, start_server, stop_server

pytestmark = pytest.mark.slow


GENERATORS = {"image": "gan", "diffusion": "diffusion"}
"""generate_image's generator for each image model family."""


def served_tags(server: Server) -> dict[str, str]:
    """The tag that answers a request of each generating family: text, and both image generators."""
    text = httpx.post(f"{server.url}/generate_text", json={"prompt": "name: a", "max_new_tokens": 4}, timeout=60)
    assert text.status_code == 200, text.text
    tags = {"text": text.headers["x-model-tag"]}
    for family, generator in GENERATORS.items():
        image = httpx.post(f"{server.url}/generate_image", json={"label": "1", "generator": generator}, timeout=60)
        assert image.status_code == 200, image.text
        tags[family] = image.headers["x-model-tag"]
    return tags


def generating(models: dict[str, str]) -> dict[str, str]:
    """A receipt's tags of the families served_tags asks."""
    return {family: models[family] for family in ("text", *GENERATORS)}


def fresh_server(repo: Path, log_dir: Path) -> dict[str, str]:
    server = start_server(Path(os.environ["BENTOML_HOME"]), log_dir, AIGC_PROMOTED=str(repo / "models" / "promoted.json"))
    try:
        return served_tags(server)
    finally:
        stop_server(server)


def run(repo: Path, *command: str) -> str:
    done = subprocess.run(list(command), cwd=repo, env=venv_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def pushed_experiments(repo: Path) -> list[str]:
    """Names of the experiments the repo's git remote `origin` holds (refs/exps/<baseline>/<name>)."""
    return [line.rsplit("/", 1)[-1] for line in run(repo, "git", "ls-remote", "origin", "refs/exps/*").splitlines()]


def ingest_out(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return lock["stages"]["ingest"]["outs"][0]["md5"]


def test_the_retrain_loop_never_serves_a_rejected_model_and_rolls_back(
    reproduced: Reproduced, tmp_path: Path, tiny_params: dict[str, Any]
) -> None:
    tiny_params["monitor"].update(min_rows=50, cooldown_hours=0)
    tiny_params["promotion"].update(tolerance_bleu=0.0, tolerance_fid=0.0, tolerance_psnr=0.0)
    repo = copy_reproduced(reproduced, tmp_path / "repo", tiny_params)  # no stage reads monitor or promotion
    assert "Data and pipelines are up to date." in run(repo, "dvc", "repro")
    run(repo, "git", "init", "-q", "--bare", str(tmp_path / "origin.git"))  # the team's git remote
    run(repo, "git", "remote", "add", "origin", str(tmp_path / "origin.git"))
    run(repo, sys.executable, "-m", "monitoring.promote", "--why", "first champion")
    champion = json.loads((repo / "models" / "bento.json").read_text())["models"]
    running = start_server(
        Path(os.environ["BENTOML_HOME"]), tmp_path / "log-running", AIGC_PROMOTED=str(repo / "models" / "promoted.json")
    )
    try:
        assert served_tags(running) == generating(champion)

        # A worse challenger (one training step per family), asked for by the schedule and by drift at once.
        worse = json.loads(json.dumps(tiny_params))
        for stage in ("train_text", "train_image", "train_restore"):
            worse[stage]["max_steps"] = 1
        write_params(worse, repo / "params.yaml")
        write_simulated_log(repo / "data" / "features" / "reference", repo / "monitoring" / "logs", 3000, shift=1.0, seed=2)
        scheduled: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: scheduled.update(retrain(str(repo), trigger="schedule")))
        thread.start()
        requests_file = repo / "monitoring" / "retrain" / "requests.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (requests_file.is_file() and '"started": true' in requests_file.read_text()):
            time.sleep(0.2)  # the schedule's retrain holds the gate: now drift asks too
        drifted = drift_check(repo_root=str(repo))
        thread.join(timeout=900)
        assert drifted["drifted"] and drifted["retrain"] is None
        assert drifted["action"].startswith("refused: a retrain is already running") and "trigger schedule" in drifted["action"]
        assert scheduled["started"] and not scheduled["promoted"]
        assert scheduled["pushed_to"] == str(tmp_path / "origin.git")
        assert pushed_experiments(repo) == [scheduled["experiment"]]  # rejected, yet shared with the team
        requests = [json.loads(line) for line in requests_file.read_text().splitlines()]
        assert sorted((r["trigger"] == "schedule", r["started"]) for r in requests) == [(False, False), (True, True)]
        history = json.loads((repo / "monitoring" / "promotion" / "history.json").read_text())
        assert history[-1]["experiment"] == scheduled["experiment"] and history[-1]["promoted"] is False
        # The challenger is in the model store (its experiment packaged it), yet nothing serves it.
        assert served_tags(running) == generating(champion)
    finally:
        stop_server(running)
    assert fresh_server(repo, tmp_path / "log-fresh") == generating(champion)

    # New data lands; a challenger the gate lets through (more text steps, generous tolerances) is promoted.
    better = json.loads(json.dumps(tiny_params))
    better["train_text"]["max_steps"] = 24
    better["promotion"].update(tolerance_bleu=100.0, tolerance_fid=100.0, tolerance_psnr=100.0)
    write_params(better, repo / "params.yaml")
    (repo / "data" / "landing" / "text").mkdir(parents=True)
    (repo / "data" / "landing" / "text" / "week48.csv").write_text("source,reference\nname: Zorvik One,The Zorvik One.\n")
    manual = retrain(str(repo), trigger="manual")
    assert manual["started"] and manual["promoted"] and manual["landing_snapshot"]
    assert sorted(pushed_experiments(repo)) == sorted([scheduled["experiment"], manual["experiment"]])
    promoted = json.loads((repo / "models" / "bento.json").read_text())["models"]
    now_served = json.loads((repo / "models" / "promoted.json").read_text())["current"]
    assert now_served["models"] == promoted and now_served["experiment"] == manual["experiment"]
    assert promoted["text"] != champion["text"]
    raw = pq.read_table(repo / "data" / "raw" / "text.parquet", columns=["record_id"]).column(0).to_pylist()
    assert any(i.startswith(f"landed/{manual['landing_snapshot']}/") for i in raw)
    assert fresh_server(repo, tmp_path / "log-promoted")["text"] == promoted["text"]

    # The landing folder emptied and the snapshot gone from the workspace: the retrain still reproduces.
    data_version = ingest_out(repo)
    shutil.rmtree(repo / "data" / "landing" / "text")
    shutil.rmtree(repo / "data" / "landed" / manual["landing_snapshot"])
    shutil.rmtree(repo / "data" / "raw")
    run(repo, "dvc", "exp", "apply", manual["experiment"])
    run(repo, "dvc", "repro")
    assert ingest_out(repo) == data_version

    rolled = run(repo, sys.executable, "-m", "monitoring.promote", "--rollback", "--why", "test: back to the first")
    assert "rolled back" in rolled
    assert fresh_server(repo, tmp_path / "log-rolled-back") == generating(champion)
    # The workspace still holds the rolled-back models and the champion came from no experiment: a retrain
    # would be judged against the wrong models, so it is refused before it runs.
    refused = retrain(str(repo), trigger="manual", ignore_cooldown=True)
    assert not refused["started"] and "not the served champion" in refused["reason"]
