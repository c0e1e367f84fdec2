"""Throughput of the data stages on generated text: ingest + validate + clean of N rows.

    python bench/data_throughput.py                 # 1 000 000 rows
    python bench/data_throughput.py --rows 200000

Prints one JSON object: rows/s and peak RSS for each stage and for the three together, plus a baseline
measured in the same run (a plain Arrow read + write of the same file: the I/O floor) and the ratio.
Each measurement runs in a fresh child process, so peak RSS is that stage's own.
Goal (issue 2): >= 100 000 rows/s end to end on 2 cores with peak RSS <= 1 GB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def generate(rows: int, path: Path, seed: int) -> None:
    """Write `rows` generated (source, reference) rows to a Parquet file, as a user's input would be."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.textgen import generate as generate_rows

    writer = None
    written = 0
    for chunk in generate_rows(rows // 3 + 1, 3, seed, chunk_records=20_000):
        chunk = chunk[: rows - written]
        table = pa.table({"source": [r[1] for r in chunk], "reference": [r[2] for r in chunk]})
        writer = writer or pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
        written += len(chunk)
        if written >= rows:
            break
    assert writer is not None
    writer.close()


def _baseline(work: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(work / "input.parquet")
    pq.write_table(table, work / "copy.parquet", compression="zstd")


def _ingest(work: Path) -> None:
    from components import datasets, ingest
    from components.common import load_params

    params = load_params("ingest", PARAMS)
    params["text"] = {**params["text"], "path": str(work / "input.parquet")}
    cfg = ingest.IngestConfig.from_params(params)
    ingest.ingest_dataset(ingest.text_batches(cfg), datasets.TEXT_SCHEMA, work / "raw.parquet", "text")


def _validate(work: Path) -> None:
    from components import validate
    from components.common import load_params

    cfg = validate.ValidateConfig.from_params(load_params("validate", PARAMS))
    runner = validate.SuiteRunner(work / "docs")
    report = validate.validate_dataset(
        "text",
        work / "raw.parquet",
        validate.text_expectations(cfg.text),
        runner,
        work / "valid.parquet",
        work / "quarantine.parquet",
        cfg.chunk_rows,
    )
    assert report.rows_quarantined == 0, report.as_dict()


def _clean(work: Path) -> None:
    import pyarrow.parquet as pq

    from components import clean
    from components.common import load_params
    from components.tables import write_parquet_atomic

    cfg = clean.CleanConfig.from_params(load_params("clean", PARAMS))
    result = clean.clean_text(pq.read_table(work / "valid.parquet"), cfg)
    write_parquet_atomic(result.kept, work / "clean.parquet")


STEPS = {"baseline_arrow_copy": _baseline, "ingest": _ingest, "validate": _validate, "clean": _clean}


def _child(step: str, work: str, queue: Any) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    start = time.perf_counter()
    STEPS[step](Path(work))
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure(step: str, work: Path) -> dict[str, float]:
    context = mp.get_context("spawn")  # a fresh interpreter: RSS and imports are the step's own
    queue = context.Queue()
    process = context.Process(target=_child, args=(step, str(work), queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{step} failed with exit code {process.exitcode}")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        generate(args.rows, work / "input.parquet", args.seed)
        generate_seconds = time.perf_counter() - start
        results = {step: measure(step, work) for step in STEPS}
    pipeline_seconds = sum(results[s]["seconds"] for s in ("ingest", "validate", "clean"))
    for figures in results.values():
        figures["rows_per_s"] = round(args.rows / figures["seconds"])
        figures["seconds"] = round(figures["seconds"], 2)
        figures["peak_rss_mb"] = round(figures["peak_rss_mb"], 1)
    report = {
        "rows": args.rows,
        "cpu_count": os.cpu_count(),
        "generate_seconds": round(generate_seconds, 2),
        "stages": results,
        "pipeline": {
            "seconds": round(pipeline_seconds, 2),
            "rows_per_s": round(args.rows / pipeline_seconds),
            "peak_rss_mb": max(results[s]["peak_rss_mb"] for s in ("ingest", "validate", "clean")),
        },
        "pipeline_vs_arrow_copy_time_ratio": round(pipeline_seconds / results["baseline_arrow_copy"]["seconds"], 1),
        "goal": {"rows_per_s": 100_000, "peak_rss_mb": 1024},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
