"""Prefect tasks that run DVC stages. DVC owns the graph, the lock file and the cache; this only drives it."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

from components.common import EX_CONFIG, EX_DATAERR
from flows.remote import dvc_env, dvc_executable

DATA_METRICS_STAGE = "clean"  # its metrics file counts the rows of every dataset


class PermanentStageError(RuntimeError):
    """A stage failed on bad data or bad params: retrying cannot help, so the flow does not retry it."""


@dataclass(frozen=True)
class StageResult:
    name: str
    status: str  # "ran" or "up to date" (outputs already there, restored from the run cache or pulled from the remote)
    seconds: float
    pushed: int | None = None  # files sent to the DVC remote; None: pushing is off

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dvc_stage_order(repo_root: Path, stages: list[str] | None = None) -> list[str]:
    """Stage names of dvc.yaml in dependency order (optionally only `stages`, still in that order)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with Repo(str(repo_root)) as repo:
        # `dvc repro`'s own plan, not just any dependency order: DVC writes dvc.lock's entries in the order the
        # stages ran, so a flow run and a `dvc repro` then write the same file, byte for byte.
        graph = get_active_graph(repo.index.graph)
        order = [stage.name for stage in plan_repro(graph, list(graph.nodes))]
    if stages is None:
        return order
    unknown = sorted(set(stages) - set(order))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
    return [name for name in order if name in stages]


def dvc_upstream(repo_root: Path, target: str) -> list[str]:
    """`target` and every stage it depends on, directly or not, per DVC's graph."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph
        stages = {stage.name: stage for stage in graph.nodes if getattr(stage, "name", None)}
        if target not in stages:
            raise ValueError(f"unknown stage {target!r}; dvc.yaml has {sorted(stages)}")
        return sorted({target, *(stage.name for stage in nx.descendants(graph, stages[target]))})


def _exit_code(exc: BaseException) -> int | None:
    """The stage command's exit status, from DVC's 'failed to run: …, exited with N' in the cause chain."""
    seen: BaseException | None = exc
    while seen is not None:
        match = re.search(r"exited with (-?\d+)", str(seen))
        if match:
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    return not isinstance(state.result(raise_on_failure=False), PermanentStageError)


def pushed_count(output: str) -> int:
    """Files `dvc push` sent, from its last line: '3 files pushed', '1 file pushed' or 'Everything is up to date.'"""
    match = re.search(r"(\d+) files? pushed", output)
    return int(match.group(1)) if match else 0


@task(retries=2, retry_delay_seconds=[5, 30], task_run_name="dvc-push-{name}")
def push_stage(name: str, repo_root: str = ".") -> int:
    """`dvc push <name>`: the stage's cached outputs to the default remote (the flow configured it); returns the
    number of files sent. Metrics and plots with `cache: false` travel with git, not here. Its own task, so
    a failed push is retried without running the stage again."""
    logger = get_run_logger()
    done = subprocess.run([dvc_executable(), "push", name], cwd=repo_root, env=dvc_env(), capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines()[-20:]:
        logger.info(line)
    if done.returncode != 0:
        raise RuntimeError(f"stage '{name}' ran but its outputs were not pushed: `dvc push {name}` exited with {done.returncode}")
    pushed = pushed_count(done.stdout)
    logger.info("%s: %s", name, f"{pushed} file(s) pushed to the DVC remote" if pushed else "the DVC remote had its outputs")
    return pushed


@task(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retry_transient, task_run_name="dvc-{name}")
def run_stage(name: str, repo_root: str = ".", force: bool = False, pull: bool = False) -> StageResult:
    """`dvc repro --single-item <name>` in repo_root: runs the stage if its deps, params or outs changed.

    DVC runs as the CLI a user would type (its own process, cwd at the repo root), streamed into the log.
    With `pull`, `--pull`: a stage whose dvc.lock entry matches but whose outputs are missing from the
    workspace and cache gets them from the remote instead of running (it runs when the remote lacks them).
    """
    logger = get_run_logger()
    command = [dvc_executable(), "repro", "--single-item", name]
    command += (["--force"] if force else []) + (["--pull"] if pull else [])
    start = time.monotonic()
    ran = False
    lines: list[str] = []
    with subprocess.Popen(
        command, cwd=repo_root, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            lines.append(line)
            logger.info(line)
            ran = ran or line.startswith(f"Running stage '{name}'")
    if process.returncode != 0:
        code = _exit_code(RuntimeError("\n".join(lines[-50:])))
        if code in (EX_DATAERR, EX_CONFIG):
            kind = "bad data" if code == EX_DATAERR else "bad params"
            raise PermanentStageError(f"stage '{name}' failed on {kind} (exit {code}); see its log above")
        raise RuntimeError(f"stage '{name}' failed: `{' '.join(command)}` exited with {process.returncode}")
    return StageResult(name, "ran" if ran else "up to date", round(time.monotonic() - start, 2))


def params_problems(stages: list[str], repo_root: str = ".", params_path: Path | None = None) -> list[str]:
    """What each stage's config refuses in params.yaml (or in `params_path`, e.g. a sweep's trial values)."""
    from components.common import ConfigError, load_params
    from components.pipeline import load_stages

    declared = load_stages(repo_root)
    problems = []
    for name in stages:
        config = declared[name].config()
        if config is None:  # a stage that reads no params section
            continue
        try:
            section = declared[name].params_section
            config.from_params(load_params(section, params_path or Path(repo_root) / "params.yaml"))
        except ConfigError as err:
            problems.append(f"{name}: {err}")
    return problems


@task(task_run_name="check-params")
def check_params(stages: list[str], repo_root: str = ".") -> None:
    """Build every stage's config from params.yaml before any stage runs.

    `dvc repro` removes a stage's outputs before running its command, so a bad value found by the stage
    itself would already have cleared the previous outputs from the workspace (DVC's cache still has them);
    checked here first, nothing is touched.
    """
    problems = params_problems(stages, repo_root)
    if problems:
        raise PermanentStageError("invalid params, no stage was run:\n  " + "\n  ".join(problems))


def summary_markdown(results: list[StageResult], repo_root: Path) -> str:
    """A markdown table of what ran and what was up to date, then the data metrics and, where the
    evaluation stages have written them, each model family's headline figures."""
    from components.metrics import HEADLINE, evaluation_stage
    from components.pipeline import load_stages

    stages = load_stages(repo_root)
    metrics_path = repo_root / stages[DATA_METRICS_STAGE].only_metrics()
    lines = ["## Pipeline run", "", "| stage | status | seconds | files pushed |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.status} | {r.seconds} | {'-' if r.pushed is None else r.pushed} |" for r in results]
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        lines += [
            "",
            "## Data",
            "",
            "| dataset | rows in | valid | quarantined | duplicates removed | train | val | test |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in metrics.items():
            splits = m.get("splits", {})
            lines.append(
                f"| {name} | {m.get('rows_in')} | {m.get('rows_valid')} | {m.get('rows_quarantined')} | "
                f"{m.get('duplicates_removed')} | {splits.get('train')} | {splits.get('val')} | {splits.get('test')} |"
            )
    models = [(family, repo_root / stages[evaluation_stage(family)].only_metrics(), keys) for family, keys in HEADLINE.items()]
    models = [(family, path, keys) for family, path, keys in models if path.is_file()]
    if models:
        lines += ["", "## Models", "", "| model | metrics |", "|---|---|"]
        for family, path, keys in models:
            values = json.loads(path.read_text(encoding="utf-8"))
            lines.append(f"| {family} | " + ", ".join(f"{k} {values[k]}" for k in keys if k in values) + " |")
    return "\n".join(lines) + "\n"
