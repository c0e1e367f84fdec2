"""Who may start a drift-triggered retrain, and when: a cooldown and a lock, on plain files.

A storm of drifted windows must cause one retrain, and two triggers must never retrain at once. The gate
keeps `state.json` (the last triggered retrain: time, drift report, experiment name) and holds an exclusive
`flock` on `retrain.lock` for as long as a retrain runs; the lock dies with its process, so a crashed
retrain never blocks the next one. Only the standard library is used.
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

    def state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {}
        return json.loads(self.state_path.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def claim(self, report: str, experiment: str, now: datetime | None = None) -> Iterator[GateDecision]:
        """Yield whether this trigger may retrain; when it may, the lock is held until the block exits.

        Refused: while another retrain holds the lock, or within `cooldown` of the last triggered retrain.
        """
        now = now or datetime.now(UTC)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "another process"
                yield GateDecision(False, f"refused: a retrain is already running ({holder})")
                return
            try:
                last = self.state().get("last_triggered")
                if last is not None:
                    last_time = datetime.fromisoformat(last["at"])
                    if now - last_time < self.cooldown:
                        until = (last_time + self.cooldown).isoformat()
                        yield GateDecision(
                            False, f"cooldown: retrain {last['experiment']} started at {last['at']}; next allowed after {until}"
                        )
                        return
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()}, experiment {experiment}, since {now.isoformat()}")
                lock.flush()
                history = self.state().get("history", [])
                entry = {"at": now.isoformat(), "report": report, "experiment": experiment}
                write_json({"last_triggered": entry, "history": [*history, entry]}, self.state_path)
                yield GateDecision(True, f"retrain {experiment} triggered by {report}")
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
