"""The Prefect flow runs the DVC stages in DVC's order, skips what is up to date, and does not retry bad data."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.states import Failed

from flows.stages import PermanentStageError, _exit_code, _retry_transient, dvc_stage_order, summary_markdown
from flows.training import training
from tests.conftest import REPO_ROOT, STAGES, Reproduced, copy_repo, venv_env

# (stage, a stage it depends on): the order must respect each.
DEPENDENCIES = [("validate", "ingest"), ("clean", "validate"), ("augment", "clean"), ("features", "augment"),
                ("train_text", "features"), ("evaluate_text", "train_text"), ("train_image", "features"),
                ("evaluate_image", "train_image"), ("evaluate_image", "train_feature_net"),
                ("train_diffusion", "features"), ("evaluate_diffusion", "train_diffusion"),
                ("evaluate_diffusion", "train_feature_net"),
                ("evaluate_restore", "train_restore"), ("package", "evaluate_text"), ("package", "evaluate_image"),
                ("package", "evaluate_diffusion"), ("package", "evaluate_restore"),
                *[("compress", f"train_{family}") for family in ("text", "image", "diffusion", "restore")],
                *[(f"evaluate_{family}", "compress") for family in ("text", "image", "diffusion", "restore")],
                ("package", "compress")]  # fmt: skip


@pytest.fixture(autouse=True)
def venv_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", venv_env()["PATH"])


def test_stage_order_comes_from_dvc(tiny_repo: Path) -> None:
    order = dvc_stage_order(tiny_repo)
    assert sorted(order) == sorted(STAGES)
    assert all(order.index(stage) > order.index(dependency) for stage, dependency in DEPENDENCIES)
    assert dvc_stage_order(tiny_repo, ["features", "ingest"]) == ["ingest", "features"]
    with pytest.raises(ValueError, match="unknown stage"):
        dvc_stage_order(tiny_repo, ["train_everything"])


@pytest.mark.slow
def test_flow_runs_every_stage_then_skips_them(reproduced: Reproduced, tmp_path: Path) -> None:
    # The session's second from-scratch build was this flow's (`python -m flows.training`, tests/conftest.py).
    ran = [row for row in reproduced.flow_summary.splitlines() if row.startswith("| ") and " | ran | " in row]
    assert [row.split(" | ")[0].removeprefix("| ") for row in ran] == dvc_stage_order(reproduced.elsewhere)
    assert (reproduced.elsewhere / "data" / "features" / "reference" / "text.parquet").is_file()

    repo = tmp_path / "repo"  # a copy, so the session's build stays as it was built
    shutil.copytree(reproduced.elsewhere, repo, symlinks=True)
    second = training(repo_root=str(repo))
    assert [r.status for r in second] == ["up to date"] * len(STAGES)
    with get_client(sync_client=True) as client:
        markdown = [a.data for a in client.read_artifacts() if a.key == "pipeline-run"]
    assert any("| features | up to date |" in m and "| text | 160 | 160 | 0 |" in m for m in markdown)


@pytest.mark.slow
def test_bad_params_stop_the_flow_before_any_stage_touches_outputs(tiny_repo: Path) -> None:
    assert [r.status for r in training(stages=["ingest"], repo_root=str(tiny_repo))] == ["ran"]
    before = (tiny_repo / "data" / "raw" / "text.parquet").read_bytes()
    params = (tiny_repo / "params.yaml").read_text()
    (tiny_repo / "params.yaml").write_text(
        params.replace("max_quarantine_ratio: 0.05", "max_quarantine_ratio: 5").replace("num_records: 80", "num_records: 81")
    )
    state = training(repo_root=str(tiny_repo), return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert [r.name for r in runs] == ["check-params"]  # no dvc-* task ran
    assert "validate.max_quarantine_ratio" in (runs[0].state.message or "")
    assert (tiny_repo / "data" / "raw" / "text.parquet").read_bytes() == before  # ingest's outputs untouched


@pytest.mark.slow
def test_a_stage_failing_on_bad_data_is_not_retried(tmp_path: Path, tiny_params: dict[str, Any]) -> None:
    tiny_params["validate"]["max_quarantine_ratio"] = 0.0
    tiny_params["validate"]["text"]["max_reference_chars"] = 100  # some generated copy is longer
    repo = copy_repo(tmp_path / "repo", tiny_params)
    state = training(stages=["ingest", "validate"], repo_root=str(repo), return_state=True)
    assert state.is_failed()
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    validate_run = next(r for r in runs if r.name == "dvc-validate")
    assert validate_run.state.is_failed()
    assert validate_run.run_count == 1  # bad data is not transient: no retry
    assert "bad data (exit 65)" in (validate_run.state.message or "")


def test_retry_condition_retries_only_transient_errors() -> None:
    assert _retry_transient(None, None, Failed(data=OSError("disk hiccup"))) is True
    assert _retry_transient(None, None, Failed(data=PermanentStageError("bad data"))) is False


def test_exit_code_is_read_from_the_dvc_error_chain() -> None:
    try:
        try:
            raise RuntimeError("failed to run: python -m components.validate, exited with 65")
        except RuntimeError as inner:
            raise ValueError("failed to reproduce 'validate'") from inner
    except ValueError as outer:
        assert _exit_code(outer) == 65


def test_summary_lists_stages_and_data(tmp_path: Path) -> None:
    from flows.stages import StageResult

    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")  # where the metrics files are
    (tmp_path / "metrics").mkdir()
    metrics = tmp_path / "metrics" / "data.json"  # as under the repo root
    metrics.write_text(
        '{"text": {"rows_in": 3, "rows_valid": 2, "rows_quarantined": 1, "duplicates_removed": 0,'
        ' "splits": {"train": 1, "val": 1, "test": 0}}}'
    )
    text = summary_markdown([StageResult("ingest", "ran", 1.0)], tmp_path)
    assert "| ingest | ran | 1.0 |" in text and "| text | 3 | 2 | 1 | 0 | 1 | 1 | 0 |" in text
    assert "## Models" not in text
    (tmp_path / "metrics" / "restore.json").write_text('{"psnr": 31.5, "psnr_baseline": 30.1, "task": "x"}')
    with_models = summary_markdown([], tmp_path)
    assert "| restore | psnr 31.5, psnr_baseline 30.1, task x |" in with_models
