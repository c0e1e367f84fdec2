"""The DVC remote every machine pulls from and pushes to: which one, and making it DVC's default.

    python -m flows.remote show                   # the remote the flows would use, and where that choice came from
    python -m flows.remote configure              # make it DVC's default in .dvc/config.local
    python -m flows.remote pull [targets ...]     # configure, then `dvc pull` (same exit code)
    python -m flows.remote push [targets ...]     # configure, then `dvc push`

The first that is set wins: $AIGC_DVC_REMOTE, params.yaml's `remote.url`, the default remote in DVC's own
config (the committed .dvc/config says `local`: ~/.cache/aigc-pipeline/dvc-remote). A URL or path from the
environment or params becomes the remote `aigc` in .dvc/config.local, which git ignores, so the committed
.dvc/config never changes and each machine may point elsewhere. The training flow configures it once at its
start and pushes each stage's outputs; the retrain flow pushes its experiments (`dvc exp push`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import EX_CONFIG, ConfigError, is_url, load_params

ENV_VAR = "AIGC_DVC_REMOTE"
REMOTE_NAME = "aigc"
"""The remote written to .dvc/config.local when the environment or params name one."""
CONFIG_FILES = {"repo": ".dvc/config", "local": ".dvc/config.local", "global": "DVC's global config",
                "system": "DVC's system config"}  # fmt: skip


@dataclass(frozen=True)
class RemoteConfig:
    """params.yaml's `remote` section."""

    url: str | None = None
    pull: bool = True
    push: bool = True
    git_remote: str | None = "origin"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> RemoteConfig:
        for key in ("url", "git_remote"):
            value = params.get(key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"params key 'remote.{key}' must be a non-empty string or null, got {value!r}")
        for key in ("pull", "push"):
            if not isinstance(params.get(key, True), bool):
                raise ConfigError(f"params key 'remote.{key}' must be true or false, got {params[key]!r}")
        return cls(params.get("url"), params.get("pull", True), params.get("push", True), params.get("git_remote", "origin"))

    @classmethod
    def load(cls, repo_root: Path) -> RemoteConfig:
        return cls.from_params(load_params("remote", repo_root / "params.yaml"))


@dataclass(frozen=True)
class Remote:
    """The resolved remote: DVC's name for it, its URL (a local path is absolute), and who chose it."""

    name: str
    url: str
    source: str

    def describe(self) -> str:
        return f"DVC remote '{self.name}': {self.url} (from {self.source})"


def absolute(location: str, base: Path) -> str:
    """A URL as it is; a local path made absolute against `base`. DVC would read a relative path in
    .dvc/config.local against .dvc/, not against where the user meant it."""
    if is_url(location):
        return location
    return os.path.abspath(base / Path(location).expanduser())


def requested(cfg: RemoteConfig, repo_root: Path, environ: Mapping[str, str]) -> Remote | None:
    """The remote the environment or params ask for, or None: DVC's configured default then applies.

    A relative path in $AIGC_DVC_REMOTE is relative to the working directory (where the user typed it); in
    params.yaml, to the repository root (where the file lives).
    """
    if environ.get(ENV_VAR, "").strip():
        return Remote(REMOTE_NAME, absolute(environ[ENV_VAR].strip(), Path.cwd()), f"${ENV_VAR}")
    if cfg.url is not None:
        return Remote(REMOTE_NAME, absolute(cfg.url, repo_root), "params.yaml remote.url")
    return None


def _dvc_config(repo_root: Path) -> Any:
    from dvc.config import Config
    from dvc.config import ConfigError as DvcConfigError

    dvc_dir = repo_root / ".dvc"
    if not dvc_dir.is_dir():
        raise ConfigError(f"{repo_root.resolve()} is not a DVC repository (no .dvc/): run from the repository root")
    try:
        return Config(str(dvc_dir), validate=False)
    except DvcConfigError as err:
        raise ConfigError(f"DVC's config cannot be read: {err}") from None


def configured_default(repo_root: Path) -> Remote:
    """The default remote DVC's config files name (system, global, .dvc/config, .dvc/config.local; the last
    wins), leaving out this module's own `aigc` entry in .dvc/config.local: that only ever mirrors the
    environment or params, and must not outlive them."""
    config = _dvc_config(repo_root)
    defaults = [(level, config.load_one(level)["core"].get("remote")) for level in config.LEVELS if level in config.files]
    named = [(level, name) for level, name in defaults if name and not (level == "local" and name == REMOTE_NAME)]
    if not named:
        raise ConfigError(f"no DVC remote: set params.yaml remote.url or ${ENV_VAR}, or name a default with `dvc remote default`")
    level, name = named[-1]
    section = config.load_config_to_level()["remote"].get(name)
    if not section or "url" not in section:
        raise ConfigError(f"DVC's default remote '{name}' ({CONFIG_FILES[level]}) has no url: `dvc remote add {name} <url>`")
    url = section["url"]
    return Remote(name, url if is_url(url) else os.path.expanduser(url), CONFIG_FILES[level])


def resolve_remote(repo_root: Path, cfg: RemoteConfig, environ: Mapping[str, str] | None = None) -> Remote:
    """$AIGC_DVC_REMOTE, else params `remote.url`, else DVC's configured default. Reads only."""
    return requested(cfg, repo_root, os.environ if environ is None else environ) or configured_default(repo_root)


def configure(repo_root: Path, cfg: RemoteConfig, environ: Mapping[str, str] | None = None) -> Remote:
    """Make the resolved remote DVC's default for this checkout, in .dvc/config.local only; idempotent.

    A remote from the environment or params becomes `aigc` (its other options, credentials say, stay while
    its URL scheme does); otherwise `aigc` stops being the default, so DVC's configured default applies (its
    section stays, credentials and all, for when the environment names it again).
    """
    from dvc.config import ConfigError as DvcConfigError

    remote = requested(cfg, repo_root, os.environ if environ is None else environ)
    config = _dvc_config(repo_root)
    local = config.load_one("local")
    current = local["remote"].get(REMOTE_NAME, {})
    if remote is not None:
        unchanged = local["core"].get("remote") == REMOTE_NAME and current.get("url") == remote.url
        if not unchanged:
            old_scheme, new_scheme = (u.split("://")[0] if is_url(u) else "" for u in (current.get("url", ""), remote.url))
            try:
                with config.edit("local") as conf:
                    kept = conf["remote"].get(REMOTE_NAME, {}) if old_scheme == new_scheme else {}
                    conf["remote"][REMOTE_NAME] = {**kept, "url": remote.url}
                    conf["core"]["remote"] = REMOTE_NAME
            except DvcConfigError as err:
                raise ConfigError(f"DVC refuses remote {remote.url!r} ({remote.source}): {err}") from None
        return remote
    if local["core"].get("remote") == REMOTE_NAME:
        with config.edit("local", validate=False) as conf:
            del conf["core"]["remote"]
    return configured_default(repo_root)


def dvc_executable() -> str:
    """This interpreter's `dvc` (the project's venv), whatever PATH says."""
    return str(Path(sys.executable).parent / "dvc")


def dvc_env() -> dict[str, str]:
    """The environment to run `dvc` in: stage commands say `python -m ...`, so this interpreter (the project's
    venv) comes first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.remote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["show", "configure", "pull", "push"])
    parser.add_argument("targets", nargs="*", help="pull / push: stages or outputs (default: everything in dvc.lock)")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (params.yaml, .dvc/)")
    args = parser.parse_args(argv)
    if args.targets and args.command in ("show", "configure"):
        parser.error(f"{args.command} takes no targets")
    try:
        cfg = RemoteConfig.load(args.repo)
        remote = resolve_remote(args.repo, cfg) if args.command == "show" else configure(args.repo, cfg)
    except ConfigError as err:
        print(f"flows.remote: {err}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    print(remote.describe(), file=sys.stderr if args.command in ("pull", "push") else sys.stdout)
    if args.command in ("pull", "push"):
        raise SystemExit(subprocess.run([dvc_executable(), args.command, *args.targets], cwd=args.repo, env=dvc_env()).returncode)


if __name__ == "__main__":
    main()
