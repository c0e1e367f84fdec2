"""A running service over tiny models the tests train: `bentoml serve` on a free port, its own model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serving.promoted import FAMILIES
from tests.conftest import REPO_ROOT, free_port, section, shrink, wait_until_ready


@dataclass
class Server:
    url: str
    log_dir: Path
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="session")
def tiny_models(tiny_features: Path, tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]) -> Path:
    """models/{text,image,restore,diffusion} trained on the tiny configuration (a few seconds), and their
    compressed copies in models/compressed (the compress stage's)."""
    from components import compress, train_diffusion, train_image, train_restore, train_text

    tiny = shrink(real_params)
    root = tmp_path_factory.mktemp("models")
    train_text.train_text(
        train_text.TrainTextConfig.from_params(section(tiny, "train_text")), tiny_features / "text", root / "text", root / "ckpt"
    )
    train_image.train_image(
        train_image.TrainImageConfig.from_params(section(tiny, "train_image")),
        tiny_features / "images",
        root / "image",
        root / "ckpt",
    )
    train_restore.train_restore(
        train_restore.TrainRestoreConfig.from_params(section(tiny, "train_restore")),
        tiny_features / "restore", root / "restore", root / "ckpt",
    )  # fmt: skip
    train_diffusion.train_diffusion(
        train_diffusion.TrainDiffusionConfig.from_params(section(tiny, "train_diffusion")),
        tiny_features / "images", root / "diffusion", root / "ckpt",
    )  # fmt: skip
    compress.compress(
        compress.CompressConfig.from_params(section(tiny, "compress")), {f: root / f for f in FAMILIES}, root / "compressed"
    )
    return root


@pytest.fixture(scope="session")
def bento_home(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BentoML home holding the tiny models, filled by the `package` stage itself."""
    home = tmp_path_factory.mktemp("bentoml")
    env = service_env(home)
    command = [sys.executable, "-m", "serving.package", *(str(tiny_models / f) for f in FAMILIES),
               "--compressed", str(tiny_models / "compressed")]  # fmt: skip
    run = subprocess.run([*command, "--out", str(home / "receipt.json")], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    promote(home)
    return home


def promote(home: Path) -> None:
    """Make the store's packaged receipt the served champion (home/promoted.json, the services' AIGC_PROMOTED)."""
    command = [sys.executable, "-m", "monitoring.promote", "--receipt", str(home / "receipt.json"), "--why", "tests",
               "--record", str(home / "promoted.json")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(home), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


def service_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "AIGC_API_KEY"}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.update(AIGC_PROMOTED=str(home / "promoted.json"))  # what the service serves: the record, never :latest
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def start_server(
    home: Path,
    log_dir: Path,
    output: Path | None = None,
    target: str = "serving.service:Gateway",
    cwd: Path = REPO_ROOT,
    **extra: str,
) -> Server:
    """`bentoml serve <target>` (the repo's service, or a Bento tag in home's store) run in `cwd`, on a free port,
    ready; its stdout and stderr (the server log) go to `output` if given."""
    port = free_port()
    env = service_env(home, AIGC_REQUEST_LOG=str(log_dir), AIGC_REQUEST_LOG_FLUSH_SECONDS="0.2", **extra)
    sink = open(output, "wb") if output is not None else subprocess.DEVNULL  # the server's to keep open
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "bentoml"), "serve", target, "--port", str(port)],
        cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT if output is not None else subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(process, f"{url}/readyz", 120, "bentoml serve")
    return Server(url, log_dir, process)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(bento_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(bento_home, tmp_path_factory.mktemp("request-log"))
    yield running
    stop_server(running)


def receipt(home: Path) -> dict[str, Any]:
    return json.loads((home / "receipt.json").read_text())
