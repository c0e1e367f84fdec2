"""Seconds and peak memory of the drift check on 10 k / 100 k / 1 M logged rows.

    dvc repro features && python bench/drift.py
    python bench/drift.py --rows 10000 100000 --max-rows 20000

Each size runs in its own process (so peak RSS is that run's): a simulated log (a third of the rows per
family, 30 % shifted) is written by another process, then `monitoring.drift.check_drift` is timed end to end: reading the
window, Evidently's report for each family, HTML + JSON. With `--max-rows 0` nothing is sampled, which shows
what sampling saves. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GENERATE = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from monitoring.simulate import write_simulated_log
write_simulated_log(Path({reference!r}), Path({work!r}) / "logs", {rows} // 3, 0.3, seed=0)
"""

CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from monitoring.drift import DriftConfig, check_drift
rows, max_rows, work = {rows}, {max_rows}, Path({work!r})
cfg = DriftConfig(window_hours=24, min_rows=100, drift_share=0.3, max_rows=max_rows or 10**9, seed=0)
start = time.perf_counter()
_, results = check_drift(cfg, work / "logs", Path({reference!r}), work / "reports")
seconds = time.perf_counter() - start
peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
decisions = {{k: v.decision for k, v in results.items()}}
print(json.dumps({{"rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": peak_mb, "decisions": decisions}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-rows", type=int, default=20_000, help="monitor.max_rows (0: no sampling)")
    parser.add_argument("--reference", default=str(ROOT / "data" / "features" / "reference"))
    args = parser.parse_args()
    if not Path(args.reference, "text.parquet").is_file():
        sys.exit(f"{args.reference} has no reference tables: run `dvc repro features` first")
    runs = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory() as work:
            fields = {"root": str(ROOT), "rows": rows, "max_rows": args.max_rows, "work": work, "reference": args.reference}
            # The log is written by another process, so the peak RSS is the check's own.
            subprocess.run([sys.executable, "-c", GENERATE.format(**fields)], check=True)
            out = subprocess.run([sys.executable, "-c", CHILD.format(**fields)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"max_rows": args.max_rows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
