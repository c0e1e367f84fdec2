"""Synthetic request logs drawn from the drift reference, optionally shifted: for drift tests, benches and
trying the drift check before real traffic exists.

    python -m monitoring.simulate data/features/reference monitoring/logs --rows 5000 --shift 0.8
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from components.feature_defs import ATTRIBUTE_PREFIX
from components.tables import write_parquet_atomic
from serving.request_log import log_schema


def simulated_log(reference_dir: Path, rows: int, shift: float, seed: int, now: datetime | None = None) -> pa.Table:
    """`rows` log rows per family, resampled from the reference; `shift` in [0, 1] moves that share of the
    rows off the reference (text: longer prompts with unseen values of every logged attribute; images: all
    one label; restore: darker, larger uploads)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    now = (now or datetime.now(UTC)).replace(microsecond=0)  # the log keeps milliseconds
    frames = []
    text_reference = pd.read_parquet(reference_dir / "text.parquet")
    attributes = tuple(c[len(ATTRIBUTE_PREFIX) :] for c in text_reference.columns if c.startswith(ATTRIBUTE_PREFIX))
    schema = log_schema(attributes)
    columns = schema.names
    for family, endpoint in (("text", "generate_text"), ("images", "generate_image"), ("restore", "restore_image")):
        reference = pd.read_parquet(reference_dir / f"{family}.parquet")
        sample = reference.sample(n=rows, replace=True, random_state=int(rng.integers(1 << 31))).reset_index(drop=True)
        shifted = rng.random(rows) < shift
        if family == "text":
            sample.loc[shifted, "source_chars"] = sample.loc[shifted, "source_chars"] * 3
            sample.loc[shifted, "source_tokens"] = sample.loc[shifted, "source_tokens"] * 3
            for column in sample.columns:
                if column.startswith(ATTRIBUTE_PREFIX):
                    sample.loc[shifted, column] = "(unseen value)"
            if "oov_share" in sample.columns:
                sample.loc[shifted, "oov_share"] = 0.5
        elif family == "images":
            sample.loc[shifted, "label"] = sample["label"].iloc[0] if len(sample) else None
        else:
            sample.loc[shifted, "brightness"] = sample.loc[shifted, "brightness"] * 0.3
            sample.loc[shifted, "width"] = sample.loc[shifted, "width"] * 2
        sample["endpoint"] = endpoint
        sample["status"] = 200
        sample["timestamp"] = [now - timedelta(milliseconds=int(ms)) for ms in rng.integers(0, 3_600_000, rows)]
        sample["request_id"] = [f"sim-{family}-{i}" for i in range(rows)]
        sample["latency_ms"] = rng.gamma(2.0, 50.0, rows)
        frames.append(sample[[c for c in columns if c in sample.columns]])
    table = pd.concat(frames, ignore_index=True)
    for column in columns:
        if column not in table.columns:
            table[column] = None
    return pa.Table.from_pandas(table[list(columns)], schema=schema, preserve_index=False)


def write_simulated_log(reference_dir: Path, log_dir: Path, rows: int, shift: float, seed: int = 0) -> Path:
    path = log_dir / f"requests-simulated-{seed:06d}.parquet"
    write_parquet_atomic(simulated_log(reference_dir, rows, shift, seed), path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m monitoring.simulate", description=__doc__)
    parser.add_argument("reference", type=Path)
    parser.add_argument("log", type=Path)
    parser.add_argument("--rows", type=int, default=5000, help="rows per family")
    parser.add_argument("--shift", type=float, default=0.0, help="share of rows moved off the reference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_simulated_log(args.reference, args.log, args.rows, args.shift, args.seed))


if __name__ == "__main__":
    main()
