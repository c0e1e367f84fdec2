"""Stage `validate`: Great Expectations suites over the raw datasets; failing rows go to quarantine.

For each dataset, every row ends in exactly one of `<valid>/<name>.parquet` or `<quarantine>/<name>.parquet`
(the latter with the failed expectations of that row). The stage writes a JSON report and GE data docs,
then fails only when a dataset's quarantined share exceeds `validate.max_quarantine_ratio`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.common import (
    DATASETS,
    SPLITS,
    ConfigError,
    DataError,
    load_params,
    progress,
    require,
    run_main,
    write_json,
)
from components.records import parse_source
from components.tables import ParquetSink, distinct, iter_parquet, row_digests

if TYPE_CHECKING:
    import great_expectations as gx

log = logging.getLogger(__name__)

QUARANTINE_FIELDS = [pa.field("failed_expectations", pa.string()), pa.field("quarantined_by", pa.string())]
IMAGE_BYTES_COLUMN = "image"


@dataclass(frozen=True)
class TextRules:
    min_source_chars: int
    max_source_chars: int
    min_reference_chars: int
    max_reference_chars: int
    allowed_attributes: tuple[str, ...] | None


@dataclass(frozen=True)
class ImageRules:
    min_size: int
    max_size: int
    channels: tuple[int, ...] | None
    modes: tuple[str, ...] | None
    labels: tuple[str, ...] | None


@dataclass(frozen=True)
class ValidateConfig:
    max_quarantine_ratio: float
    chunk_rows: int
    text: TextRules
    images: ImageRules
    restore: ImageRules

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ValidateConfig:
        ratio = require(params, "max_quarantine_ratio", (int, float), "validate", low=0.0, high=1.0)
        chunk_rows = require(params, "chunk_rows", int, "validate", low=1)
        text = require(params, "text", dict, "validate")
        bounds = {}
        for key in ("min_source_chars", "max_source_chars", "min_reference_chars", "max_reference_chars"):
            bounds[key] = require(text, key, int, "validate.text", low=0)
        for kind in ("source", "reference"):
            if bounds[f"min_{kind}_chars"] > bounds[f"max_{kind}_chars"]:
                raise ConfigError(f"params key 'validate.text.min_{kind}_chars' exceeds 'validate.text.max_{kind}_chars'")
        allowed = text.get("allowed_attributes")
        if allowed is not None and (not isinstance(allowed, list) or not all(isinstance(a, str) and a for a in allowed)):
            raise ConfigError(f"params key 'validate.text.allowed_attributes' must be a list of names or null, got {allowed!r}")
        return cls(
            max_quarantine_ratio=float(ratio),
            chunk_rows=chunk_rows,
            text=TextRules(**bounds, allowed_attributes=tuple(allowed) if allowed is not None else None),
            images=_image_rules(require(params, "images", dict, "validate"), "validate.images"),
            restore=_image_rules(require(params, "restore", dict, "validate"), "validate.restore"),
        )


CONFIG = ValidateConfig


def _image_rules(section: dict[str, Any], prefix: str) -> ImageRules:
    min_size = require(section, "min_size", int, prefix, low=1)
    max_size = require(section, "max_size", int, prefix, low=min_size)
    lists = {}
    for key in ("channels", "modes", "labels"):
        value = section.get(key)
        if value is not None and (not isinstance(value, list) or not value):
            raise ConfigError(f"params key '{prefix}.{key}' must be a non-empty list or null (any), got {value!r}")
        lists[key] = value
    return ImageRules(
        min_size,
        max_size,
        tuple(int(c) for c in lists["channels"]) if lists["channels"] is not None else None,
        tuple(str(m) for m in lists["modes"]) if lists["modes"] is not None else None,
        tuple(str(label) for label in lists["labels"]) if lists["labels"] is not None else None,
    )


ATTRIBUTE_CHECK_COLUMN = "source_attribute_problem"
"""A column computed for the text suite when `allowed_attributes` is set: null when the source is a record
(any syntax) whose keys are all allowed, else what is wrong with it."""


def attribute_problems(sources: Any, allowed: tuple[str, ...]) -> list[str | None]:
    allowed_set = frozenset(allowed)
    problems: list[str | None] = []
    for source in sources:
        record = parse_source(source) if isinstance(source, str) else None
        if record is None:
            problems.append("not a record")
            continue
        unknown = [key for key in record.keys() if key not in allowed_set]
        problems.append(f"unknown keys {unknown}" if unknown else None)
    return problems


def text_derived_columns(rules: TextRules) -> Callable[[Any], None] | None:
    """What adds the computed columns the text suite checks to a chunk's DataFrame (None: there are none)."""
    allowed = rules.allowed_attributes
    if allowed is None:
        return None
    return lambda frame: frame.insert(len(frame.columns), ATTRIBUTE_CHECK_COLUMN, attribute_problems(frame["source"], allowed))


def text_expectations(rules: TextRules) -> list[Any]:
    """The text suite: decodable, non-null, length bounds, no blank reference, allowed attribute keys."""
    import great_expectations as gx

    e = gx.expectations
    expectations = [
        e.ExpectColumnValuesToBeNull(column="ingest_error"),
        e.ExpectColumnValuesToNotBeNull(column="source"),
        e.ExpectColumnValuesToNotBeNull(column="reference"),
        e.ExpectColumnValueLengthsToBeBetween(
            column="source", min_value=rules.min_source_chars, max_value=rules.max_source_chars
        ),
        e.ExpectColumnValueLengthsToBeBetween(
            column="reference", min_value=rules.min_reference_chars, max_value=rules.max_reference_chars
        ),
        e.ExpectColumnValuesToNotMatchRegex(column="reference", regex=r"^\s*$"),
        e.ExpectColumnValuesToNotMatchRegex(column="source", regex=r"^\s*$"),
        e.ExpectColumnValuesToBeInSet(column="given_split", value_set=list(SPLITS)),  # null: no split given
    ]
    if rules.allowed_attributes is not None:
        expectations.append(e.ExpectColumnValuesToBeNull(column=ATTRIBUTE_CHECK_COLUMN))
    return expectations


def image_expectations(rules: ImageRules) -> list[Any]:
    """The image suite: decodable and inside the data folder, size bounds, channels, mode, known label."""
    import great_expectations as gx

    e = gx.expectations
    expectations = [
        e.ExpectColumnValuesToBeNull(column="ingest_error"),
        e.ExpectColumnValuesToBeBetween(column="width", min_value=rules.min_size, max_value=rules.max_size),
        e.ExpectColumnValuesToBeBetween(column="height", min_value=rules.min_size, max_value=rules.max_size),
    ]
    if rules.channels is not None:
        expectations.append(e.ExpectColumnValuesToBeInSet(column="channels", value_set=list(rules.channels)))
    if rules.modes is not None:
        expectations.append(e.ExpectColumnValuesToBeInSet(column="mode", value_set=list(rules.modes)))
    if rules.labels is not None:
        expectations.append(e.ExpectColumnValuesToNotBeNull(column="label"))
        expectations.append(e.ExpectColumnValuesToBeInSet(column="label", value_set=list(rules.labels)))
    return expectations


def expectation_name(config: Any) -> str:
    return f"{config.type}({config.kwargs.get('column', '')})"


@dataclass
class SuiteRunner:
    """One ephemeral GE context with a data docs site; runs a suite on a DataFrame and returns per-row failures."""

    docs_dir: Path
    context: Any = field(init=False)

    def __post_init__(self) -> None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.context.add_data_docs_site(
            site_name="local",
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir.resolve())},
            },
        )
        self._source = self.context.data_sources.add_pandas("pipeline")
        self._checkpoints: dict[str, Any] = {}

    def checkpoint(self, name: str, expectations: list[Any]) -> gx.Checkpoint:
        import great_expectations as gx

        if name not in self._checkpoints:
            batch = self._source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
            suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
            definition = self.context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
            self._checkpoints[name] = self.context.checkpoints.add(
                gx.Checkpoint(
                    name=name,
                    validation_definitions=[definition],
                    actions=[],  # data docs are built once at the end: rebuilding per chunk is quadratic
                    result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]},
                )
            )
        return self._checkpoints[name]

    def build_docs(self) -> Path:
        """Render the GE data docs site (expectation suites and every validation run); return its index."""
        self.context.build_data_docs(site_names=["local"])
        return self.docs_dir / "index.html"

    def run(self, name: str, expectations: list[Any], frame: Any) -> tuple[dict[int, list[str]], dict[str, dict[str, int]]]:
        """Validate `frame` (which has a `_row` column); return failed expectations by row and per-expectation counts."""
        result = self.checkpoint(name, expectations).run(batch_parameters={"dataframe": frame})
        failures: dict[int, list[str]] = defaultdict(list)
        counts: dict[str, dict[str, int]] = {}
        for run in result.run_results.values():
            for outcome in run.results:
                label = expectation_name(outcome.expectation_config)
                if outcome.exception_info and outcome.exception_info.get("raised_exception"):
                    raise DataError(
                        f"{name}: expectation {label} could not run: {outcome.exception_info.get('exception_message')}"
                    )
                unexpected = outcome.result.get("unexpected_index_list") or []
                counts[label] = {"unexpected": int(outcome.result.get("unexpected_count") or 0)}
                for item in unexpected:
                    failures[int(item["_row"])].append(label)
        return failures, counts


@dataclass
class DatasetReport:
    name: str
    rows_in: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    expectations: dict[str, int] = field(default_factory=dict)

    @property
    def quarantine_ratio(self) -> float:
        return self.rows_quarantined / self.rows_in if self.rows_in else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in,
            "rows_valid": self.rows_valid,
            "rows_quarantined": self.rows_quarantined,
            "quarantine_ratio": round(self.quarantine_ratio, 6),
            "failed_expectations": self.expectations,
        }


def repeatable_ids(raw: Path, chunk_rows: int) -> Any:
    """The `record_id`s (with their `_row`) whose 128-bit digest occurs more than once: every repeated id, and
    almost never another, so Great Expectations finds exactly the repeated ones while millions of unique ids
    never enter a DataFrame (they took 2 GB of the stage's 3 GB at 5 M rows)."""
    import pandas as pd

    digests = [row_digests([batch.column(0)]) for batch in iter_parquet(raw, chunk_rows, ["record_id"])]
    groups = distinct(np.concatenate(digests) if digests else np.zeros((0, 2), dtype=np.uint64))
    repeated = np.flatnonzero(np.bincount(groups.ids, minlength=groups.count)[groups.ids] > 1)
    del digests, groups
    ids, offset = [], 0
    for batch in iter_parquet(raw, chunk_rows, ["record_id"]):
        rows = repeated[(repeated >= offset) & (repeated < offset + batch.num_rows)]
        ids += batch.column(0).take(pa.array(rows - offset)).to_pylist()
        offset += batch.num_rows
    return pd.DataFrame({"record_id": pd.Series(ids, dtype=object), "_row": repeated.astype(np.int64)})


def validate_dataset(
    name: str, raw: Path, expectations: list[Any], runner: SuiteRunner, valid_out: Path, quarantine_out: Path, chunk_rows: int,
    derive: Callable[[Any], None] | None = None,
) -> DatasetReport:  # fmt: skip
    """Validate one raw Parquet file chunk by chunk; split its rows between valid and quarantine files.

    Uniqueness of `record_id` needs every row at once, so it runs first, on the rows whose id can repeat (see
    repeatable_ids); the row-wise suite then streams over chunks, keeping memory flat for inputs larger than
    memory.
    """
    import great_expectations as gx

    schema = pq.read_schema(raw)
    report = DatasetReport(name)
    ids = repeatable_ids(raw, chunk_rows)
    id_failures, id_counts = runner.run(f"{name}_ids", [gx.expectations.ExpectColumnValuesToBeUnique(column="record_id")], ids)
    del ids
    merge_counts(report.expectations, id_counts)

    quarantine_schema = schema
    for extra in QUARANTINE_FIELDS:
        quarantine_schema = quarantine_schema.append(extra)
    offset = 0
    with ParquetSink(valid_out, schema) as valid, ParquetSink(quarantine_out, quarantine_schema) as quarantine:
        for batch in progress(iter_parquet(raw, chunk_rows), desc=f"validate {name}", unit="chunk"):
            table = pa.Table.from_batches([batch])
            frame = table.drop_columns([c for c in [IMAGE_BYTES_COLUMN] if c in table.column_names]).to_pandas()
            frame["_row"] = np.arange(offset, offset + table.num_rows)
            if derive is not None:
                derive(frame)  # columns the suite checks that are not stored
            failures, counts = runner.run(name, expectations, frame)
            merge_counts(report.expectations, counts)
            for row in range(offset, offset + table.num_rows):
                if row in id_failures:
                    failures[row].extend(id_failures[row])
            failed = np.zeros(table.num_rows, dtype=bool)
            reasons: list[str | None] = [None] * table.num_rows
            for row, labels in failures.items():
                failed[row - offset] = True
                reasons[row - offset] = "; ".join(dict.fromkeys(labels))
            mask = pa.array(failed)
            valid.write(table.filter(pc.invert(mask)))
            bad = table.filter(mask)
            bad = bad.append_column("failed_expectations", pa.array([r for r in reasons if r is not None], pa.string()))
            bad = bad.append_column("quarantined_by", pa.array(["validate"] * bad.num_rows, pa.string()))
            quarantine.write(bad)
            offset += table.num_rows
    report.rows_in = offset
    report.rows_valid = valid.rows
    report.rows_quarantined = quarantine.rows
    assert report.rows_in == report.rows_valid + report.rows_quarantined, "validate lost rows"
    return report


def merge_counts(total: dict[str, int], counts: dict[str, dict[str, int]]) -> None:
    for label, count in counts.items():
        total[label] = total.get(label, 0) + count["unexpected"]


def validate(
    cfg: ValidateConfig, raw_dir: Path, valid_dir: Path, report_dir: Path, quarantine_dir: Path, docs_dir: Path | None = None
) -> dict[str, DatasetReport]:
    """Validate all datasets, write the report, then fail if any dataset quarantined too much.

    The data docs (`docs_dir`, default `<report_dir>/docs`) carry run times and time-stamped folders, so a
    pipeline keeps them outside its hashed outputs; they are rebuilt from scratch on every run.
    """
    docs_dir = docs_dir if docs_dir is not None else report_dir / "docs"
    shutil.rmtree(docs_dir, ignore_errors=True)  # only this run's validations, not an earlier run's pages
    runner = SuiteRunner(docs_dir)
    suites = {
        "text": text_expectations(cfg.text),
        "images": image_expectations(cfg.images),
        "restore": image_expectations(cfg.restore),
    }
    derive = {"text": text_derived_columns(cfg.text)}
    reports = {}
    for name in DATASETS:
        raw = raw_dir / f"{name}.parquet"
        if not raw.is_file():
            raise DataError(f"missing input {raw}: run the ingest stage first")
        reports[name] = validate_dataset(
            name, raw, suites[name], runner, valid_dir / f"{name}.parquet", quarantine_dir / f"{name}.parquet", cfg.chunk_rows,
            derive.get(name),
        )  # fmt: skip
        log.info(
            "%s: %d rows in, %d valid, %d quarantined",
            name,
            reports[name].rows_in,
            reports[name].rows_valid,
            reports[name].rows_quarantined,
        )
    docs = runner.build_docs()
    write_json(
        {
            "max_quarantine_ratio": cfg.max_quarantine_ratio,
            "datasets": {name: r.as_dict() for name, r in reports.items()},
            "data_docs": docs.as_posix(),
        },
        report_dir / "report.json",
    )
    too_many = [r for r in reports.values() if r.quarantine_ratio > cfg.max_quarantine_ratio]
    if too_many:
        lines = []
        for r in too_many:
            worst = ", ".join(
                f"{label}: {count} rows" for label, count in sorted(r.expectations.items(), key=lambda kv: -kv[1]) if count
            )
            lines.append(
                f"{r.name}: {r.rows_quarantined} of {r.rows_in} rows quarantined "
                f"({r.quarantine_ratio:.1%} > validate.max_quarantine_ratio={cfg.max_quarantine_ratio:.1%}); "
                f"failed expectations: {worst}"
            )
        raise DataError("too much data quarantined; see " + str(quarantine_dir) + "\n  " + "\n  ".join(lines))
    return reports


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m components.validate", description=__doc__)
    parser.add_argument("raw", type=Path, help="ingested data folder (data/raw)")
    parser.add_argument("--valid", type=Path, required=True, help="output folder for rows that pass")
    parser.add_argument("--report", type=Path, required=True, help="output folder for report.json")
    parser.add_argument("--docs", type=Path, default=None, help="output folder for the GE data docs (default: <report>/docs)")
    parser.add_argument("--quarantine", type=Path, required=True, help="output folder for failing rows")
    parser.add_argument("--params", default="params.yaml")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(
        lambda: validate(
            ValidateConfig.from_params(load_params("validate", args.params)),
            args.raw,
            args.valid,
            args.report,
            args.quarantine,
            args.docs,
        )  # fmt: skip
    )


if __name__ == "__main__":
    main()
