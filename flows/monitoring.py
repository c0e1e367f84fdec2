"""Drift check, and the one retrain flow every trigger goes through.

    python -m flows.monitoring                         # check the last window; retrain on drift
    python -m flows.monitoring --no-retrain            # only the check and its report
    python -m flows.monitoring --retrain               # retrain now (manual trigger), through the same gate

`retrain` is the only way to retrain, whoever asks: the weekly schedule (flows/deployments.py), a drift
check, or a person. It first claims the retrain gate (monitoring/retrain_gate.py: lock, cooldown, state
record), so two requests never run at once and a refused one says who holds the lock. Then it snapshots the
landing folder into a DVC-tracked data version (monitoring/landing.py), runs the whole pipeline as a DVC
experiment (`dvc exp run --temp -n <name>`), aside from the workspace, and compares the challenger with the
champion on the same test data (monitoring/promotion.py: BLEU, FID, PSNR with paired-bootstrap intervals).
Only when no family is worse beyond its tolerance is it promoted: `dvc exp apply`, then the promotion record
(serving/promoted.py) names the receipt its experiment packaged (or, with `promotion.require_online`, it
goes on an online A/B test first). A rejected challenger changes nothing the
service reads: packaging inside the experiment only adds content-addressed entries to the model store.
`monitoring/promotion/history.json` lists every decision; `dvc exp apply <name>` reproduces any retrain.
Every experiment, promoted or not, then goes to the team with `dvc exp push <remote.git_remote> <name>` (its
git ref, and its outputs to the DVC remote of flows/remote.py); without that git remote it stays local.

`drift_check` runs `monitoring.drift` over the request log and publishes the decision as a markdown
artifact; on drift it calls `retrain` (as a subflow, or through `run_deployment("retrain/retrain")` when
deployments are served: `--via-deployment`). Each flow ends by pushing the loop's state (drift, retrains,
champion) to the Pushgateway for Prometheus (monitoring/loop_metrics.py), when params name one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.remote import RemoteConfig, configure, dvc_env, dvc_executable


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
    service = json.loads((report_dir / "decision.json").read_text(encoding="utf-8"))["service"]
    return {"report": str(report_dir), "results": {name: r.as_dict() for name, r in results.items()}, "service": service}


@task(task_run_name="push-loop-metrics")
def push_loop_metrics(repo_root: str) -> str:
    """The loop's latest state to the Pushgateway; a failure is a warning line, never a failed flow."""
    from monitoring.loop_metrics import publish

    level, line = publish(Path(repo_root))
    get_run_logger().log(level, line)
    return line


def dvc(repo_root: str, *args: str) -> None:
    """Run a DVC command in the repo (this interpreter's venv), its output into the task log."""
    logger = get_run_logger()
    run = subprocess.run([dvc_executable(), *args], cwd=repo_root, env=dvc_env(), capture_output=True, text=True)
    for line in (run.stdout + run.stderr).splitlines()[-40:]:
        logger.info(line)
    if run.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed with exit {run.returncode}")


def retrain_gate(repo_root: str) -> Any:
    from monitoring.retrain_gate import RetrainGate

    return RetrainGate.from_params(Path(repo_root))


@task(task_run_name="snapshot-landing")
def snapshot_landing(repo_root: str) -> str | None:
    """New files of the landing folder become a DVC-tracked snapshot the experiment reads and records."""
    from monitoring.landing import feedback_to_landing, snapshot

    feedback_to_landing(Path(repo_root))  # users' edited texts become training references
    taken = snapshot(Path(repo_root))
    get_run_logger().info("landing: %s", f"snapshot {taken.name} ({taken.files} new files)" if taken else "nothing new")
    return taken.name if taken else None


@task(task_run_name="dvc-exp-run-{experiment}")
def dvc_experiment(repo_root: str, experiment: str) -> str:
    """`dvc exp run --temp -n <experiment>`: the whole pipeline as a named experiment, run aside so the
    workspace keeps the champion until the gate decides."""
    dvc(repo_root, "exp", "run", "--temp", "-n", experiment)
    return experiment


@task(retries=2, retry_delay_seconds=[5, 30], task_run_name="dvc-exp-push-{experiment}")
def push_experiment(repo_root: str, experiment: str, remote: RemoteConfig) -> str | None:
    """`dvc exp push <remote.git_remote> <experiment>`: its git ref to the team's git remote and, with
    `remote.push`, its outputs to the DVC remote, so another machine can `dvc exp pull` or `dvc exp apply` it.
    Returns where it went; None, with one log line, when git has no such remote (the experiment stays here)."""
    logger = get_run_logger()
    if remote.git_remote is None:
        logger.info("experiment %s stays local: params remote.git_remote is null", experiment)
        return None
    where = subprocess.run(["git", "remote", "get-url", remote.git_remote], cwd=repo_root, capture_output=True, text=True)
    if where.returncode != 0:
        logger.info("experiment %s stays local: git has no remote '%s' (params remote.git_remote)", experiment, remote.git_remote)
        return None
    if remote.push:
        logger.info(configure(Path(repo_root), remote).describe())
    dvc(repo_root, "exp", "push", *([] if remote.push else ["--no-cache"]), remote.git_remote, experiment)
    logger.info("experiment %s pushed to %s (%s)", experiment, remote.git_remote, where.stdout.strip())
    return where.stdout.strip()


def champion_revision(root: Path, record: Path) -> tuple[str | None, str | None]:
    """(the revision holding the champion's evaluations, why no comparison can be made): the workspace (None)
    when its package receipt is the promoted champion or nothing is promoted yet; else the experiment that
    promoted the champion (after a rollback, say); else a refusal, since comparing against other models
    would promote on a wrong yardstick."""
    from monitoring.promote import receipt_path
    from serving.promoted import current

    champion = current(record)
    receipt = receipt_path(root)
    workspace = json.loads(receipt.read_text(encoding="utf-8"))["models"] if receipt.is_file() else {}
    if champion is None or workspace == champion["models"]:
        return None, None
    if champion.get("experiment"):
        return champion["experiment"], None
    return None, (
        f"the workspace's models ({receipt}) are not the served champion ({record}), which no experiment "
        "recorded: bring the workspace to the champion's revision (`git checkout` + `dvc checkout`) first"
    )


@task(task_run_name="champion-challenger-{experiment}")
def champion_challenger(repo_root: str, experiment: str, champion_rev: str | None = None) -> dict[str, Any]:
    """Compare the experiment (challenger) with the champion (the workspace, or the experiment that promoted
    it); record the decision and its outcome."""
    from components.common import load_params
    from monitoring.promotion import PromotionConfig, compare_revisions, record

    root = Path(repo_root)
    cfg = PromotionConfig.from_params(load_params("promotion", root / "params.yaml"))
    comparisons = compare_revisions(root, experiment, cfg, champion_rev)
    for comparison in comparisons:
        get_run_logger().info("%s: %s", comparison.family, comparison.reason)
    passed = all(c.promote for c in comparisons)
    outcome = "rejected" if not passed else "online A/B test" if cfg.require_online else "promoted"
    return {**record(root / cfg.history, comparisons, experiment, outcome == "promoted", outcome=outcome), "passed": passed}


@task(task_run_name="promote-{experiment}")
def promote(repo_root: str, experiment: str, why: str) -> dict[str, Any]:
    """The challenger becomes the workspace's models (`dvc exp apply`) and the promotion record names the
    receipt its experiment packaged, or, with `promotion.require_online`, it goes on an online A/B test first
    (params `ab`) and `python -m monitoring.ab --decide` promotes it when users prefer it. Either way the
    service changes at its next start."""
    from components.common import load_params
    from monitoring.ab import ABConfig
    from monitoring.promote import apply_experiment, promote_receipt, receipt_path
    from monitoring.promotion import PromotionConfig
    from serving.promoted import challenge

    root = Path(repo_root)
    cfg = PromotionConfig.from_params(load_params("promotion", root / "params.yaml"))
    if cfg.require_online:
        ab = ABConfig.from_params(load_params("ab", root / "params.yaml"))
        content = experiment_receipt(root, experiment)
        return challenge(root / cfg.record, content["models"], content["bento"], ab.share, ab.mode,
                         "retrain flow", f"offline gate passed; online A/B before serving: {why}", experiment,
                         compressed=content.get("compressed"))  # fmt: skip
    for line in apply_experiment(root, experiment, experiment_receipt(root, experiment)):
        get_run_logger().info(line)
    return promote_receipt(root, receipt_path(root), root / cfg.record, "retrain flow", why, experiment)


def experiment_receipt(root: Path, experiment: str) -> dict[str, Any]:
    """The package receipt an experiment wrote (its models are already in the store: it packaged them)."""
    from monitoring.promote import receipt_path
    from monitoring.promotion import read_artifact

    return json.loads(read_artifact(root, receipt_path(root).relative_to(root).as_posix(), experiment))


@flow(name="retrain", log_prints=True)
def retrain(
    repo_root: str = ".", experiment: str | None = None, trigger: str = "manual", ignore_cooldown: bool = False
) -> dict[str, Any]:
    """The one retrain, whoever asks (`trigger`: schedule, manual, or the drift report): claim the gate, snapshot
    the landing folder, reproduce the pipeline as a DVC experiment, and promote it only if the champion /
    challenger gate says it is not worse beyond the tolerances."""
    from components.common import load_params
    from monitoring.promotion import PromotionConfig

    logger = get_run_logger()
    name = experiment or f"retrain-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    gate = retrain_gate(repo_root)
    record = Path(repo_root) / PromotionConfig.from_params(load_params("promotion", Path(repo_root) / "params.yaml")).record
    champion_rev, impossible = champion_revision(Path(repo_root), record)
    remote = RemoteConfig.load(Path(repo_root))  # a bad `remote` section stops here, before anything runs
    with gate.claim(trigger, name, ignore_cooldown=ignore_cooldown, refuse=impossible) as answer:
        logger.info(answer.reason)
        if not answer.start:
            create_markdown_artifact(f"## Retrain {name}: not started\n\n{answer.reason}\n", key="promotion",
                                     description="Champion / challenger")  # fmt: skip
            return {"experiment": name, "started": False, "reason": answer.reason, "promoted": False, "comparisons": []}
        snapshot = snapshot_landing(repo_root)
        dvc_experiment(repo_root, name)
        decision = champion_challenger(repo_root, name, champion_rev)
        reasons = "\n".join(f"- {c['reason']}" for c in decision["comparisons"])
        if decision["passed"]:
            promote(repo_root, name, f"retrain {name} ({trigger}) not worse than the champion:\n{reasons}")
        # After the decision, so an unreachable remote never holds back a promotion; the experiment is safe here.
        pushed = push_experiment(repo_root, name, remote, return_state=True)
        if pushed.is_failed():
            logger.warning("experiment %s not pushed (%s); later: dvc exp push %s %s", name, pushed.message,
                           remote.git_remote, name)  # fmt: skip
    verdicts = {"promoted": "promoted", "rejected": "not promoted: the champion stays",
                "online A/B test": "passed offline; now on an online A/B test (python -m monitoring.ab)"}  # fmt: skip
    verdict = verdicts[decision["outcome"]]
    create_markdown_artifact(f"## Retrain {name}: {verdict}\n\n{reasons}\n", key="promotion", description="Champion / challenger")
    shared_to = None if pushed.is_failed() else pushed.result()
    push_loop_metrics(repo_root)
    return {**decision, "started": True, "reason": answer.reason, "landing_snapshot": snapshot, "pushed_to": shared_to}


@flow(name="ab-decision", log_prints=True)
def ab_decision(repo_root: str = ".") -> dict[str, Any] | None:
    """The running A/B test's report and, once it is clear, its decision, as `python -m monitoring.ab
    --decide` (scheduled, so a test started by a retrain with `promotion.require_online` ends unattended)."""
    from monitoring.ab import check

    report = check(Path(repo_root), decide=True, by="ab-decision flow")
    push_loop_metrics(repo_root)
    if report is None:
        get_run_logger().info("no A/B test is running")
        return None
    lines = [f"## A/B test: {report['comparison']['decision']}", "", report["comparison"]["reason"], "",
             f"Action: {report['action']}", "", "| variant | figures |", "|---|---|"]  # fmt: skip
    lines += [f"| {variant} | {figures} |" for variant, figures in report["variants"].items()]
    create_markdown_artifact("\n".join(lines) + "\n", key="ab-decision", description="Online A/B report and decision")
    return report


def summary_markdown(check: dict[str, Any], action: str) -> str:
    lines = ["## Drift check", "", f"Report: `{check['report']}`", "", "| family | decision | why |", "|---|---|---|"]
    lines += [f"| {name} | {r['decision']} | {r['reason']} |" for name, r in check["results"].items()]
    lines += ["", "| endpoint | requests | 4xx | 5xx | error rate | p50 ms | p95 ms |", "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {name} | {h['requests']} | {h['client_errors']} | {h['server_errors']} | {h['error_rate']:.1%} | "
        f"{h['latency_ms_p50']} | {h['latency_ms_p95']} |"
        for name, h in check.get("service", {}).items()
    ]
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
    logger = get_run_logger()
    root = Path(repo_root)
    check = run_drift_check(repo_root, log_dir, reports_dir)
    drifted = [name for name, r in check["results"].items() if r["decision"] == "drift"]
    action = "none: no drift" if not drifted else "none: retraining disabled"
    outcome: dict[str, Any] = {**check, "drifted": drifted, "retrain": None}
    if drifted and retrain_on_drift:
        experiment = f"retrain-{Path(check['report']).name.lower()}"
        if via_deployment:
            from prefect.deployments import run_deployment

            params = {"repo_root": str(root.resolve()), "experiment": experiment, "trigger": check["report"]}
            run_deployment("retrain/retrain", parameters=params)
            # The deployment's run answered through the gate's request log, whatever its result storage.
            answers = [r for r in retrain_gate(repo_root).requests() if r["experiment"] == experiment]
            last = answers[-1] if answers else {"started": False, "reason": "the retrain deployment did not run"}
            started, action = last["started"], last["reason"]
        else:
            result = retrain(repo_root, experiment, trigger=check["report"])
            started, action = result["started"], result["reason"]
        logger.info(action)
        outcome["retrain"] = experiment if started else None
    create_markdown_artifact(summary_markdown(check, action), key="drift-check", description="Drift decision and action")
    outcome["action"] = action
    push_loop_metrics(repo_root)
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitoring", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=".")
    parser.add_argument("--log", default=None, help="request log folder (default: params monitor.log_dir)")
    parser.add_argument("--reports", default=None, help="reports folder (default: params monitor.reports_dir)")
    parser.add_argument("--no-retrain", action="store_true", help="only check and report")
    parser.add_argument("--retrain", action="store_true", help="skip the check: retrain now, through the gate")
    parser.add_argument("--ignore-cooldown", action="store_true", help="with --retrain: skip the cooldown (never the lock)")
    parser.add_argument("--via-deployment", action="store_true", help="start the retrain through its served deployment")
    args = parser.parse_args(argv)
    if args.retrain:
        done = retrain(args.repo, trigger="manual", ignore_cooldown=args.ignore_cooldown)
        verdict = done["outcome"] if done["started"] else done["reason"]
        print(f"{done['experiment']}: {verdict}")
        raise SystemExit(0 if done["started"] else 1)
    result = drift_check(args.repo, args.log, args.reports, not args.no_retrain, args.via_deployment)
    print(f"{result['report']}: drift in {result['drifted'] or 'no family'}; {result['action']}")


if __name__ == "__main__":
    main()
