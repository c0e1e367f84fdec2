"""The monitoring loop's latest results as Prometheus metrics, pushed to a Pushgateway.

    python -m monitoring.loop_metrics            # print them (Prometheus text format)
    python -m monitoring.loop_metrics --push     # push them to params observability.pushgateway ($AIGC_PUSHGATEWAY)

The drift check, the retrain and the promotions run as Prefect flow runs and CLI calls: short-lived
processes, often on a worker box no scraper knows, gone before any scrape. That is the case the Pushgateway
exists for (a batch job's results, kept for Prometheus to scrape), so the loop pushes, rather than the
monitoring deployment serving an endpoint of its own. Each push carries the whole state, read from the files
the loop already writes, and replaces the previous one (one group, `job=<observability.job>`):

- the latest drift check (`monitor.reports_dir`'s newest `decision.json`): its time, and per family the
  share of drifted features, the decision, the rows in the window, and each feature's drift score;
- the retrain gate's state (`monitor.retrain_dir`): when the last retrain started, and how many have;
- the promotion record (`promotion.record`): when the champion last changed, its models, its headline
  metrics (the labels the `package` stage gave its models in BentoML's store), and whether an A/B test runs.

A missing file means that part is not published (nothing has happened yet); a failed push is one warning
line, never a failed flow: the loop's work is done and recorded on disk, and the next push carries it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from components.common import ConfigError, load_params, require

log = logging.getLogger(__name__)
PUSHGATEWAY_ENV = "AIGC_PUSHGATEWAY"
DRIFT_DECISIONS = {"no drift": 0, "drift": 1}  # a skipped family has no decision to publish


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _latest_decision(reports: Path) -> dict[str, Any] | None:
    checks = sorted(path for path in reports.glob("*/decision.json")) if reports.is_dir() else []
    return json.loads(checks[-1].read_text(encoding="utf-8")) if checks else None


def _headline_metrics(family: str, tag: str) -> dict[str, float]:
    """A model's headline metrics, from the labels `package` gave it in BentoML's store; none when this
    machine's store does not hold it (the loop runs where the models were packaged, as a rule)."""
    from components.metrics import HEADLINE

    try:
        import bentoml

        labels = bentoml.models.get(tag).info.labels or {}
    except Exception as err:  # NotFound, or no usable store here: the rest is still published
        log.debug("no labels for %s: %s", tag, err)
        return {}
    metrics = {}
    for key in HEADLINE.get(family, ()):
        try:
            metrics[key] = float(labels[key])
        except (KeyError, ValueError):  # absent, or not a number (the restorer's task)
            continue
    return metrics


class LoopCollector:
    """A prometheus_client collector reading the loop's files at collect time (no process-wide registry:
    the flows' process may be anything, a multiprocess BentoML worker included)."""

    def __init__(self, root: Path, record: Path | None = None) -> None:
        self.root = root
        params = root / "params.yaml"
        monitor = load_params("monitor", params)
        self.reports = root / require(monitor, "reports_dir", str, "monitor")
        self.retrain = root / require(monitor, "retrain_dir", str, "monitor")
        self.drift_share = float(require(monitor, "drift_share", (int, float), "monitor"))
        self.record = record or root / require(load_params("promotion", params), "record", str, "promotion")

    def collect(self) -> Iterator[Any]:
        yield from self._drift()
        yield from self._retrains()
        yield from self._champion()

    def _drift(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        decision = _latest_decision(self.reports)
        threshold = GaugeMetricFamily(
            "aigc_drift_share_threshold", "Share of drifted features that means drift (monitor.drift_share)"
        )
        threshold.add_metric([], self.drift_share)
        yield threshold
        if decision is None:
            return
        last = GaugeMetricFamily(
            "aigc_drift_check_last_success_timestamp_seconds", "When the last drift check that wrote its decision ran"
        )
        last.add_metric([], _timestamp(decision["window"]["to"]))
        share = GaugeMetricFamily("aigc_drift_share", "Share of a family's features that drifted", labels=["family"])
        detected = GaugeMetricFamily(
            "aigc_drift_detected", "1 when the family drifted, 0 when not (absent: skipped)", labels=["family"]
        )
        rows = GaugeMetricFamily("aigc_drift_window_rows", "Answered requests in the drift check's window", labels=["family"])
        score = GaugeMetricFamily(
            "aigc_drift_feature_score",
            "Per-feature drift score (the test's p-value or distance)",
            labels=["family", "feature", "method"],
        )
        drifted = GaugeMetricFamily("aigc_drift_feature_drifted", "1 when the feature drifted", labels=["family", "feature"])
        for family, result in decision["families"].items():
            rows.add_metric([family], result["rows"])
            if result["decision"] not in DRIFT_DECISIONS:
                continue
            detected.add_metric([family], DRIFT_DECISIONS[result["decision"]])
            share.add_metric([family], result["drifted_share"])
            for feature in result["features"]:
                score.add_metric([family, feature["feature"], feature["method"]], feature["score"])
                drifted.add_metric([family, feature["feature"]], float(feature["drifted"]))
        yield from (last, share, detected, rows, score, drifted)

    def _retrains(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state_path = self.retrain / "state.json"
        if not state_path.is_file():
            return
        state = json.loads(state_path.read_text(encoding="utf-8"))
        last = GaugeMetricFamily(
            "aigc_last_retrain_timestamp_seconds", "When the last retrain started (the retrain gate's state)"
        )
        started = GaugeMetricFamily("aigc_retrains_started", "Retrains the gate has let start")
        if state.get("last_triggered"):
            last.add_metric([], _timestamp(state["last_triggered"]["at"]))
            yield last
        started.add_metric([], len(state.get("history", [])))
        yield started

    def _champion(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from serving.promoted import CHALLENGE, END_AB, champions, running_ab
        from serving.promoted import read_events as promotion_events

        events = promotion_events(self.record)
        changes = [e for e in events if e["action"] not in (CHALLENGE, END_AB)]
        if not changes:
            return
        last = GaugeMetricFamily(
            "aigc_last_promotion_timestamp_seconds", "When the champion last changed (a promotion or a rollback)"
        )
        last.add_metric([], _timestamp(changes[-1]["at"]))
        count = GaugeMetricFamily("aigc_champion_changes", "Promotions and rollbacks in the promotion record")
        count.add_metric([], len(changes))
        ab = GaugeMetricFamily("aigc_ab_test_running", "1 while an online A/B test runs")
        ab.add_metric([], float(running_ab(events) is not None))
        yield from (last, count, ab)
        stack = champions(events)
        if not stack:
            return
        champion = stack[-1]
        info = GaugeMetricFamily("aigc_champion_info", "The promoted champion's models", labels=["family", "tag", "bento"])
        metric = GaugeMetricFamily(
            "aigc_champion_metric", "The champion's headline evaluation metrics", labels=["family", "metric"]
        )
        for family, tag in champion["models"].items():
            info.add_metric([family, tag, champion.get("bento") or ""], 1)
            for key, value in _headline_metrics(family, tag).items():
                metric.add_metric([family, key], value)
        yield from (info, metric)


def registry(root: Path, record: Path | None = None) -> Any:
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry(auto_describe=True)
    reg.register(LoopCollector(root, record))
    return reg


def pushgateway(root: Path) -> tuple[str | None, str]:
    """(the Pushgateway's address, the job name): $AIGC_PUSHGATEWAY, else params `observability.pushgateway`;
    a params.yaml older than the section pushes nowhere unless the environment says where."""
    import yaml

    raw = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    section = load_params("observability", root / "params.yaml") if "observability" in raw else {"job": "aigc_loop"}
    job = require(section, "job", str, "observability")
    url = os.environ.get(PUSHGATEWAY_ENV) or section.get("pushgateway")
    if url is not None and not isinstance(url, str):
        raise ConfigError(f"params key 'observability.pushgateway' must be an address (http://host:9091) or null, got {url!r}")
    return url or None, job


def publish(root: Path, record: Path | None = None) -> tuple[int, str]:
    """Push the loop's latest results (`record`: a promotion record other than params'); returns a logging
    level and one line saying what happened, for the caller's log. Never raises: a bad setting, an unreadable
    file or an unreachable Pushgateway is a warning, since the loop's own work is already done and recorded."""
    from prometheus_client import push_to_gateway

    try:
        url, job = pushgateway(root)
        if url is None:
            return logging.INFO, "loop metrics not pushed: params observability.pushgateway is null and $AIGC_PUSHGATEWAY unset"
        push_to_gateway(url, job=job, registry=registry(root, record), timeout=10)
    except Exception as err:  # ConfigError, a damaged state file, or the network
        return logging.WARNING, f"loop metrics not pushed ({type(err).__name__}: {err}); they go with the next push"
    return logging.INFO, f"loop metrics pushed to {url} (job {job})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.loop_metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (params.yaml)")
    parser.add_argument("--push", action="store_true", help="push to the Pushgateway instead of printing")
    args = parser.parse_args(argv)
    from components.common import run_main

    def body() -> None:
        if args.push:
            level, line = publish(args.repo)
            print(line)
            if level != logging.INFO or not line.startswith("loop metrics pushed"):
                raise SystemExit(1)
            return
        from prometheus_client import generate_latest

        print(generate_latest(registry(args.repo)).decode(), end="")

    run_main(body)


if __name__ == "__main__":
    main()
