"""The pipeline's Prefect deployments, defined once in flows/prefect.yaml, run two ways.

One machine, no work pool: serve them from this process (`prefect.serve`); runs go to the embedded default API,
or to a Prefect server when PREFECT_API_URL is set.

    python -m flows.deployments                      # serve: retrain weekly, check drift hourly (params `schedule`)

Several machines: a Prefect server, the `aigc` process work pool, and a worker on every machine that has the
repository installed (`pip install -e .`; AIGC_REPO_ROOT names the checkout when the worker runs elsewhere):

    prefect work-pool create aigc --type process
    prefect deploy --all --prefect-file flows/prefect.yaml
    prefect worker start --pool aigc

Five deployments, their crons read from params.yaml's `schedule` section both ways:

- `training/training` (no schedule): every dvc.yaml stage, or the `stages` asked for;
- `retrain/scheduled-retrain` on `schedule.retrain_cron`: the retrain flow with trigger `schedule`, so it
  takes the same gate (lock, cooldown) as drift-triggered and manual retrains;
- `drift-check/drift-check` on `schedule.drift_cron`: the drift check, which starts retrains through
- `retrain/retrain` (no schedule): the target of `run_deployment` when drift is found;
- `ab-decision/ab-decision` on `schedule.ab_cron`: the running A/B test's report, and its decision once it
  is clear (promote the challenger, or end its test).

`read_schedule` and `enter_repository` are flows/prefect.yaml's build and pull steps.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

PREFECT_FILE = Path(__file__).with_name("prefect.yaml")
"""The deployments, for `prefect deploy` and for `python -m flows.deployments` alike."""
REPO_ENV = "AIGC_REPO_ROOT"
"""The checkout a worker runs flows in, when it is not the one `flows` is installed from."""
SCHEDULE_STEP = "flows.deployments.read_schedule"


def read_schedule(params: str = "params.yaml") -> dict[str, str]:
    """Build step (`id: schedule`): params.yaml's `schedule` section, every value a checked cron string.

    `prefect deploy` runs it from the repository root and templates `{{ schedule.<key> }}` with its output.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from components.common import ConfigError, load_params, require

    section = load_params("schedule", params)
    section.pop("base")
    crons = {key: require(section, key, str, "schedule") for key in section}
    for key, cron in crons.items():
        try:
            CronSchedule(cron=cron)
        except ValidationError:
            raise ConfigError(f"params key 'schedule.{key}' is not a valid cron string: {cron!r}") from None
    return crons


def installed_checkout() -> Path:
    """The checkout `pip install -e .` installed this package from."""
    import flows

    return Path(flows.__file__).resolve().parents[1]


def enter_repository() -> dict[str, str]:
    """Pull step, run by the worker before each flow run: chdir into the pipeline's checkout, $AIGC_REPO_ROOT
    when set, else the installed one, so the flows' relative paths (repo_root ".", dvc.yaml) resolve there."""
    from components.common import ConfigError

    from_env = os.environ.get(REPO_ENV)
    root = Path(from_env).expanduser().resolve() if from_env else installed_checkout()
    if not (root / "dvc.yaml").is_file():
        where = f"{REPO_ENV}={from_env}" if from_env else f"{root} (where flows is installed from)"
        message = f"{where} holds no dvc.yaml: set {REPO_ENV} to the pipeline's checkout on this worker"
        if run_id := os.environ.get("PREFECT__FLOW_RUN_ID"):
            # The worker sends the API only "exited with status code 1": the reason goes to the run's logs too.
            from prefect.logging.loggers import flow_run_logger

            flow_run_logger(flow_run_id=UUID(run_id)).error(message)
        raise ConfigError(message)
    os.chdir(root)
    return {"directory": str(root)}


def load_prefect_file(path: Path = PREFECT_FILE) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def build_outputs(spec: dict[str, Any], params_path: Path) -> dict[str, Any]:
    """What `prefect deploy`'s build steps give the templates: read_schedule's output under its id and at the
    top level (as prefect.deployments.steps.run_steps stores it), read from `params_path`."""
    from components.common import ConfigError

    for step in spec.get("build") or []:
        if SCHEDULE_STEP in step:
            crons = read_schedule(str(params_path))
            step_id = (step[SCHEDULE_STEP] or {}).get("id")
            return {**crons, step_id: crons} if step_id else crons
    raise ConfigError(f"{PREFECT_FILE} has no {SCHEDULE_STEP} build step: the crons cannot be templated")


def flow_at(entrypoint: str) -> Any:
    """The flow of a prefect.yaml entrypoint (`flows/training.py:training`), imported as its module."""
    path, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)


def build_deployments(repo_root: Path, params_path: Path | None = None) -> list[Any]:
    """flows/prefect.yaml's deployments for `prefect.serve`: crons templated from params.yaml's `schedule` section
    as `prefect deploy` templates them, and `repo_root` made absolute."""
    from prefect.utilities.templating import apply_values

    from components.common import ConfigError

    spec = load_prefect_file()
    outputs = build_outputs(spec, params_path or repo_root / "params.yaml")
    root = str(repo_root.resolve())
    deployments = []
    for item in spec["deployments"]:
        parameters = dict(item.get("parameters") or {})
        if "repo_root" in parameters:
            parameters["repo_root"] = root
        schedules = apply_values(item.get("schedules") or [], outputs)
        if any(set(s) != {"cron"} for s in schedules):
            raise ConfigError(
                f'{PREFECT_FILE}: deployment {item["name"]!r}: serving takes only `cron: "{{{{ schedule.<key> }}}}"` '
                f"schedules naming a key of params.yaml's `schedule` section, got {item['schedules']}"
            )
        crons = [s["cron"] for s in schedules] or None
        deployments.append(flow_at(item["entrypoint"]).to_deployment(name=item["name"], cron=crons, parameters=parameters))
    return deployments


def main(argv: list[str] | None = None) -> None:
    from components.common import run_main

    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repo", type=Path, default=Path("."))
    args = parser.parse_args(argv)

    def body() -> None:
        from prefect import serve

        serve(*build_deployments(args.repo))

    run_main(body)


if __name__ == "__main__":
    main()
