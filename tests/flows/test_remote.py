"""The DVC remote: $AIGC_DVC_REMOTE beats params `remote.url`, which beats DVC's configured default; only the
gitignored .dvc/config.local is written; the training flow pushes each stage, and a fresh clone's flow run
pulls those outputs instead of rerunning the stages."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.common import EX_CONFIG, ConfigError
from flows.remote import ENV_VAR, Remote, RemoteConfig, configure, main, resolve_remote
from flows.training import training
from tests.conftest import copy_repo, venv_env, write_params

GIT = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]


@pytest.fixture(autouse=True)
def venv_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", venv_env()["PATH"])


def git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True).stdout


def locked_outputs(repo: Path, stages: list[str]) -> dict[str, bytes]:
    """Every file of the stages' outputs as dvc.lock lists them (folders walked), by path."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    found = {}
    for stage in stages:
        for out in lock["stages"][stage]["outs"]:
            path = repo / out["path"]
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                found[file.relative_to(repo).as_posix()] = file.read_bytes()
    return found


def test_the_environment_beats_params_which_beat_dvcs_default(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the committed default lives under ~; no user config either
    from_env = {ENV_VAR: "/srv/dvc-remote"}
    assert resolve_remote(tiny_repo, RemoteConfig(url="s3://bucket/aigc"), from_env) == Remote(
        "aigc", "/srv/dvc-remote", f"${ENV_VAR}"
    )
    assert resolve_remote(tiny_repo, RemoteConfig(url="s3://bucket/aigc"), {}) == Remote(
        "aigc", "s3://bucket/aigc", "params.yaml remote.url"
    )
    # A relative path in params means the repository root's, not .dvc/'s (where DVC would read it from).
    assert resolve_remote(tiny_repo, RemoteConfig(url="shared/remote"), {}).url == str(tiny_repo / "shared" / "remote")
    default = resolve_remote(tiny_repo, RemoteConfig(url=None), {ENV_VAR: ""})  # set but empty counts as unset
    assert default == Remote("local", str(tmp_path / "home" / ".cache" / "aigc-pipeline" / "dvc-remote"), ".dvc/config")


def test_configure_writes_only_the_gitignored_local_config(tiny_repo: Path, tmp_path: Path) -> None:
    committed = (tiny_repo / ".dvc" / "config").read_bytes()
    local = tiny_repo / ".dvc" / "config.local"

    from_params = configure(tiny_repo, RemoteConfig(url="shared/remote"), {})
    assert from_params.url == str(tiny_repo / "shared" / "remote")
    url = subprocess.run(["dvc", "config", "remote.aigc.url"], cwd=tiny_repo, env=venv_env(), capture_output=True, text=True)
    default = subprocess.run(["dvc", "remote", "default"], cwd=tiny_repo, env=venv_env(), capture_output=True, text=True)
    assert (url.stdout.strip(), default.stdout.strip()) == (from_params.url, "aigc")  # DVC reads it as written
    written = local.read_bytes(), local.stat().st_mtime_ns
    assert configure(tiny_repo, RemoteConfig(url="shared/remote"), {}) == from_params
    assert (local.read_bytes(), local.stat().st_mtime_ns) == written  # idempotent: not even rewritten

    assert configure(tiny_repo, RemoteConfig(url="shared/remote"), {ENV_VAR: str(tmp_path / "env")}).url == str(tmp_path / "env")
    assert str(tmp_path / "env") in local.read_text() and "shared/remote" not in local.read_text()

    # Neither asks any more: the committed default applies again, no stale `aigc` default is left behind.
    assert configure(tiny_repo, RemoteConfig(url=None), {}).name == "local"
    default = subprocess.run(["dvc", "remote", "default"], cwd=tiny_repo, env=venv_env(), capture_output=True, text=True)
    assert default.stdout.strip() == "local"
    assert (tiny_repo / ".dvc" / "config").read_bytes() == committed and git_status(tiny_repo) == ""


def test_bad_remote_settings_stop_with_one_line(tiny_repo: Path, tiny_params: dict[str, Any], capsys: Any) -> None:
    with pytest.raises(ConfigError, match="remote.url"):
        RemoteConfig.from_params({"url": "", "pull": True, "push": True, "git_remote": "origin"})
    with pytest.raises(ConfigError, match="remote.push"):
        RemoteConfig.from_params({"url": None, "pull": True, "push": "yes", "git_remote": "origin"})
    with pytest.raises(ConfigError, match="DVC refuses remote 'nosuch://host/x'"):
        configure(tiny_repo, RemoteConfig(url="nosuch://host/x"), {})
    write_params({**tiny_params, "remote": {**tiny_params["remote"], "url": 5}}, tiny_repo / "params.yaml")
    with pytest.raises(SystemExit) as stopped:
        main(["configure", "--repo", str(tiny_repo)])
    assert stopped.value.code == EX_CONFIG
    assert capsys.readouterr().err == "flows.remote: params key 'remote.url' must be a non-empty string or null, got 5\n"


def test_show_reads_only_and_configure_writes(
    tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "team-remote"))
    main(["show", "--repo", str(tiny_repo)])
    assert capsys.readouterr().out == f"DVC remote 'aigc': {tmp_path / 'team-remote'} (from ${ENV_VAR})\n"
    assert not (tiny_repo / ".dvc" / "config.local").exists()
    main(["configure", "--repo", str(tiny_repo)])
    assert str(tmp_path / "team-remote") in (tiny_repo / ".dvc" / "config.local").read_text()


@pytest.mark.slow
def test_the_flow_pushes_each_stage_and_a_fresh_clone_pulls_instead_of_rerunning(
    tmp_path: Path, tiny_params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = ["ingest", "validate"]
    remote = tmp_path / "remote"
    monkeypatch.setenv(ENV_VAR, str(remote))
    repo = copy_repo(tmp_path / "repo", tiny_params)
    first = training(stages=stages, repo_root=str(repo))
    assert [(r.name, r.status) for r in first] == [(name, "ran") for name in stages]
    assert all(r.pushed for r in first)
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= sum(r.pushed or 0 for r in first)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", "ingest and validate"], cwd=repo, check=True)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "data" / "raw").exists()
    second = training(stages=stages, repo_root=str(clone))
    assert [(r.name, r.status, r.pushed) for r in second] == [(name, "up to date", 0) for name in stages]
    original = locked_outputs(repo, stages)
    assert "data/raw/text.parquet" in original and locked_outputs(clone, stages) == original
    assert git_status(clone) == "" and git_status(repo) == ""  # .dvc/config untouched on both machines
