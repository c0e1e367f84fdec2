"""Wall time of a 4-trial grid sweep (`python -m flows.sweep grid`) run by DVC's queue with 1 and with 2 workers.

    python bench/sweep.py                 # the tests' tiny configuration: what the queue and DVC cost per trial
    python bench/sweep.py --steps 200     # longer trainings: where parallel trials pay

Builds the pipeline under a temporary folder (the real params.yaml, shrunk as the tests shrink it), reproduces it
up to evaluate_text, then runs two 2 x 2 grids over train_text.lr and train_text.model.n_layer, one with
`--jobs 1` and one with `--jobs 2`. The two grids use different learning rates, so neither is answered by
DVC's run cache from the other. Prints one JSON object: each grid's wall seconds and seconds per trial, and
the 1-job / 2-job time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="train_text.max_steps (default: the tests' tiny 12)")
    args = parser.parse_args()
    from flows.sweep import end_queue_workers
    from tests.conftest import copy_repo, shrink, venv_env

    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8")))
    if args.steps:
        params["train_text"].update(max_steps=args.steps, validate_every=args.steps, checkpoint_every=args.steps)
    env = venv_env()
    report: dict[str, object] = {"cpu_count": os.cpu_count(), "trials": 4, "max_steps": params["train_text"]["max_steps"]}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = copy_repo(Path(tmp) / "repo", params)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro", "-q", "evaluate_text"], cwd=root, env=env, check=True)
        report["baseline_repro_s"] = round(time.perf_counter() - start, 1)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        subprocess.run([*git, "add", "-A"], cwd=root, check=True)
        subprocess.run([*git, "commit", "-qm", "baseline"], cwd=root, check=True)
        for jobs, rates in ((1, "1e-3,2e-3"), (2, "4e-3,5e-3")):
            command = [sys.executable, "-m", "flows.sweep", "grid", "-S", f"train_text.lr={rates}",
                       "-S", "train_text.model.n_layer=1,2", "--jobs", str(jobs), "--name", f"jobs{jobs}"]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"--jobs {jobs} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
            report[f"jobs_{jobs}"] = {"seconds": round(seconds, 1), "seconds_per_trial": round(seconds / 4, 1)}
        end_queue_workers(root)
    jobs_1, jobs_2 = report["jobs_1"], report["jobs_2"]
    assert isinstance(jobs_1, dict) and isinstance(jobs_2, dict)
    report["jobs_1_vs_jobs_2_time_ratio"] = round(jobs_1["seconds"] / jobs_2["seconds"], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
