"""The online A/B report: per variant, requests, feedback and the outcome with a 95 % interval, and a decision.

    python -m monitoring.ab                 # report on the running A/B test (params.yaml's `ab`)
    python -m monitoring.ab --decide        # ... and act: promote a better challenger, end a worse one's test

A promoted challenger is published to the shared model store as its champion (params `package.export_to`,
monitoring/promote.py `publish_champion`).

The test is the promotion record's running `challenge` (serving/promoted.py: started by hand with
`python -m monitoring.promote --challenger`, or by a retrain when `promotion.require_online` is on). Requests
come from the request log (their `variant`), outcomes from `POST /feedback` rows beside it, both since the
challenger first answered (the service loads it at its next start). The outcome is `ab.metric`: `click`
(click-through: the share of answered requests that were clicked; clients report clicks only), `accept`
(accepted rather than rejected, over the requests with that feedback) or `rating` (mean 1-5), each request
counting once (its last feedback). Requests are taken as independent: when a few clients send most of
them, the intervals are too narrow, so let a test reach many clients before deciding. Per variant the
interval is scipy's: Wilson's for a share (`binomtest(...).proportion_ci`), Student's t for a mean rating.
The decision compares the two with Welch's t interval of the difference (challenger − champion,
`scipy.stats.ttest_ind(..., equal_var=False).confidence_interval()`): `challenger better` when it lies
above 0, `challenger worse` when below, `not yet known` while it spans 0 or either variant has fewer than
`ab.min_feedback` outcomes. In shadow mode nobody sees the challenger's answers, so there is no outcome to
compare; the report gives each variant's latency and error rate, and the decision stays `not yet known`.
Reports go to `<ab.reports_dir>/<UTC time>/report.json`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.common import EX_TEMPFAIL, ConfigError, TransientError, load_params, require, write_json
from serving.promoted import CHALLENGER, CHAMPION, SHADOW, SPLIT

log = logging.getLogger(__name__)
METRICS = ("click", "accept", "rating")
SHARES = ("click", "accept")  # binary outcomes; rating is a mean
BETTER, WORSE, UNKNOWN = "challenger better", "challenger worse", "not yet known"


@dataclass(frozen=True)
class ABConfig:
    metric: str
    min_feedback: int
    share: float
    mode: str
    reports_dir: Path  # relative to the repo root

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ABConfig:
        metric = require(params, "metric", str, "ab")
        if metric not in METRICS:
            raise ConfigError(f"params key 'ab.metric' must be one of {METRICS}, got {metric!r}")
        mode = require(params, "mode", str, "ab")
        if mode not in (SPLIT, SHADOW):
            raise ConfigError(f"params key 'ab.mode' must be {SPLIT} or {SHADOW}, got {mode!r}")
        return cls(
            metric=metric,
            min_feedback=require(params, "min_feedback", int, "ab", low=2),
            share=float(require(params, "share", (int, float), "ab", low=0, high=1)),
            mode=mode,
            reports_dir=Path(require(params, "reports_dir", str, "ab")),
        )


def interval(values: np.ndarray, metric: str) -> tuple[float, float]:
    """95 % interval of one variant's outcome: Wilson's for a share, Student's t for a mean."""
    from scipy import stats

    if len(values) < 2:
        return float("nan"), float("nan")
    if metric in SHARES:
        ci = stats.binomtest(int(values.sum()), len(values)).proportion_ci(confidence_level=0.95, method="wilson")
    else:
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(confidence_level=0.95)
    return float(ci.low), float(ci.high)


def compare(champion: np.ndarray, challenger: np.ndarray, min_feedback: int) -> dict[str, Any]:
    """Welch's t interval of challenger − champion, and what it says."""
    from scipy import stats

    if min(len(champion), len(challenger)) < min_feedback:
        reason = f"{len(champion)} and {len(challenger)} outcomes; at least ab.min_feedback={min_feedback} each are needed"
        return {"difference": None, "ci_low": None, "ci_high": None, "p_value": None, "decision": UNKNOWN, "reason": reason}
    test = stats.ttest_ind(challenger, champion, equal_var=False)
    ci = test.confidence_interval(confidence_level=0.95)
    low, high = float(ci.low), float(ci.high)
    decision = BETTER if low > 0 else WORSE if high < 0 else UNKNOWN
    difference = float(challenger.mean() - champion.mean())
    reason = f"challenger − champion {difference:+.4g} (95% CI {low:+.4g} … {high:+.4g})"
    return {"difference": difference, "ci_low": low, "ci_high": high, "p_value": float(test.pvalue), "decision": decision,
            "reason": reason}  # fmt: skip


def outcomes(feedback: Any, answered: set[str], metric: str) -> np.ndarray:
    """One outcome per request. Click-through counts every answered request (clicked or not: a client only
    reports clicks); accept and rating count the requests that got that feedback, by their last word."""
    if metric == "click":
        clicked = set(feedback[feedback["click"].eq(True)]["request_id"]) if len(feedback) else set()
        return np.array([1.0 if request_id in clicked else 0.0 for request_id in sorted(answered)])
    if not len(feedback):
        return np.array([])
    given = feedback[feedback[metric].notna() & feedback["request_id"].isin(answered)].sort_values("timestamp")
    return given.groupby("request_id")[metric].last().astype(float).to_numpy()


def read_feedback(log_dir: Path, since: datetime) -> Any:
    import pandas as pd

    parts = sorted(log_dir.glob("feedback-*.parquet")) if log_dir.is_dir() else []
    if not parts:
        return pd.DataFrame(columns=["timestamp", "request_id", "variant", *METRICS])
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return frame[frame["timestamp"] >= since]


def ab_report(log_dir: Path, ab: dict[str, Any], cfg: ABConfig) -> dict[str, Any]:
    """The report of the A/B test `ab` (the record's challenge event) over the logs in log_dir, from the
    challenger's first answer on (the service only loads it at its next start after the test began)."""
    import pandas as pd

    from monitoring.drift import read_window

    requests = read_window(log_dir, None, datetime.fromisoformat(ab["at"]), answered_only=False)
    if "variant" not in requests:  # no log yet, or only parts written before A/B tests: nothing to report on
        requests = pd.DataFrame(columns=["timestamp", "request_id", "status", "variant", "latency_ms"])
    tried = requests[requests["variant"].isin([CHALLENGER, SHADOW])]
    requests = requests[requests["timestamp"] >= tried["timestamp"].min()] if len(tried) else requests.iloc[0:0]
    since = requests["timestamp"].min() if len(requests) else datetime.fromisoformat(ab["at"])
    feedback = read_feedback(log_dir, since)
    variants: dict[str, Any] = {}
    values: dict[str, np.ndarray] = {}
    for variant in (CHAMPION, CHALLENGER, SHADOW):
        rows = requests[requests["variant"] == variant]
        if variant == SHADOW and rows.empty:
            continue
        answered = set(rows[rows["status"] == 200]["request_id"])
        got = outcomes(feedback, answered, cfg.metric)
        values[variant] = got
        low, high = interval(got, cfg.metric)
        with_feedback = set(feedback["request_id"]) & answered if len(feedback) else set()
        variants[variant] = {
            "requests": int(len(rows)),
            "error_rate": round(float((rows["status"] >= 400).mean()), 4) if len(rows) else None,
            "latency_ms_p50": round(float(rows["latency_ms"].quantile(0.5)), 1) if len(rows) else None,
            "feedback_rate": round(len(with_feedback) / len(answered), 4) if answered else None,
            "outcomes": int(len(got)),
            cfg.metric: round(float(got.mean()), 4) if len(got) else None,
            "ci_low": low,
            "ci_high": high,
        }
    comparison = compare(values.get(CHAMPION, np.array([])), values.get(CHALLENGER, np.array([])), cfg.min_feedback)
    if ab["mode"] != SPLIT:
        comparison.update(decision=UNKNOWN, reason="shadow mode: nobody sees the challenger's answers, so no outcome to compare")
    return {
        "at": datetime.now(UTC).isoformat(),
        "since": str(since),
        "mode": ab["mode"],
        "share": ab["share"],
        "metric": cfg.metric,
        "challenger": ab["models"],
        "compressed": ab.get("compressed"),
        "compression_test": bool(ab.get("compression_test")),
        "bento": ab.get("bento"),
        "experiment": ab.get("experiment"),
        "variants": variants,
        "comparison": comparison,
    }


def act(root: Path, record: Path, report: dict[str, Any], by: str) -> str:
    """Promote a better challenger (applying its experiment first, when it has one) and publish it to the shared
    model store (params `package.export_to`, if set); end a worse one's test."""
    from monitoring.promote import apply_experiment, publish_champion, shared_store
    from serving.promoted import end_ab, promote

    decision = report["comparison"]["decision"]
    if decision == BETTER and report.get("compression_test"):  # the champion's own copies: nothing to promote
        why = f"online A/B: the compressed copies {report['comparison']['reason']} on {report['metric']}"
        end_ab(record, by, why)
        return f"ended the A/B test ({why}): serve the compressed copies with AIGC_COMPRESSED=1"
    if decision == BETTER:
        shared_store(root)  # its params checked before anything changes
        if report["experiment"]:  # the workspace follows, so the next offline comparison is against this champion
            apply_experiment(root, report["experiment"], {"models": report["challenger"]})
        why = f"online A/B: {report['comparison']['reason']} on {report['metric']}"
        promote(record, report["challenger"], report.get("bento"), by, why, report["experiment"], report.get("compressed"))
        dest = publish_champion(root, record)
        published = f", published to {dest}" if dest else ""
        return f"promoted the challenger ({why}){published}; restart the service to serve it"
    if decision == WORSE:
        end_ab(record, by, f"online A/B: {report['comparison']['reason']} on {report['metric']}")
        return "ended the A/B test: the challenger is worse; restart the service to stop serving it"
    return f"nothing to do: {report['comparison']['reason']}"


def check(root: Path, decide: bool, by: str) -> dict[str, Any] | None:
    """Report on the running A/B test (None when none runs) and, with `decide`, act on the decision while
    holding the retrain gate's lock; the report, its path (`report_path`) and the action (`action`)."""
    from monitoring.promote import record_path
    from monitoring.retrain_gate import RetrainGate
    from serving.promoted import challenger

    cfg = ABConfig.from_params(load_params("ab", root / "params.yaml"))
    record = record_path(root)
    ab = challenger(record)
    if ab is None:
        return None
    log_dir = root / require(load_params("monitor", root / "params.yaml"), "log_dir", str, "monitor")
    report = ab_report(log_dir, ab, cfg)
    out = root / cfg.reports_dir / datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") / "report.json"
    write_json(report, out)
    report.update(report_path=str(out), action=None)
    if decide:
        with RetrainGate.from_params(root).held("an A/B decision") as free:
            if not free:  # a promotion would change the workspace under the running retrain's comparison
                report["action"] = "deferred: a retrain is running; the next check decides"
            elif challenger(record) != ab:  # the test changed while this report was made: it speaks of another
                report["action"] = "deferred: the A/B test changed while the report was made"
            else:
                report["action"] = act(root, record, report, by)
    return report


def main(argv: list[str] | None = None) -> None:
    from monitoring.promote import who
    from serving.promoted import PromotionError

    parser = argparse.ArgumentParser(prog="python -m monitoring.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (params.yaml)")
    parser.add_argument("--decide", action="store_true", help="promote a better challenger, end a worse one's test")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        report = check(args.repo, args.decide, who())
        if report is None:
            raise PromotionError("no A/B test is running (start one: python -m monitoring.promote --challenger)")
        for variant, figures in report["variants"].items():
            print(f"{variant}: {figures}")
        print(f"{report['comparison']['decision']}: {report['comparison']['reason']} ({report['report_path']})")
        if report["action"]:
            print(report["action"])
    except (ConfigError, PromotionError) as err:
        print(f"monitoring.ab: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TransientError as err:  # the promotion is recorded; the shared model store could not be written
        print(f"monitoring.ab: {err}", file=sys.stderr)
        raise SystemExit(EX_TEMPFAIL) from None


if __name__ == "__main__":
    main()
