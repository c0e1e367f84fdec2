"""Shared fixtures: the real params.yaml shrunk to a tiny CPU configuration, and a temp copy of the repo."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.pipeline import load_stages

# Before anything imports Prefect, DVC or GE: no telemetry, and Prefect's state stays out of ~/.prefect.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The package stage writes to BentoML's store: a temporary one, never the user's ~/bentoml.
os.environ.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="bentoml-home-"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
# What a flow pushes goes to a temporary DVC remote, never the user's default (~/.cache/aigc-pipeline/dvc-remote).
os.environ.setdefault("AIGC_DVC_REMOTE", tempfile.mkdtemp(prefix="dvc-remote-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = list(load_stages(REPO_ROOT))
"""Every stage of dvc.yaml, in file order."""
# What a stage run needs from the repo; outputs (data/*, metrics/) are produced by the run itself.
REPO_FILES = [
    "components",
    "flows",
    "serving",
    "monitoring",
    ".gitignore",
    "dvc.yaml",
    "params.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    "data/.gitignore",
    "data/landing/README.md",
    "data/landed/README.md",
]


def shrink(params: dict[str, Any]) -> dict[str, Any]:
    """The real params with sizes cut so every stage runs in seconds on a CPU."""
    tiny = copy.deepcopy(params)
    tiny["ingest"]["text"].update(num_records=80, refs_per_record=2)
    tiny["ingest"]["batch_rows"] = 64
    tiny["validate"]["chunk_rows"] = 1000  # text fits one chunk, digits take two: chunking is exercised
    tiny["augment"]["images"]["copies"] = 1
    tiny["augment"]["restore"].update(patch_size=32, patches_per_image=2)
    tiny["features"]["text"]["vocab_size"] = 300
    tiny["features"]["images"]["image_size"] = 16
    tiny["train_text"]["model"] = {"n_layer": 1, "n_head": 2, "n_embd": 16, "max_length": 96, "dropout": 0.1}
    tiny["train_text"].update(
        max_steps=12, batch_size=4, warmup_steps=2, checkpoint_every=4, log_every=4, lr=3e-3, validate_every=6, validate_sources=4
    )
    tiny["evaluate_text"].update(max_new_tokens=12, batch_size=8, max_sources=6, samples=3)
    tiny["train_feature_net"]["model"] = {"width": 4, "feature_dim": 8, "dropout": 0.0}
    tiny["train_feature_net"].update(max_steps=20, batch_size=32, warmup_steps=2, checkpoint_every=10, log_every=10)
    tiny["train_image"]["model"].update(latent_dim=8, embed_dim=4, generator_width=8, discriminator_width=8)
    tiny["train_image"].update(max_steps=8, batch_size=8, checkpoint_every=4, log_every=4, sample_every=4, samples_per_class=2)
    tiny["train_diffusion"]["model"].update(block_channels=[8, 8], norm_groups=4, train_timesteps=50, sampling_steps=3)
    tiny["train_diffusion"].update(
        max_steps=6, batch_size=8, warmup_steps=2, checkpoint_every=3, log_every=3, sample_every=3, samples_per_class=2
    )
    tiny["evaluate_image"].update(
        samples_per_class=6,
        kid_subsets=5,
        kid_subset_size=10,
        batch_size=32,
        inception=False,
        grid_per_class=2,
        diffusion_steps=[2, 3],
    )
    tiny["train_restore"]["model"].update(width=8, blocks=1)
    tiny["train_restore"].update(crop_size=16, max_steps=10, batch_size=4, warmup_steps=2, checkpoint_every=5, log_every=5)
    tiny["evaluate_restore"]["comparison_crop"] = 16
    return tiny


@pytest.fixture(scope="session")
def real_params() -> dict[str, Any]:
    with (REPO_ROOT / "params.yaml").open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture
def tiny_params(real_params: dict[str, Any]) -> dict[str, Any]:
    return shrink(real_params)


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """What components.common.load_params returns for `name`."""
    return {**params[name], "base": params["base"]}


def run_data_stages(params: dict[str, Any], root: Path) -> Path:
    """ingest -> validate -> clean of `params` under root, as dvc.yaml lays them out; returns root/clean."""
    from components import clean, ingest, validate

    ingest.ingest(ingest.IngestConfig.from_params(section(params, "ingest")), root / "raw")
    validate.validate(
        validate.ValidateConfig.from_params(section(params, "validate")),
        root / "raw", root / "valid", root / "report", root / "quarantine",
    )  # fmt: skip
    clean.clean(
        clean.CleanConfig.from_params(section(params, "clean")),
        root / "valid", root / "clean", root / "report" / "report.json", root / "metrics" / "data.json",
    )  # fmt: skip
    return root / "clean"


def write_params(params: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def copy_repo(dest: Path, params: dict[str, Any]) -> Path:
    """A git + DVC checkout of the pipeline under dest, with the given params."""
    for name in REPO_FILES:
        src = REPO_ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            # Code only: never the runtime state a local service or flow left under monitoring/.
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "logs", "reports", "retrain"))
        else:
            shutil.copy2(src, target)
    write_params(params, dest / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    commit(dest, "pipeline under test")
    return dest


@pytest.fixture
def tiny_repo(tmp_path: Path, tiny_params: dict[str, Any]) -> Path:
    return copy_repo(tmp_path / "repo", tiny_params)


@dataclass(frozen=True)
class Reproduced:
    repo: Path
    stdout: str  # what the from-scratch `dvc repro` printed
    elsewhere: Path  # the same pipeline built from scratch at the same time by the training flow, on ELSEWHERE
    flow_summary: str  # the markdown summary that flow run published (its stages and their status)


def machine(threads: int, hash_seed: int) -> dict[str, str]:
    """Environment of a machine with another core count and another Python hash seed."""
    count = str(threads)
    return {"OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count, "RAYON_NUM_THREADS": count, "PYTHONHASHSEED": str(hash_seed)}


ELSEWHERE = machine(1, 4242)
"""The second machine of the session's reproduction: one thread, another hash seed."""


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """One temporary Prefect API for the whole session (starting one takes ~20 s); yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any], prefect_harness: str) -> Reproduced:
    """The tiny pipeline built from scratch twice per session, at the same time: by `dvc repro` (outputs
    committed with dvc.lock), and elsewhere by the Prefect training flow as a user starts it, for
    tests/e2e/test_reproducibility.py to compare and tests/flows/test_training_flow.py to rerun.

    A full build costs minutes of process starts, each mostly one core's work, so the two runs take
    little longer than one on two cores. Tests that begin from a reproduced pipeline take a copy
    (copy_reproduced) and rerun only what they change.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("reproduced")
    repo = copy_repo(root / "repo", shrink(real_params))
    elsewhere = copy_repo(root / "elsewhere" / "deeper" / "b", shrink(real_params))
    # The other machine has its own BentoML store and DVC remote, as it would: `package` runs on both at once.
    other_machine = {
        **ELSEWHERE,
        "BENTOML_HOME": str(root / "bentoml-elsewhere"),
        "AIGC_DVC_REMOTE": str(root / "dvc-remote-elsewhere"),
        "PREFECT_API_URL": prefect_harness,
    }
    commands = (["dvc", "repro"], [sys.executable, "-m", "flows.training", "--repo", str(elsewhere)])

    def build(where: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=where, env={**venv_env(), **env}, capture_output=True, text=True, timeout=1800)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(build, (repo, elsewhere), commands, ({}, other_machine)))
    for where, run in zip((repo, elsewhere), runs, strict=True):
        if run.returncode != 0:
            pytest.fail(f"the session's tiny build in {where} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    commit(repo, "pipeline reproduced")
    return Reproduced(repo, runs[0].stdout, elsewhere, flow_summary(elsewhere))


def flow_summary(repo: Path) -> str:
    """The markdown summary of the last training flow run in `repo` (its `pipeline-run` artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC) if r.parameters.get("repo_root") == str(repo)]
        assert runs, f"no training flow run of {repo} recorded"
        run = runs[0].id
        only = ArtifactFilter(key=ArtifactFilterKey(any_=["pipeline-run"]), flow_run_id=ArtifactFilterFlowRunId(any_=[run]))
        artifacts = client.read_artifacts(artifact_filter=only)
    assert len(artifacts) == 1, artifacts
    return str(artifacts[0].data)


def commit(repo: Path, message: str) -> None:
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)


def copy_reproduced(source: Reproduced, dest: Path, params: dict[str, Any] | None = None) -> Path:
    """A copy of the session's reproduced repo (git history and DVC cache included) at dest; with `params`, its
    params.yaml is replaced and committed."""
    shutil.copytree(source.repo, dest, symlinks=True)
    if params is not None:
        write_params(params, dest / "params.yaml")
        commit(dest, "params under test")
    return dest


def venv_env() -> dict[str, str]:
    """Environment whose `python` and `dvc` are this interpreter's, as the README's activated venv has."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]) -> Path:
    """data/features of the tiny configuration, built once per session: <root>/features/text etc."""
    from components import augment, features

    tiny = shrink(real_params)
    root = tmp_path_factory.mktemp("pipeline")
    clean_dir = run_data_stages(tiny, root)
    augment.augment(augment.AugmentConfig.from_params(section(tiny, "augment")), clean_dir, root / "augmented")
    features.features(
        features.FeaturesConfig.from_params(section(tiny, "features")), clean_dir, root / "augmented", root / "features"
    )
    return root / "features"


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real Prometheus Pushgateway on a free port, for the monitoring loop's metrics (tests/observability.py)."""
    from tests.observability import start_pushgateway

    daemon = start_pushgateway(tmp_path_factory.mktemp("pushgateway"))
    yield daemon
    daemon.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_ready(process: subprocess.Popen[bytes], url: str, seconds: float, what: str, log: Callable[[], str] = str) -> None:
    """Poll `url` until it answers 200; a process that exits, or stays unready for `seconds`, is an error (killed
    in the second case) naming `what` and the tail of its `log`."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{what} not ready in {seconds:g} s: {log()[-2000:]}")
