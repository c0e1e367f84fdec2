"""The one gate every retrain goes through, whoever asks: a lock, a cooldown and a state record, on plain files.

The weekly schedule, a drift trigger and a manual `python -m flows.monitoring --retrain` all call the same
`retrain` flow, which claims this gate first. A second request while a retrain runs is refused with the
holder named (not queued: the running retrain already uses the newest data it could see), and a request
within `cooldown` of the last started retrain is refused too (a manual request may skip the cooldown,
never the lock). The gate holds an exclusive `flock` on `retrain.lock` for as long as the retrain runs; the
lock dies with its process, so a crashed retrain never blocks the next one. `state.json` keeps the last
started retrain (time, trigger, experiment) and their history; `requests.jsonl` gets one line per request,
started or refused, with the answer. Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from components.common import write_json


@dataclass(frozen=True)
class GateDecision:
    start: bool
    reason: str


class RetrainGate:
    def __init__(self, folder: Path, cooldown: timedelta) -> None:
        self.folder = folder
        self.cooldown = cooldown
        self.state_path = folder / "state.json"
        self.lock_path = folder / "retrain.lock"

    @classmethod
    def from_params(cls, root: Path) -> RetrainGate:
        """The repository's gate: params.yaml's `monitor.retrain_dir` and `monitor.cooldown_hours`."""
        from components.common import load_params, require

        monitor = load_params("monitor", root / "params.yaml")
        hours = require(monitor, "cooldown_hours", (int, float), "monitor", low=0)
        return cls(root / require(monitor, "retrain_dir", str, "monitor"), timedelta(hours=hours))

    @contextlib.contextmanager
    def held(self, holder: str) -> Iterator[bool]:
        """The lock alone, without a retrain or the cooldown: for work that must not overlap a retrain (an A/B
        decision applying an experiment to the workspace). Yields whether the lock was free."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()}, {holder}")
                lock.flush()
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    def _answer(self, trigger: str, experiment: str, now: datetime, decision: GateDecision) -> GateDecision:
        """Append the request and its answer to requests.jsonl (O_APPEND: whole lines, even when refused
        requesters write beside the holder) and return the decision."""
        line = json.dumps({"at": now.isoformat(), "trigger": trigger, "experiment": experiment,
                           "started": decision.start, "reason": decision.reason})  # fmt: skip
        with (self.folder / "requests.jsonl").open("a", encoding="utf-8") as requests:
            requests.write(line + "\n")
        return decision

    def requests(self) -> list[dict[str, Any]]:
        path = self.folder / "requests.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    @contextlib.contextmanager
    def claim(
        self, trigger: str, experiment: str, now: datetime | None = None, ignore_cooldown: bool = False,
        refuse: str | None = None,
    ) -> Iterator[GateDecision]:  # fmt: skip
        """Yield whether this request may retrain; when it may, the lock is held until the block exits.

        Refused: while another retrain holds the lock, or within `cooldown` of the last started retrain
        (unless `ignore_cooldown`), or for the caller's own reason `refuse` (recorded like the others, and
        without spending the cooldown). `trigger` says who asked: `schedule`, `manual`, or a drift report.
        """
        now = now or datetime.now(UTC)
        self.folder.mkdir(parents=True, exist_ok=True)
        if refuse is not None:
            yield self._answer(trigger, experiment, now, GateDecision(False, f"refused: {refuse}"))
            return
        with self.lock_path.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                refused = GateDecision(False, f"refused: a retrain is already running ({holder})")
                yield self._answer(trigger, experiment, now, refused)
                return
            try:
                last = self.state().get("last_triggered")
                if last is not None and not ignore_cooldown:
                    last_time = datetime.fromisoformat(last["at"])
                    if now - last_time < self.cooldown:
                        until = (last_time + self.cooldown).isoformat()
                        reason = f"cooldown: retrain {last['experiment']} started at {last['at']}; next allowed after {until}"
                        yield self._answer(trigger, experiment, now, GateDecision(False, reason))
                        return
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()}, experiment {experiment}, trigger {trigger}, since {now.isoformat()}")
                lock.flush()
                history = self.state().get("history", [])
                entry = {"at": now.isoformat(), "trigger": trigger, "experiment": experiment}
                write_json({"last_triggered": entry, "history": [*history, entry]}, self.state_path)
                yield self._answer(trigger, experiment, now, GateDecision(True, f"retrain {experiment} started ({trigger})"))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
