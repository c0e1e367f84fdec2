"""What the service's metrics cost: microseconds per counted request, and the time to render `/metrics`.

    python bench/metrics_overhead.py
    python bench/metrics_overhead.py --requests 200000 --tags 3 --variants 2

Runs in a child process with `PROMETHEUS_MULTIPROC_DIR` set, as a BentoML worker does (prometheus_client's
multiprocess values are memory-mapped files). Times `serving.metrics.count_request` for a mix of answered
requests and refusals over every endpoint, model tag and variant, against a baseline loop that builds the same
arguments and counts nothing; then renders the scrape the way BentoML's `/metrics` does (MultiProcessCollector
over the folder). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from serving.metrics import count_request
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

endpoints = ["generate_text", "generate_image", "restore_image", "feedback"]
answers = [(200, None, ""), (200, None, ""), (200, None, ""), (400, "InvalidArgument", "seed: too large"),
           (401, "Unauthorized", "authorization: missing"), (503, "Overloaded", "busy")]
calls = [(endpoints[i % 4], *answers[i % 6], f"aigc-text:{{i % {tags}}}", ["champion", "challenger"][i % {variants}])
         for i in range(997)]
fields = ("record", "prompt", "seed", "label", "n", "image")

def run(count):
    start = time.perf_counter()
    for i in range({requests}):
        endpoint, status, error, message, tag, variant = calls[i % 997]
        if count:
            count_request(endpoint, status, 0.01 * (i % 50), variant, tag, error, message, fields)
    return time.perf_counter() - start

run(True)  # files created, values mapped
baseline, counted = run(False), run(True)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)
start = time.perf_counter()
page = generate_latest(registry)
render = time.perf_counter() - start
series = sum(1 for line in page.decode().splitlines() if line and not line.startswith("#"))
print(json.dumps({{
    "requests": {requests}, "per_request_us": round((counted - baseline) / {requests} * 1e6, 2),
    "baseline_us": round(baseline / {requests} * 1e6, 3), "scrape_render_ms": round(render * 1000, 2),
    "scrape_samples": series, "scrape_bytes": len(page),
}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=2, help="model tags a service has served (a restart each)")
    parser.add_argument("--variants", type=int, default=2, choices=(1, 2))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder}
        code = CHILD.format(root=str(ROOT), requests=args.requests, tags=args.tags, variants=args.variants)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(run.stderr[-2000:])
        print(json.dumps({"bench": "metrics_overhead", **json.loads(run.stdout)}, indent=2))


if __name__ == "__main__":
    main()
