"""dvc.yaml as code reads it (components.pipeline), and the CPU-thread pin that makes outputs reproducible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.common import ConfigError
from components.pipeline import load_stages, stage
from components.runtime import cpu_threads_from_params
from tests.conftest import REPO_ROOT, section


def test_stages_modules_arguments_and_outputs_come_from_dvc_yaml() -> None:
    stages = load_stages(REPO_ROOT)
    assert list(stages)[0] == "ingest" and "package" in stages
    net = stages["train_feature_net"]
    assert net.module == "components.train_feature_net"
    assert net.argument(0) == Path("data/features/images") and net.argument(1) == Path("models/feature_net")
    assert net.argument("--reference") == Path("data/fid_reference")
    assert stages["evaluate_text"].only_out() == Path("data/evaluation/text/outputs.parquet")
    assert stages["evaluate_restore"].only_metrics() == Path("metrics/restore.json")
    assert stages["package"].config().__name__ == "PackageConfig"
    assert stages["clean"].config().__name__ == "CleanConfig"
    # Every stage that reads its own params section exposes its config, so the flow checks them all up front.
    readers = {name for name, st in stages.items() if any(not p.startswith("base.") for p in st.params)}
    assert {name for name, st in stages.items() if st.config() is not None} == readers
    # Two stages may run one module on one section; each section a stage reads is one DVC tracks for it.
    assert stages["evaluate_diffusion"].params_section == "evaluate_image"
    assert all(any(p.split(".")[0] == st.params_section for p in st.params) for st in stages.values() if st.config())


def test_the_repo_params_pass_every_stage_check() -> None:
    from flows.stages import params_problems

    assert params_problems(list(load_stages(REPO_ROOT)), repo_root=str(REPO_ROOT)) == []


def test_unknown_stage_option_or_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="no stage 'nope'"):
        stage("nope", REPO_ROOT)
    with pytest.raises(ValueError, match="has no option --nope"):
        stage("validate", REPO_ROOT).argument("--nope")
    with pytest.raises(ValueError, match="expected one"):
        stage("train_feature_net", REPO_ROOT).only_out()  # a model folder and the reference
    with pytest.raises(FileNotFoundError, match="no dvc.yaml"):
        load_stages(tmp_path)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "two"])
def test_cpu_threads_must_be_a_positive_integer_or_null(bad: Any) -> None:
    with pytest.raises(ConfigError, match="'base.cpu_threads'"):
        cpu_threads_from_params({"cpu_threads": bad})
    assert cpu_threads_from_params({"cpu_threads": None}) is None and cpu_threads_from_params({}) is None


def test_every_compute_stage_reads_the_thread_pin(tiny_params: dict[str, Any]) -> None:
    from components import evaluate_image, evaluate_restore, evaluate_text, train_text

    tiny_params["base"]["cpu_threads"] = 3
    assert train_text.TrainTextConfig.from_params(section(tiny_params, "train_text")).train.cpu_threads == 3
    for module, name in (
        (evaluate_text, "evaluate_text"),
        (evaluate_image, "evaluate_image"),
        (evaluate_restore, "evaluate_restore"),
    ):
        assert module.CONFIG.from_params(section(tiny_params, name)).cpu_threads == 3
    for stage_name in ("train_text", "evaluate_text", "train_image", "evaluate_image", "train_restore", "train_feature_net"):
        assert "base.cpu_threads" in stage(stage_name, REPO_ROOT).params


def test_the_pin_overrides_the_environment() -> None:
    code = "import torch; from components import runtime; runtime.evaluation_device('cpu', 2); print(torch.get_num_threads())"
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"
