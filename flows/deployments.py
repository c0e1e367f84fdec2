"""Scheduled retraining and drift checks as Prefect deployments, served from this process.

    python -m flows.deployments                      # serve: retrain weekly, check drift hourly (params `schedule`)

`flow.serve`-style serving (`prefect.serve`): no work pool needed; runs go to the embedded default API or to a
Prefect server when PREFECT_API_URL is set. Four deployments:

- `retrain/scheduled-retrain` on `schedule.retrain_cron`: the retrain flow with trigger `schedule`, so it
  takes the same gate (lock, cooldown) as drift-triggered and manual retrains;
- `drift-check/drift-check` on `schedule.drift_cron`: the drift check, which starts retrains through
- `retrain/retrain` (no schedule): the target of `run_deployment` when drift is found;
- `ab-decision/ab-decision` on `schedule.ab_cron`: the running A/B test's report, and its decision once it
  is clear (promote the challenger, or end its test).

For a server with work pools instead: `prefect deploy` with these flows' entrypoints
(`flows/monitoring.py:retrain`, `flows/monitoring.py:drift_check`, `flows/monitoring.py:ab_decision`) and the
same crons.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows.monitoring import ab_decision, drift_check, retrain


def build_deployments(repo_root: Path, params_path: Path | None = None) -> list[Any]:
    """The four deployments, schedules read from params.yaml's `schedule` section."""
    from components.common import load_params, require

    schedule = load_params("schedule", params_path or repo_root / "params.yaml")
    retrain_cron = require(schedule, "retrain_cron", str, "schedule")
    drift_cron = require(schedule, "drift_cron", str, "schedule")
    ab_cron = require(schedule, "ab_cron", str, "schedule")
    root = str(repo_root.resolve())
    return [
        retrain.to_deployment(name="scheduled-retrain", cron=retrain_cron, parameters={"repo_root": root, "trigger": "schedule"}),
        drift_check.to_deployment(name="drift-check", cron=drift_cron, parameters={"repo_root": root, "via_deployment": True}),
        retrain.to_deployment(name="retrain", parameters={"repo_root": root}),
        ab_decision.to_deployment(name="ab-decision", cron=ab_cron, parameters={"repo_root": root}),
    ]


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repo", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    serve(*build_deployments(args.repo))


if __name__ == "__main__":
    main()
