"""The drift flow on a tiny pipeline: drift -> exactly one retrain (a real `dvc exp run`) per cooldown;
clean or too-small windows -> none."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.monitoring import drift_check
from monitoring.simulate import write_simulated_log
from tests.conftest import Reproduced, copy_reproduced, venv_env
from tests.observability import Daemon, samples

pytestmark = pytest.mark.slow


@pytest.fixture
def built_repo(reproduced: Reproduced, tmp_path: Path, tiny_params: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    tiny_params["monitor"].update(min_rows=50, cooldown_hours=24)  # read by the flow, by no stage: still reproduced
    repo = copy_reproduced(reproduced, tmp_path / "repo", tiny_params)
    monkeypatch.setenv("PATH", venv_env()["PATH"])
    status = subprocess.run(["dvc", "status"], cwd=repo, env=venv_env(), capture_output=True, text=True, timeout=300)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    return repo


def experiments(repo: Path) -> list[str]:
    out = subprocess.run(["dvc", "exp", "list", "--name-only"], cwd=repo, env=venv_env(), capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def test_drift_triggers_one_retrain_within_the_cooldown_and_clean_windows_none(
    built_repo: Path, pushgateway: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIGC_PUSHGATEWAY", pushgateway.url)
    reference = built_repo / "data" / "features" / "reference"
    clean = drift_check(repo_root=str(built_repo))
    assert clean["retrain"] is None and all(r["decision"] == "skipped" for r in clean["results"].values())

    write_simulated_log(reference, built_repo / "monitoring" / "logs", 300, shift=0.0, seed=1)
    no_drift = drift_check(repo_root=str(built_repo))
    assert no_drift["drifted"] == [] and no_drift["retrain"] is None

    write_simulated_log(reference, built_repo / "monitoring" / "logs", 3000, shift=1.0, seed=2)
    first = drift_check(repo_root=str(built_repo))
    assert first["drifted"] and first["retrain"] is not None
    second = drift_check(repo_root=str(built_repo))  # still drifted, within the cooldown
    assert second["drifted"] and second["retrain"] is None and second["action"].startswith("cooldown:")
    assert experiments(built_repo) == [first["retrain"]]
    assert Path(first["report"], "decision.json").is_file()
    # The retrain reproduced the same models (same data, same seeds): not worse, so promoted, and recorded.
    history = json.loads((built_repo / "monitoring" / "promotion" / "history.json").read_text())
    assert [(h["experiment"], h["promoted"]) for h in history] == [(first["retrain"], True)]
    assert {c["family"] for c in history[0]["comparisons"]} == {"text", "image", "diffusion", "restore"}
    assert all(c["delta"] == pytest.approx(0, abs=1e-6) for c in history[0]["comparisons"])
    # The flows pushed the loop's state: the drifted families, the retrain and the promotion it made.
    pushed = {name: [(labels, v) for labels, v in found if labels.get("job") == "aigc_loop"]  # params observability.job
              for name, found in samples(httpx.get(f"{pushgateway.url}/metrics", timeout=10).text).items()}  # fmt: skip
    assert {labels["family"] for labels, v in pushed["aigc_drift_detected"] if v == 1} == set(second["drifted"])
    threshold = pushed["aigc_drift_share_threshold"][0][1]
    assert {labels["family"] for labels, v in pushed["aigc_drift_share"] if v >= threshold} == set(second["drifted"])
    assert pushed["aigc_retrains_started"][0][1] == 1
    assert len(pushed["aigc_last_retrain_timestamp_seconds"]) == len(pushed["aigc_last_promotion_timestamp_seconds"]) == 1
