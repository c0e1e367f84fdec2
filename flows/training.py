"""The training flow: every dvc.yaml stage as a Prefect task, in DVC's order, skipping what is up to date.

    python -m flows.training                      # all stages
    python -m flows.training --stages ingest validate
    python -m flows.training --force              # rerun even when up to date

Runs on Prefect's embedded default (a temporary local API, nothing to start) or against a server when
PREFECT_API_URL is set. With params `remote.pull` / `remote.push` (the default) it first makes the DVC remote
DVC's default (flows/remote.py), restores a stage's missing outputs from it instead of rerunning the stage,
and pushes each stage's outputs once it succeeded, so another machine's `dvc pull` or flow run picks up here.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.remote import RemoteConfig, configure
from flows.stages import StageResult, check_params, dvc_stage_order, push_stage, run_stage, summary_markdown


@flow(name="training", log_prints=True)
def training(stages: list[str] | None = None, repo_root: str = ".", force: bool = False) -> list[StageResult]:
    """Reproduce the DVC pipeline stage by stage, through the DVC remote; publish a markdown summary artifact."""
    logger = get_run_logger()
    order = dvc_stage_order(Path(repo_root), stages)
    logger.info("stages in DVC order: %s", ", ".join(order))
    check_params(order, repo_root=repo_root)
    remote = RemoteConfig.load(Path(repo_root))
    if remote.pull or remote.push:
        logger.info(configure(Path(repo_root), remote).describe())
    results = []
    for name in order:
        result = run_stage(name, repo_root=repo_root, force=force, pull=remote.pull)
        if remote.push:
            result = replace(result, pushed=push_stage(name, repo_root=repo_root))
        logger.info("%s: %s in %.1f s", result.name, result.status, result.seconds)
        results.append(result)
    create_markdown_artifact(
        summary_markdown(results, Path(repo_root)),
        key="pipeline-run",
        description="Stages run or skipped, and the data metrics",
    )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stages", nargs="+", help="only these stages (default: all of dvc.yaml)")
    parser.add_argument("--repo", default=".", help="repository root holding dvc.yaml")
    parser.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    args = parser.parse_args(argv)
    training(stages=args.stages, repo_root=args.repo, force=args.force)


if __name__ == "__main__":
    main()
