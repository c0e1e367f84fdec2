"""The scheduled A/B decision: nothing when no test runs; a clear winner is promoted, unattended."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from flows.monitoring import ab_decision
from serving.promoted import FAMILIES, challenge, challenger, current, promote
from tests.monitoring.test_ab import T0, write_logs


def test_the_scheduled_decision_promotes_a_clear_winner_and_does_nothing_without_a_test(tmp_path: Path) -> None:
    params = {
        "monitor": {"log_dir": "logs", "retrain_dir": "retrain", "cooldown_hours": 24},
        "promotion": {"record": "promoted.json"},
        "ab": {"metric": "click", "min_feedback": 50, "share": 0.5, "mode": "split", "reports_dir": "ab"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    record = tmp_path / "promoted.json"
    promote(record, {f: f"aigc-{f}:v1" for f in FAMILIES}, None, "tests", "first")
    assert ab_decision(str(tmp_path)) is None

    winner = {f: f"aigc-{f}:c1" for f in FAMILIES}
    challenge(record, winner, "aigc-pipeline:c1", 0.5, "split", "tests", "try c1")
    events = json.loads(record.read_text())["events"]
    events[-1]["at"] = T0.isoformat()  # the synthetic log starts at T0
    record.write_text(json.dumps({"events": events}))
    rng = np.random.default_rng(1)
    write_logs(tmp_path / "logs", {"champion": list(rng.random(300) < 0.05), "challenger": list(rng.random(300) < 0.3)})
    report = ab_decision(str(tmp_path))
    assert report["comparison"]["decision"] == "challenger better" and report["action"].startswith("promoted")
    assert current(record)["models"] == winner and current(record)["bento"] == "aigc-pipeline:c1" and challenger(record) is None
    assert Path(report["report_path"]).is_file()
