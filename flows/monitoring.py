"""Drift check and drift-triggered retraining.

    python -m flows.monitoring                         # check the last window; retrain on drift
    python -m flows.monitoring --no-retrain            # only the check and its report

`drift_check` runs `monitoring.drift` over the request log and publishes the decision as a markdown
artifact. On drift it asks the retrain gate (`monitoring/retrain_gate.py`: cooldown + lock) and, when
allowed, starts `retrain`: through `run_deployment("retrain/retrain")` when deployments are being served
(`--via-deployment`), as a direct subflow otherwise. `retrain` is a DVC experiment (`dvc exp run --temp -n
<name>`) of the whole pipeline on the current data, named after the drift report that triggered it; the
gate's `state.json` maps each experiment to its report, so any retrain can be reproduced with
`dvc exp apply <name>`. The challenger is then compared with the champion (the workspace's models) on the
same test data (`monitoring/promotion.py`: BLEU, FID, PSNR with paired-bootstrap intervals) and promoted
(`dvc exp apply`, then the `package` stage rebuilds the model store entries and the Bento) only when no
family is worse beyond its tolerance; `monitoring/promotion/history.json` lists every decision.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


def monitoring_path(repo_root: str, key: str) -> Path:
    """A folder of the loop under the repo: `monitor.log_dir` / `reports_dir` / `retrain_dir` from params.yaml,
    or `reference`, the drift reference inside the features stage's output (dvc.yaml)."""
    from components.common import load_params, require
    from components.feature_defs import REFERENCE_DIR
    from components.pipeline import stage

    root = Path(repo_root)
    if key == "reference":
        return root / stage("features", root).only_out() / REFERENCE_DIR
    return root / require(load_params("monitor", root / "params.yaml"), key, str, "monitor")


@task(retries=1, retry_delay_seconds=5, task_run_name="check-drift")
def run_drift_check(repo_root: str, log_dir: str | None = None, reports_dir: str | None = None) -> dict[str, Any]:
    from components.common import load_params
    from monitoring.drift import DriftConfig, check_drift

    root = Path(repo_root)
    cfg = DriftConfig.from_params(load_params("monitor", root / "params.yaml"))
    logs = root / log_dir if log_dir else monitoring_path(repo_root, "log_dir")
    reports = root / reports_dir if reports_dir else monitoring_path(repo_root, "reports_dir")
    report_dir, results = check_drift(cfg, logs, monitoring_path(repo_root, "reference"), reports)
    return {"report": str(report_dir), "results": {name: r.as_dict() for name, r in results.items()}}


def dvc(repo_root: str, *args: str) -> None:
    """Run a DVC command in the repo (this interpreter's venv), its output into the task log."""
    logger = get_run_logger()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args], cwd=repo_root, env=env, capture_output=True, text=True
    )
    for line in (run.stdout + run.stderr).splitlines()[-40:]:
        logger.info(line)
    if run.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed with exit {run.returncode}")


@task(task_run_name="dvc-exp-run-{experiment}")
def dvc_experiment(repo_root: str, experiment: str) -> str:
    """`dvc exp run --temp -n <experiment>`: the whole pipeline as a named experiment, run aside so the
    workspace keeps the champion until the gate decides."""
    dvc(repo_root, "exp", "run", "--temp", "-n", experiment)
    return experiment


@task(task_run_name="champion-challenger-{experiment}")
def champion_challenger(repo_root: str, experiment: str) -> dict[str, Any]:
    """Compare the experiment (challenger) with the workspace (champion); record the decision."""
    from components.common import load_params
    from monitoring.promotion import PromotionConfig, compare_revisions, record

    root = Path(repo_root)
    cfg = PromotionConfig.from_params(load_params("promotion", root / "params.yaml"))
    comparisons = compare_revisions(root, experiment, cfg)
    promoted = all(c.promote for c in comparisons)
    for comparison in comparisons:
        get_run_logger().info("%s: %s", comparison.family, comparison.reason)
    return record(root / cfg.history, comparisons, experiment, promoted)


@task(task_run_name="promote-{experiment}")
def promote(repo_root: str, experiment: str) -> None:
    """The challenger becomes the workspace's models, and `package` puts them in the model store and Bento."""
    dvc(repo_root, "exp", "apply", experiment)
    dvc(repo_root, "repro", "package")


@flow(name="retrain", log_prints=True)
def retrain(repo_root: str = ".", experiment: str | None = None, report: str | None = None) -> dict[str, Any]:
    """Reproduce the pipeline as a DVC experiment (named after its trigger when there is one), then
    promote it only if the champion / challenger gate says it is not worse beyond the tolerances."""
    name = experiment or f"retrain-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    get_run_logger().info("retraining as experiment %s%s", name, f" (drift report {report})" if report else "")
    dvc_experiment(repo_root, name)
    decision = champion_challenger(repo_root, name)
    if decision["promoted"]:
        promote(repo_root, name)
    reasons = "\n".join(f"- {c['reason']}" for c in decision["comparisons"])
    verdict = "promoted" if decision["promoted"] else "not promoted: the champion stays"
    create_markdown_artifact(f"## Retrain {name}: {verdict}\n\n{reasons}\n", key="promotion", description="Champion / challenger")
    return decision


def summary_markdown(check: dict[str, Any], action: str) -> str:
    lines = ["## Drift check", "", f"Report: `{check['report']}`", "", "| family | decision | why |", "|---|---|---|"]
    lines += [f"| {name} | {r['decision']} | {r['reason']} |" for name, r in check["results"].items()]
    return "\n".join([*lines, "", f"**Action:** {action}", ""])


@flow(name="drift-check", log_prints=True)
def drift_check(
    repo_root: str = ".",
    log_dir: str | None = None,
    reports_dir: str | None = None,
    retrain_on_drift: bool = True,
    via_deployment: bool = False,
) -> dict[str, Any]:
    """Check the last window for drift; on drift, start one retrain unless the gate refuses. The request log
    and reports folders default to params.yaml's `monitor.log_dir` / `monitor.reports_dir`."""
    from components.common import load_params
    from monitoring.retrain_gate import RetrainGate

    logger = get_run_logger()
    root = Path(repo_root)
    check = run_drift_check(repo_root, log_dir, reports_dir)
    drifted = [name for name, r in check["results"].items() if r["decision"] == "drift"]
    action = "none: no drift" if not drifted else "none: retraining disabled"
    outcome: dict[str, Any] = {**check, "drifted": drifted, "retrain": None}
    if drifted and retrain_on_drift:
        cooldown = float(load_params("monitor", root / "params.yaml")["cooldown_hours"])
        gate = RetrainGate(monitoring_path(repo_root, "retrain_dir"), timedelta(hours=cooldown))
        experiment = f"retrain-{Path(check['report']).name.lower()}"
        with gate.claim(check["report"], experiment) as decision:
            action = decision.reason
            logger.info(decision.reason)
            if decision.start:
                if via_deployment:
                    from prefect.deployments import run_deployment

                    params = {"repo_root": str(root.resolve()), "experiment": experiment, "report": check["report"]}
                    run_deployment("retrain/retrain", parameters=params)
                else:
                    retrain(repo_root, experiment, check["report"])
                outcome["retrain"] = experiment
    create_markdown_artifact(summary_markdown(check, action), key="drift-check", description="Drift decision and action")
    outcome["action"] = action
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitoring", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=".")
    parser.add_argument("--log", default=None, help="request log folder (default: params monitor.log_dir)")
    parser.add_argument("--reports", default=None, help="reports folder (default: params monitor.reports_dir)")
    parser.add_argument("--no-retrain", action="store_true", help="only check and report")
    parser.add_argument("--via-deployment", action="store_true", help="start the retrain through its served deployment")
    args = parser.parse_args(argv)
    result = drift_check(args.repo, args.log, args.reports, not args.no_retrain, args.via_deployment)
    print(f"{result['report']}: drift in {result['drifted'] or 'no family'}; {result['action']}")


if __name__ == "__main__":
    main()
