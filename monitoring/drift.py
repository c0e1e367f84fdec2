"""Drift check: the service's request log against the training reference, with Evidently.

    python -m monitoring.drift monitoring/logs data/features/reference --out monitoring/reports

For each family (text, images, restore) the requests of the window (the last `monitor.window_hours`) are
compared with the `features` stage's reference table on the same feature definitions
(`components/feature_defs.py`), with Evidently's DataDriftPreset: a per-feature test (K-S or Z-test p-value,
or Wasserstein / Jensen-Shannon distance on large samples, as Evidently picks), and dataset drift when the
share of drifted features reaches `monitor.drift_share`. Each family's decision is `drift`, `no drift` or
`skipped` (fewer than `monitor.min_rows` requests in the window, with the reason). Only answered requests
(status 200) count as data; beside drift, `decision.json` reports the service's health per endpoint over the
same window: requests, 4xx and 5xx counts and rate, errors by class, and latency percentiles. Reports go to
`<out>/<UTC timestamp>/`: `<family>.html` and `<family>.json` (Evidently's own) and `decision.json`.

Large windows are sampled (`monitor.max_rows` per side, seeded): the tests' power is already near 1 at that
size, so sampling changes run time, not decisions, while Evidently's cost grows with rows (issue #1526).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from components.common import ConfigError, DataError, load_params, require, run_main, write_json
from components.feature_defs import ATTRIBUTE_PREFIX

log = logging.getLogger(__name__)

# family -> (log endpoint, numerical features, categorical features). Text also tests every record attribute
# the reference table holds (`attr_<key>`: the schema's categorical keys, chosen by the features stage).
FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "text": ("generate_text", ("source_chars", "source_tokens", "num_attributes", "oov_share"), ()),
    "images": ("generate_image", (), ("label",)),
    "restore": ("restore_image", ("width", "height", "brightness", "contrast", "sharpness"), ()),
}
MISSING = "(none)"


@dataclass(frozen=True)
class DriftConfig:
    window_hours: float
    min_rows: int
    drift_share: float
    max_rows: int
    seed: int
    stattest_threshold: float | None = None  # None: Evidently's default per test (p < 0.05, or its distance cut-off)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DriftConfig:
        p = "monitor"
        threshold = params.get("stattest_threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1
        ):
            raise ConfigError(f"params key '{p}.stattest_threshold' must be a number in (0, 1) or null, got {threshold!r}")
        return cls(
            window_hours=float(require(params, "window_hours", (int, float), p, low=0.01)),
            min_rows=require(params, "min_rows", int, p, low=1),
            drift_share=float(require(params, "drift_share", (int, float), p, low=0.01, high=1)),
            max_rows=require(params, "max_rows", int, p, low=100),
            seed=require(params["base"], "seed", int, "base"),
            stattest_threshold=float(threshold) if threshold is not None else None,
        )


@dataclass
class DriftResult:
    family: str
    decision: str  # "drift" | "no drift" | "skipped"
    reason: str
    rows: int
    reference_rows: int
    drifted_share: float | None = None
    features: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_window(log_dir: Path, endpoint: str | None, since: datetime, answered_only: bool = True) -> Any:
    """Rows logged since `since` (a pandas DataFrame; empty when there is no log yet): of one endpoint (None:
    all), answered ones (status 200) only unless `answered_only` is off."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    parts = sorted(log_dir.glob("requests-*.parquet")) if log_dir.is_dir() else []
    if not parts:
        return pd.DataFrame()
    # Parts written by different models can log different attributes: read them under their union.
    schema = pa.unify_schemas([pq.read_schema(p) for p in parts])
    dataset = ds.dataset([str(p) for p in parts], format="parquet", schema=schema)
    condition = ds.field("timestamp") >= since
    if endpoint is not None:
        condition &= ds.field("endpoint") == endpoint
    if answered_only:
        # A shadow row is the A/B challenger answering unseen beside the champion: not a request of its own.
        condition &= ds.field("status") == 200
        if "variant" in schema.names:  # logs written before A/B tests have no variant
            condition &= ds.field("variant").is_null() | (ds.field("variant") != "shadow")
    return dataset.to_table(filter=condition).to_pandas()


def service_health(log_dir: Path, since: datetime) -> dict[str, dict[str, Any]]:
    """Per endpoint over the window: requests, client (4xx) and server (5xx) errors, their rate, the errors
    by class, and latency percentiles (ms) of all requests and the p95 of the answered ones."""
    frame = read_window(log_dir, None, since, answered_only=False)
    health: dict[str, dict[str, Any]] = {}
    if frame.empty:
        return health
    variant = frame["variant"] if "variant" in frame else None
    shadow = variant == "shadow" if variant is not None else frame["endpoint"].isna()
    # The shadow challenger's rows are reported apart: they are not requests, and their latency is its own.
    frame = frame.assign(endpoint=frame["endpoint"].where(~shadow, frame["endpoint"] + " (shadow)"))
    for endpoint, rows in frame.groupby("endpoint"):
        failed = rows[rows["status"] >= 400]
        answered = rows[rows["status"] < 400]["latency_ms"].dropna()
        latency = rows["latency_ms"].dropna()
        health[str(endpoint)] = {
            "requests": int(len(rows)),
            "client_errors": int(((rows["status"] >= 400) & (rows["status"] < 500)).sum()),
            "server_errors": int((rows["status"] >= 500).sum()),
            "error_rate": round(len(failed) / len(rows), 4),
            "errors_by_class": {str(k): int(v) for k, v in failed["error"].fillna("unknown").value_counts().items()},
            "latency_ms_p50": round(float(latency.quantile(0.5)), 1) if len(latency) else None,
            "latency_ms_p95": round(float(latency.quantile(0.95)), 1) if len(latency) else None,
            "answered_latency_ms_p95": round(float(answered.quantile(0.95)), 1) if len(answered) else None,
        }
    return health


def prepare(frame: Any, numerical: tuple[str, ...], categorical: tuple[str, ...], max_rows: int, seed: int) -> Any:
    """The feature columns only, categoricals as strings with missing values named, sampled to max_rows."""
    missing = [c for c in numerical if c not in frame.columns]
    if missing:
        raise DataError(f"drift features {missing} are missing from the table (has {list(frame.columns)})")
    out = frame[list(numerical)].copy()
    for column in categorical:
        # An attribute no record has is a column the table does not hold: every value is "(none)".
        values = frame[column] if column in frame.columns else None
        out[column] = MISSING if values is None else values.astype("object").where(values.notna(), MISSING).astype(str)
    for column in numerical:
        out[column] = out[column].astype(float)
    return out.sample(n=max_rows, random_state=seed) if len(out) > max_rows else out


def build_drift_report(family: str, reference: Any, current: Any, cfg: DriftConfig) -> tuple[DriftResult, Any]:
    """Compare one family's window with its reference; returns the decision and Evidently's snapshot
    (None when skipped)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    _, numerical, categorical = FAMILIES[family]
    categorical += tuple(c for c in reference.columns if c.startswith(ATTRIBUTE_PREFIX))
    if len(current) < cfg.min_rows:
        reason = f"{len(current)} requests in the window, fewer than monitor.min_rows={cfg.min_rows}"
        return DriftResult(family, "skipped", reason, len(current), len(reference)), None
    if len(reference) == 0:
        return DriftResult(family, "skipped", "the reference table is empty", len(current), 0), None
    ref = prepare(reference, numerical, categorical, cfg.max_rows, cfg.seed)
    cur = prepare(current, numerical, categorical, cfg.max_rows, cfg.seed)
    definition = DataDefinition(numerical_columns=list(numerical), categorical_columns=list(categorical))
    snapshot = Report([DataDriftPreset(drift_share=cfg.drift_share, threshold=cfg.stattest_threshold)]).run(
        current_data=Dataset.from_pandas(cur, data_definition=definition),
        reference_data=Dataset.from_pandas(ref, data_definition=definition),
    )
    features, share = [], 0.0
    for metric in snapshot.dict()["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith("DriftedColumnsCount"):
            share = float(metric["value"]["share"])
        elif config.get("type", "").endswith("ValueDrift"):
            method, score, threshold = config["method"], float(metric["value"]), float(config["threshold"])
            # p-value tests drift when the p-value is below the threshold; distances when above it.
            drifted = score < threshold if "p_value" in method else score >= threshold
            features.append({"feature": config["column"], "method": method, "score": score, "threshold": threshold,
                             "drifted": drifted})  # fmt: skip
    decision = "drift" if share >= cfg.drift_share else "no drift"
    reason = f"{share:.0%} of {len(features)} features drifted (threshold {cfg.drift_share:.0%})"
    return DriftResult(family, decision, reason, len(current), len(reference), share, features), snapshot


def check_drift(
    cfg: DriftConfig, log_dir: Path, reference_dir: Path, out_dir: Path, now: datetime | None = None
) -> tuple[Path, dict[str, DriftResult]]:
    """Run every family's check over the window ending now; write reports and `decision.json`."""
    import pandas as pd

    now = now or datetime.now(UTC)
    since = now - timedelta(hours=cfg.window_hours)
    report_dir = out_dir / now.strftime("%Y%m%dT%H%M%S%fZ")
    report_dir.mkdir(parents=True, exist_ok=False)
    results: dict[str, DriftResult] = {}
    for family, (endpoint, _, _) in FAMILIES.items():
        reference_path = reference_dir / f"{family}.parquet"
        if not reference_path.is_file():
            raise DataError(f"missing drift reference {reference_path}: run the features stage first")
        # Every clean row (all splits): the data the model was built from, including sources outside the
        # training words, so the out-of-vocabulary share has a real reference distribution.
        reference = pd.read_parquet(reference_path)
        result, snapshot = build_drift_report(family, reference, read_window(log_dir, endpoint, since), cfg)
        if snapshot is not None:
            snapshot.save_html(str(report_dir / f"{family}.html"))
            snapshot.save_json(str(report_dir / f"{family}.json"))
        results[family] = result
        log.info("%s: %s (%s)", family, result.decision, result.reason)
    summary = {
        "window": {"from": since.isoformat(), "to": now.isoformat()},
        "drift": any(r.decision == "drift" for r in results.values()),
        "families": {name: r.as_dict() for name, r in results.items()},
        "service": service_health(log_dir, since),
    }
    write_json(summary, report_dir / "decision.json")
    return report_dir, results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.drift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("log", type=Path, help="request log folder (monitoring/logs)")
    parser.add_argument("reference", type=Path, help="drift reference tables (data/features/reference)")
    parser.add_argument("--out", type=Path, default=Path("monitoring/reports"))
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        report_dir, results = check_drift(
            DriftConfig.from_params(load_params("monitor", args.params)), args.log, args.reference, args.out
        )
        print(f"{report_dir}: " + ", ".join(f"{k} {v.decision}" for k, v in results.items()))

    run_main(body)


if __name__ == "__main__":
    main()
