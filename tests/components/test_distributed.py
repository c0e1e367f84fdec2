"""A training stage launches its own DDP workers, nodes meet at a c10d rendezvous, and checkpoints live on
shared storage: real torch.distributed launches (gloo on CPU) of the real stage command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from components import train_text
from components.common import EX_CONFIG, ConfigError
from components.launch import Launch, check_devices
from tests.conftest import REPO_ROOT, free_port, section, write_params


def stage_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIGC_CHECKPOINT_ROOT", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def train_command(features: Path, node: Path, params: Path) -> list[str]:
    return [
        sys.executable, "-m", "components.train_text", str(features / "text"), str(node / "model"),
        "--checkpoints", str(node / "ckpt"), "--metrics-dir", str(node / "curves"), "--params", str(params),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("distributed", "message"),
    [
        ({"nproc_per_node": 0}, "nproc_per_node' must be a positive integer"),
        ({"nproc_per_node": True}, "nproc_per_node' must be a positive integer"),
        ({"nnodes": 2}, "nnodes' is 2: set $AIGC_RDZV_ENDPOINT"),
        ({"rdzv_endpoint": "node-a"}, "must be 'host:port'"),
        ({"rdzv_endpoint": "node-a:99999"}, "must be 'host:port'"),
        ({"gpus": 2}, "unknown keys ['gpus']"),
        ("2", "must be a mapping"),
    ],
)
def test_bad_distributed_params_are_one_clear_error(distributed: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Launch.from_params({"distributed": distributed}, "train_text")


def test_the_endpoint_comes_from_the_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine's address is not the model's: from the environment it stays out of params and dvc.lock.
    monkeypatch.setenv("AIGC_RDZV_ENDPOINT", "node-0:29400")
    launch = Launch.from_params({"distributed": {"nnodes": 2, "rdzv_endpoint": "elsewhere:1"}}, "train_text")
    assert launch.rdzv_endpoint == "node-0:29400" and launch.world_size == 2
    monkeypatch.setenv("AIGC_RDZV_ENDPOINT", "node-0")
    with pytest.raises(ConfigError, match=r"\$AIGC_RDZV_ENDPOINT must be 'host:port'"):
        Launch.from_params({"distributed": {"nnodes": 2}}, "train_text")


def test_more_workers_than_gpus_is_refused_before_any_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="nproc_per_node' is 2 but this node has 1 GPUs"):
        check_devices(Launch(nproc_per_node=2), "auto", "train_text")
    check_devices(Launch(nproc_per_node=2), "cpu", "train_text")  # gloo on the CPU: any number


def test_a_checkpoint_url_nobody_can_open_is_a_params_error(monkeypatch: pytest.MonkeyPatch, tiny_params: dict[str, Any]) -> None:
    monkeypatch.setenv("AIGC_CHECKPOINT_ROOT", "nosuchscheme://bucket/ckpt")
    with pytest.raises(ConfigError, match=r"\$AIGC_CHECKPOINT_ROOT is 'nosuchscheme://bucket/ckpt', which fsspec cannot open"):
        train_text.TrainTextConfig.from_params(section(tiny_params, "train_text"))


def test_distributed_params_default_to_one_process() -> None:
    assert Launch.from_params({}, "train_text").world_size == 1
    nodes = Launch.from_params({"distributed": {"nproc_per_node": 4, "nnodes": 2, "rdzv_endpoint": "10.0.0.1:29400"}}, "t")
    assert (nodes.world_size, nodes.standalone) == (8, False)


@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_rendezvous_and_end_with_the_same_model(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    # Two "machines" (folders), each running the stage's own command: whichever node gets rank 0, both write
    # the model, training.json and curves, byte for byte the same, as `dvc repro` on each node needs.
    params = dict(tiny_params)
    params["train_text"] = {
        **tiny_params["train_text"],
        "max_steps": 6, "validate_every": 3, "checkpoint_every": 3, "log_every": 2,
        "distributed": {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{free_port()}"},
    }  # fmt: skip
    nodes = [tmp_path / "node-a", tmp_path / "node-b"]
    runs = []
    for node in nodes:
        node.mkdir()
        command = train_command(tiny_features, node, write_params(params, node / "params.yaml"))
        runs.append(subprocess.Popen(command, cwd=node, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [run.communicate(timeout=300)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for name in ("model/model.safetensors", "model/training.json", "curves/metrics.json"):
        assert (nodes[0] / name).read_bytes() == (nodes[1] / name).read_bytes(), name
    record = json.loads((nodes[0] / "model" / "training.json").read_text())
    assert record["world_size"] == 2 and record["steps"] == 6 and "rdzv_endpoint" not in json.dumps(record)
    # Rank 0 alone writes checkpoints: exactly one node has them.
    assert sorted(bool(list(node.glob("ckpt/*/step-*.ckpt"))) for node in nodes) == [False, True]


@pytest.mark.slow
def test_a_worker_that_fails_fails_the_stage_with_its_own_status(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    # Features that do not exist: every worker says so in one line, the stage exits with its status, no traceback.
    params = dict(tiny_params)
    params["train_text"] = {**tiny_params["train_text"], "distributed": {"nproc_per_node": 2, "nnodes": 1, "rdzv_endpoint": None}}
    command = train_command(tmp_path / "missing", tmp_path, write_params(params, tmp_path / "params.yaml"))
    run = subprocess.run(command, cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == EX_CONFIG, run.stderr[-3000:]  # the workers' own status, not the launcher's 1
    assert "starting 2 workers" in run.stderr and "worker rank" in run.stderr
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("scheme", ["file", "memory"])  # memory: an object store's semantics (mv = copy + delete)
def test_checkpoints_on_a_url_resume_on_another_machine(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path, scheme: str
) -> None:
    # Machine A stops after 4 steps; machine B (its own, empty local folders) resumes from the shared URL and
    # ends with the weights of a run that never stopped.
    import fsspec

    shared = f"file://{tmp_path / 'shared'}" if scheme == "file" else f"memory://{tmp_path.name}/shared"
    text = {**section(tiny_params, "train_text"), "validate_every": 0}
    text["base"] = {**text["base"], "checkpoint_root": shared}
    cfg = train_text.TrainTextConfig.from_params(text)
    features = tiny_features / "text"
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    train_text.train_text(cfg, features, machine_a / "model", machine_a / "ckpt" / "text", stop_after=4)
    fs, root = fsspec.core.url_to_fs(f"{shared}/text")
    assert sorted(Path(p).name for p in fs.glob(f"{root}/*/step-*.ckpt")) == ["step-00000004.ckpt"]
    resumed = train_text.train_text(cfg, features, machine_b / "model", machine_b / "ckpt" / "text")
    assert resumed.resumed_from == 4
    plain = train_text.TrainTextConfig.from_params({**section(tiny_params, "train_text"), "validate_every": 0})
    train_text.train_text(plain, features, tmp_path / "plain" / "model", tmp_path / "plain" / "ckpt")
    for name in ("model.safetensors", "training.json"):
        assert (machine_b / "model" / name).read_bytes() == (tmp_path / "plain" / "model" / name).read_bytes(), name


def test_a_mounted_checkpoint_root_replaces_the_stage_folder(tiny_params: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                             tiny_features: Path, tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setenv("AIGC_CHECKPOINT_ROOT", str(tmp_path / "mounted"))
    cfg = train_text.TrainTextConfig.from_params({**section(tiny_params, "train_text"), "max_steps": 4, "validate_every": 0})
    train_text.train_text(cfg, tiny_features / "text", tmp_path / "model", tmp_path / "ckpt" / "text")
    assert list((tmp_path / "mounted" / "text").glob("*/step-00000004.ckpt")) and not (tmp_path / "ckpt").exists()
    assert "checkpoint_root" not in yaml.safe_dump(json.loads((tmp_path / "model" / "training.json").read_text()))
