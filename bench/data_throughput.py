"""Throughput and peak memory of the whole data half, ingest -> validate -> clean -> augment -> features.

    python bench/data_throughput.py                              # 1 M and 5 M text rows, 50 000 images
    python bench/data_throughput.py --rows 200000 --images 5000  # quicker
    python bench/data_throughput.py --rows 1000000 --images 0 --profile clean   # + cProfile of one stage

Text rows are generated (source, reference) pairs in a Parquet file, as a user's input would be; images are
generated 32x32 PNGs in 10 class folders. Each stage runs in a fresh child process on the previous stage's
output, so its peak RSS is its own. Prints one JSON object: per dataset and size, each stage's seconds, rows/s
and peak RSS (the stage's process, and apart the largest of its worker processes, if it starts any), rows/s
through `clean` (ingest + validate + clean) and through `features` (all five), the largest peak RSS, and
baselines measured in the same run: a plain Arrow read + write of the text input (the I/O floor) and, with
`--one-worker-baseline`, the text features stage again in one process (`base.data_workers: 1`). With `--profile STAGE`,
the stage's top functions by cumulative time follow, from cProfile.
Goals (issue 18, 2 cores): >= 100 000 text rows/s through clean, >= 50 000 through features, peak RSS
<= 1 GB at 1 M and at 5 M rows (the same peak at both sizes shows it streams), >= 2 000 images/s through
features.
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
STAGES = ("ingest", "validate", "clean", "augment", "features")


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


def generate_images(count: int, folder: Path, seed: int) -> None:
    """`count` 32x32 RGB PNGs in 10 class folders: a per-class brightness ramp plus noise (no two alike)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 32, dtype=np.float32)
    for index in range(count):
        label = index % 10
        folder.joinpath(str(label)).mkdir(parents=True, exist_ok=True)
        base = np.stack([np.add.outer(ramp, ramp) * (40 + 20 * label)] * 3, axis=-1)
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / str(label) / f"{index:06d}.png")


def _baseline(work: Path, dataset: str) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(work / "input.parquet")
    pq.write_table(table, work / "copy.parquet", compression="zstd")


def _ingest(work: Path, dataset: str) -> None:
    from components import datasets, ingest
    from components.common import load_params

    params = load_params("ingest", PARAMS)
    if dataset == "text":
        params["text"] = {**params["text"], "path": str(work / "input.parquet")}
        batches, schema = ingest.text_batches(ingest.IngestConfig.from_params(params)), datasets.TEXT_SCHEMA
    else:
        params["images"] = {**params["images"], "path": str(work / "input")}
        batches, schema = ingest.image_batches(ingest.IngestConfig.from_params(params)), datasets.IMAGE_SCHEMA
    ingest.ingest_dataset(batches, schema, work / "raw.parquet", dataset)


def _validate(work: Path, dataset: str) -> None:
    from components import validate
    from components.common import load_params

    cfg = validate.ValidateConfig.from_params(load_params("validate", PARAMS))
    suite = validate.text_expectations(cfg.text) if dataset == "text" else validate.image_expectations(cfg.images)
    derive = validate.text_derived_columns(cfg.text) if dataset == "text" else None
    report = validate.validate_dataset(dataset, work / "raw.parquet", suite, validate.SuiteRunner(work / "docs"),
                                       work / "valid.parquet", work / "quarantine.parquet", cfg.chunk_rows, derive)  # fmt: skip
    assert report.rows_quarantined == 0, report.as_dict()


def _clean(work: Path, dataset: str) -> None:
    from components import clean
    from components.common import load_params
    from components.tables import Rows

    cfg = clean.CleanConfig.from_params(load_params("clean", PARAMS))
    kept, removed = work / "clean.parquet", work / "removed.parquet"
    if dataset == "text":
        clean.clean_text_rows(Rows.of_file(work / "valid.parquet", cfg.batch_rows), cfg, kept, removed)
    else:
        rows = Rows.of_file(work / "valid.parquet", 4096)
        clean.clean_image_rows(rows, cfg.splits, cfg.seed, kept, removed, rows.batch_rows)


def _augment(work: Path, dataset: str) -> None:
    from components import augment
    from components.common import load_params
    from components.tables import Rows

    cfg = augment.AugmentConfig.from_params(load_params("augment", PARAMS))
    if dataset == "text":
        rows = Rows.of_file(work / "clean.parquet", cfg.batch_rows)
        batches, schema = augment.text_copies(rows, cfg.text_copies, cfg.seed), augment.augmented_schema(rows.schema)
    else:
        rows = Rows.of_file(work / "clean.parquet", 4096)
        batches, schema = augment.image_copies(rows, cfg.images, cfg.seed), augment.augmented_schema(rows.schema)
    augment.write_batches(batches, schema, work / "augmented.parquet")


def _features(work: Path, dataset: str, workers: int | None = None) -> None:
    from dataclasses import replace

    from components import features
    from components.common import load_params
    from components.tables import Rows

    cfg = features.FeaturesConfig.from_params(load_params("features", PARAMS))
    cfg = cfg if workers is None else replace(cfg, workers=workers)
    batch_rows = cfg.batch_rows if dataset == "text" else features.IMAGE_BATCH_ROWS
    clean, augmented = Rows.of_file(work / "clean.parquet", batch_rows), Rows.of_file(work / "augmented.parquet", batch_rows)
    stage = features.text_features_stage if dataset == "text" else features.image_features_stage
    stage(clean, augmented, cfg, work / "features", work / "reference.parquet")


def _features_one_worker(work: Path, dataset: str) -> None:
    _features(work, dataset, workers=1)


STEPS = {"ingest": _ingest, "validate": _validate, "clean": _clean, "augment": _augment, "features": _features}


def _child(step: str, work: str, dataset: str, profile: bool, queue: Any) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    function = {"baseline_arrow_copy": _baseline, "baseline_features_one_worker": _features_one_worker}.get(step) or STEPS[step]
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    function(Path(work), dataset)
    seconds = time.perf_counter() - start
    figures: dict[str, Any] = {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    # A stage's worker processes (components.workers) have their own memory: the largest one's peak.
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if worker_peak:
        figures["worker_peak_rss_mb"] = round(worker_peak, 1)
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        figures["profile"] = text.getvalue()
    queue.put(figures)


def measure(step: str, work: Path, dataset: str, profile: bool = False) -> dict[str, Any]:
    context = mp.get_context("spawn")  # a fresh interpreter: RSS and imports are the step's own
    queue = context.Queue()
    process = context.Process(target=_child, args=(step, str(work), dataset, profile, queue))
    process.start()
    figures = queue.get()  # before join: a large profile would block the child on a full pipe
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{dataset} {step} failed with exit code {process.exitcode}")
    return figures


def run(dataset: str, rows: int, seed: int, profile: str | None, one_worker: bool = False) -> dict[str, Any]:
    """Every stage of one dataset at one size, in order, each on the previous one's output."""
    with tempfile.TemporaryDirectory(prefix=f"bench-data-{dataset}-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        if dataset == "text":
            generate(rows, work / "input.parquet", seed)
        else:
            generate_images(rows, work / "input", seed)
        generate_seconds = time.perf_counter() - start
        steps = (["baseline_arrow_copy"] if dataset == "text" else []) + list(STAGES)
        steps += ["baseline_features_one_worker"] if one_worker and dataset == "text" else []
        results = {step: measure(step, work, dataset, profile == step) for step in steps}
    profiles = {step: figures.pop("profile") for step, figures in results.items() if "profile" in figures}
    for figures in results.values():
        figures["rows_per_s"] = round(rows / figures["seconds"])
        figures["seconds"] = round(figures["seconds"], 2)
        figures["peak_rss_mb"] = round(figures["peak_rss_mb"], 1)

    def through(last: str) -> dict[str, Any]:
        stages = STAGES[: STAGES.index(last) + 1]
        seconds = sum(results[s]["seconds"] for s in stages)
        return {"seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
                "peak_rss_mb": max(results[s]["peak_rss_mb"] for s in stages),
                "worker_peak_rss_mb": max(results[s].get("worker_peak_rss_mb", 0) for s in stages)}  # fmt: skip

    report = {"rows": rows, "generate_seconds": round(generate_seconds, 2), "stages": results,
              "through_clean": through("clean"), "through_features": through("features")}  # fmt: skip
    if dataset == "text":
        report["through_clean_vs_arrow_copy_time_ratio"] = round(
            report["through_clean"]["seconds"] / results["baseline_arrow_copy"]["seconds"], 1
        )
    if "baseline_features_one_worker" in results:
        report["features_one_worker_vs_workers_time_ratio"] = round(
            results["baseline_features_one_worker"]["seconds"] / results["features"]["seconds"], 2
        )
    if profiles:
        report["profile"] = profiles
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 5_000_000], help="text sizes (rows)")
    parser.add_argument("--images", type=int, default=50_000, help="generated images (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=STAGES, default=None, help="cProfile this stage (first text size only)")
    parser.add_argument("--one-worker-baseline", action="store_true", help="also time text features with one worker")
    args = parser.parse_args()
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "text": {}, "images": None}
    for index, rows in enumerate(args.rows):
        report["text"][str(rows)] = run("text", rows, args.seed, args.profile if index == 0 else None, args.one_worker_baseline)
        print(json.dumps({"done": f"text {rows}", **report["text"][str(rows)]["through_features"]}), file=sys.stderr)
    if args.images:
        report["images"] = run("images", args.images, args.seed, None)
    report["goal"] = {"text_through_clean_rows_per_s": 100_000, "text_through_features_rows_per_s": 50_000,
                      "peak_rss_mb": 1024, "images_through_features_per_s": 2_000}  # fmt: skip
    profiles = {size: r.pop("profile") for size, r in report["text"].items() if "profile" in r}
    print(json.dumps(report, indent=2))
    for size, stages in profiles.items():
        for step, text in stages.items():
            print(f"\n# cProfile: text {size} rows, {step}\n{text}")


if __name__ == "__main__":
    main()
