"""`dvc repro` of the data stages on the tiny configuration, in a temp git + DVC copy of the repo; its outputs
shared with a clone through a DVC remote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.remote import ENV_VAR
from tests.conftest import REPO_ROOT, STAGES, Reproduced, copy_reproduced, venv_env

pytestmark = pytest.mark.slow


def dvc(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", *args], cwd=repo, env=env or venv_env(), capture_output=True, text=True, timeout=600)


def run(repo: Path, env: dict[str, str], *command: str) -> str:
    done = subprocess.run(list(command), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def dvc_outputs(repo: Path) -> dict[str, bytes]:
    """Every file of every output dvc.lock lists (folders walked; metrics and plots too), by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    found = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = repo / out["path"]
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                found[file.relative_to(repo).as_posix()] = file.read_bytes()
    return found


def test_repro_builds_every_output_then_a_rerun_does_nothing(reproduced: Reproduced, tmp_path: Path) -> None:
    for stage in STAGES:  # the session's from-scratch run of the tiny pipeline
        assert f"Running stage '{stage}'" in reproduced.stdout
    tiny_repo = copy_reproduced(reproduced, tmp_path / "repo")

    for path in [
        "data/raw/text.parquet",
        "data/validated/images.parquet",
        "data/quarantine/restore.parquet",
        "data/validation/report.json",
        "data/validation_docs/index.html",
        "data/clean/text.parquet",
        "data/augmented/images.parquet",
        "data/features/text/tokenizer.json",
        "data/features/images/train.safetensors",
        "data/features/restore/test.safetensors",
        "data/features/reference/text.parquet",
        "models/text/model.safetensors",
        "models/text/training.json",
        "data/evaluation/text/outputs.parquet",
        "data/evaluation/text/samples.csv",
        "metrics/train_text/plots/metrics/train/loss.tsv",
        "models/feature_net/model.safetensors",
        "data/fid_reference/test.safetensors",
        "models/image/model.safetensors",
        "metrics/train_image/samples/step-00000008.png",
        "data/evaluation/image/samples.png",
        "models/diffusion/model.safetensors",
        "metrics/train_diffusion/samples/step-00000006.png",
        "data/evaluation/diffusion/samples.png",
        "data/evaluation/diffusion/fid_by_steps.csv",
        "models/restore/model.safetensors",
        "data/evaluation/restore/comparison.png",
        "models/bento.json",
        "dvc.lock",
    ]:
        assert (tiny_repo / path).is_file(), path
    metrics = json.loads((tiny_repo / "metrics" / "data.json").read_text())
    assert metrics["text"]["rows_in"] == 160 and metrics["images"]["rows_in"] == 1797
    text = json.loads((tiny_repo / "metrics" / "text.json").read_text())
    assert {"bleu", "chrf", "perplexity", "bleu_retrieval_baseline", "sacrebleu_signature"} <= set(text)
    assert {"value_coverage", "slot_error_rate", "hallucinated_names", "value_coverage_retrieval_baseline"} <= set(text)
    # The default data is split by product name: the metrics say so, and test products are new.
    assert text["split"]["by"] == "group" and text["split"]["group"] == "name" and text["entity_keys"] == ["name"]
    assert metrics["text"]["split_by"] == "group" and text["copied_keys"]["name"] == "hidden"
    image = json.loads((tiny_repo / "metrics" / "image.json").read_text())
    assert {"fid_domain", "kid_domain", "fid_domain_floor", "feature_net_accuracy"} <= set(image)
    diffusion = json.loads((tiny_repo / "metrics" / "diffusion.json").read_text())
    assert set(image) < set(diffusion) and diffusion["fid_domain_floor"] == image["fid_domain_floor"]  # same reference
    restore = json.loads((tiny_repo / "metrics" / "restore.json").read_text())
    assert {"psnr", "ssim", "psnr_y", "psnr_baseline", "ssim_baseline", "psnr_y_baseline", "task"} <= set(restore)

    shown = dvc(tiny_repo, "metrics", "show", "--json")
    assert shown.returncode == 0 and "rows_quarantined" in shown.stdout

    second = dvc(tiny_repo, "repro")
    assert second.returncode == 0, second.stderr
    assert "Data and pipelines are up to date." in second.stdout
    assert "Running stage" not in second.stdout

    # Another machine: push to a remote, clone (dvc.lock is committed), point the clone at the same remote, pull.
    outputs = dvc_outputs(tiny_repo)
    assert "models/text/model.safetensors" in outputs and "data/raw/text.parquet" in outputs
    team = {**venv_env(), ENV_VAR: str(tmp_path / "team-remote")}
    assert "files pushed" in run(tiny_repo, team, sys.executable, "-m", "flows.remote", "push")
    assert run(tiny_repo, team, "git", "status", "--porcelain") == ""  # pushing changed nothing git tracks
    assert (tiny_repo / ".dvc" / "config").read_bytes() == (REPO_ROOT / ".dvc" / "config").read_bytes()
    assert run(tiny_repo, team, "git", "ls-files", ".dvc") == ".dvc/.gitignore\n.dvc/config\n"  # config.local stays out
    clone = tmp_path / "clone"
    run(tmp_path, team, "git", "clone", "-q", str(tiny_repo), str(clone))
    run(clone, team, sys.executable, "-m", "flows.remote", "configure")
    run(clone, venv_env(), "dvc", "pull")
    assert "Data and pipelines are up to date." in run(clone, venv_env(), "dvc", "status")
    assert dvc_outputs(clone) == outputs

    # No configuration at all: .dvc/config's default remote, ~/.cache/aigc-pipeline/dvc-remote (a fresh HOME here).
    home = {**{k: v for k, v in venv_env().items() if k != ENV_VAR}, "HOME": str(tmp_path / "home")}
    run(tiny_repo, home, sys.executable, "-m", "flows.remote", "push")  # drops the `aigc` default it wrote above
    assert any((tmp_path / "home" / ".cache" / "aigc-pipeline" / "dvc-remote").rglob("*"))
    bare = tmp_path / "bare-clone"
    run(tmp_path, home, "git", "clone", "-q", str(tiny_repo), str(bare))
    run(bare, home, "dvc", "pull")
    assert dvc_outputs(bare) == outputs


def test_param_change_reruns_only_the_stages_that_read_it(reproduced: Reproduced, tmp_path: Path) -> None:
    tiny_repo = copy_reproduced(reproduced, tmp_path / "repo")
    params = (tiny_repo / "params.yaml").read_text()
    (tiny_repo / "params.yaml").write_text(params.replace("image_size: 16", "image_size: 8"))
    rerun = dvc(tiny_repo, "repro")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    image_stages = [
        "features", "train_feature_net", "train_image", "evaluate_image", "train_diffusion", "evaluate_diffusion", "compress",
        "package",
    ]  # fmt: skip
    for stage in image_stages:
        assert f"Running stage '{stage}'" in rerun.stdout
    # The text and restore features are byte-identical after an image-size change: their models are not retrained.
    for stage in [s for s in STAGES if s not in image_stages]:
        assert f"Running stage '{stage}'" not in rerun.stdout


def test_dag_shows_the_stages(tiny_repo: Path) -> None:
    dag = dvc(tiny_repo, "dag", "--md")
    assert dag.returncode == 0
    for stage in STAGES:
        assert stage in dag.stdout


def test_bad_params_fail_the_stage_with_the_key_named(tiny_repo: Path) -> None:
    params = (tiny_repo / "params.yaml").read_text()
    (tiny_repo / "params.yaml").write_text(params.replace("max_quarantine_ratio: 0.05", "max_quarantine_ratio: 5"))
    run = dvc(tiny_repo, "repro", "validate")
    assert run.returncode != 0
    assert "validate.max_quarantine_ratio" in run.stdout + run.stderr
