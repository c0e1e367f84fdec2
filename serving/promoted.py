"""What the service serves: the promotion record, one small JSON file naming the champion and its history.

Promotion is a pointer, never a side effect. The `package` stage, in the workspace or inside a retrain
experiment, only adds content-addressed entries to the model store and builds a Bento pinned to them; no
entry is ever resolved as `:latest`. The service serves the model tags of the record's current champion,
and only `python -m monitoring.promote` (a person, or the retrain flow once the gate has said yes) writes
the record. Every change is an event (promote or rollback) with who, when and why; the champion is the top
of the stack the events build (a promotion pushes, a rollback pops), so `--rollback` always returns to the
champion before the current one.

An online A/B test is an event too: `challenge` names one challenger and the share of traffic it gets
(`split`), or `shadow` mode (it runs beside the champion and is logged, never returned). It lasts until
`end_ab`, a promotion or a rollback.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.common import ConfigError, locked, write_json

RECORD_ENV = "AIGC_PROMOTED"
"""The service's way to be told which record to read (default: params.yaml's `promotion.record`)."""
COMPRESSED_ENV = "AIGC_COMPRESSED"
"""`1`: the service serves the champion's compressed copies (the `compress` stage's) instead of its fp32 models."""
PROMOTE, ROLLBACK, CHALLENGE, END_AB = "promote", "rollback", "challenge", "end_ab"
SPLIT, SHADOW = "split", "shadow"
CHAMPION, CHALLENGER = "champion", "challenger"
"""The variants a request can be answered by (a shadow answer is logged with variant SHADOW)."""
FAMILIES = ("text", "image", "restore", "diffusion")
"""The served model families (the `package` stage's model folders, in its command's order). `image` is the GAN
and `diffusion` the diffusion model: `generate_image` serves either (serving/service.py)."""
OPTIONAL_FAMILIES = ("diffusion",)
"""Families a champion may lack: one promoted before diffusion models were packaged serves the GAN alone."""


class PromotionError(ValueError):
    """The record cannot be read or the asked change cannot be made; the message says what to do."""


def read_events(record: Path) -> list[dict[str, Any]]:
    """The record's events, oldest first; none when the file does not exist yet."""
    if not record.is_file():
        return []
    try:
        events = json.loads(record.read_text(encoding="utf-8"))["events"]
    except (ValueError, KeyError, TypeError) as err:
        raise PromotionError(f"{record}: not a promotion record ({err}); restore it from git or its backup") from None
    actions = (PROMOTE, ROLLBACK, CHALLENGE, END_AB)
    if not isinstance(events, list) or not all(isinstance(e, dict) and e.get("action") in actions for e in events):
        raise PromotionError(f"{record}: its events are not promote / rollback / A/B entries; restore it from git or its backup")
    return events


def champions(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stack of champions the events leave, the current one last."""
    stack: list[dict[str, Any]] = []
    for event in events:
        if event["action"] == PROMOTE:
            stack.append(event)
        elif event["action"] == ROLLBACK and stack:
            stack.pop()
    return stack


def running_ab(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The challenge event of the A/B test running now, or None: a challenge lasts until `end_ab`, a
    promotion or a rollback."""
    running = None
    for event in events:
        running = event if event["action"] == CHALLENGE else None
    return running


def challenger(record: Path) -> dict[str, Any] | None:
    """The running A/B test (challenger models, share, mode, who, when, why), or None."""
    return running_ab(read_events(record))


def current(record: Path) -> dict[str, Any] | None:
    """The current champion's promote event (model tags, Bento, experiment, who, when, why), or None."""
    stack = champions(read_events(record))
    return stack[-1] if stack else None


@contextlib.contextmanager
def _locked(record: Path) -> Iterator[list[dict[str, Any]]]:
    """The record's events, under an exclusive lock for the whole read-modify-write (a person's rollback and
    the retrain flow's promotion never lose each other's event)."""
    with locked(record):
        yield read_events(record)


def _write(record: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
    stack = champions(events)
    write_json({"current": stack[-1] if stack else None, "ab": running_ab(events), "events": events}, record)
    return events[-1]


def challenge(
    record: Path, models: dict[str, str], bento: str | None, share: float, mode: str, by: str, why: str,
    experiment: str | None = None, compressed: dict[str, str] | None = None, compression_test: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Start an A/B test of `models` against the champion (replacing a running one); returns the event.
    `compressed`: the challenger's compressed copies, which a promotion of it keeps. `compression_test`:
    `models` are the champion's own compressed copies, so a win says to serve them (AIGC_COMPRESSED=1),
    not to promote anything."""
    if mode not in (SPLIT, SHADOW) or not 0 <= share <= 1:
        raise PromotionError(f"A/B: mode must be {SPLIT} or {SHADOW} and share in [0, 1], got {mode} {share}")
    event = {
        "action": CHALLENGE, "at": datetime.now(UTC).isoformat(), "by": by, "why": why, "models": dict(models),
        "bento": bento, "experiment": experiment, "share": float(share), "mode": mode,
    }  # fmt: skip
    if compressed:
        event["compressed"] = dict(compressed)
    if compression_test:
        event["compression_test"] = True
    with _locked(record) as events:
        stack = champions(events)
        if not stack:
            raise PromotionError(f"{record}: promote a champion before testing a challenger against it")
        if compression_test and dict(models) != (stack[-1].get("compressed") or {}):
            raise PromotionError(
                f"{record}: these compressed models are not the champion's own copies; promote their receipt first "
                "(a compression test compares the champion with its copies)"
            )
        return _write(record, [*events, event])


def end_ab(record: Path, by: str, why: str) -> dict[str, Any]:
    """Stop the running A/B test; the champion alone is served again from the next start."""
    with _locked(record) as events:
        running = running_ab(events)
        if running is None:
            raise PromotionError(f"{record}: no A/B test is running")
        event = {"action": END_AB, "at": datetime.now(UTC).isoformat(), "by": by, "why": why, "models": running["models"]}
        return _write(record, [*events, event])


def promote(
    record: Path, models: dict[str, str], bento: str | None, by: str, why: str, experiment: str | None = None,
    compressed: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Make `models` (family -> model-store tag) the champion, with their `compressed` copies when packaged
    (what AIGC_COMPRESSED=1 serves); returns the event."""
    if not models:
        raise PromotionError("promote: no model tags given")
    event = {
        "action": PROMOTE, "at": datetime.now(UTC).isoformat(), "by": by, "why": why,
        "models": dict(models), "bento": bento, "experiment": experiment,
    }  # fmt: skip
    if compressed:
        event["compressed"] = dict(compressed)
    with _locked(record) as events:
        return _write(record, [*events, event])


def rollback(record: Path, by: str, why: str) -> dict[str, Any]:
    """Return to the champion before the current one; returns the event, which names the restored models."""
    with _locked(record) as events:
        stack = champions(events)
        if len(stack) < 2:
            raise PromotionError(f"{record}: no earlier champion to roll back to ({len(stack)} promoted so far)")
        back_to = stack[-2]
        event = {
            "action": ROLLBACK, "at": datetime.now(UTC).isoformat(), "by": by, "why": why,
            "models": back_to["models"], "bento": back_to["bento"], "experiment": back_to.get("experiment"),
            "replaced": stack[-1]["models"],
        }  # fmt: skip
        return _write(record, [*events, event])


def served_tags(record: Path, families: tuple[str, ...], compressed: bool = False) -> dict[str, str]:
    """The champion's tag of every family it has (all but OPTIONAL_FAMILIES are required), or with `compressed`
    the tags of its compressed copies; else a one-line error saying how to promote one."""
    champion = current(record)
    if champion is None:
        raise ConfigError(
            f"{record}: no model has been promoted; run `python -m monitoring.promote` to serve the models "
            "the workspace packaged (the package stage's receipt), or set the AIGC_<FAMILY>_MODEL tags"
        )
    models = (champion.get("compressed") or {}) if compressed else champion["models"]
    if compressed and not models:
        raise ConfigError(
            f"{record}: the champion has no compressed models ({COMPRESSED_ENV}=1); promote a receipt the package "
            f"stage wrote with --compressed (dvc repro package), or unset {COMPRESSED_ENV}"
        )
    missing = [family for family in families if family not in models and family not in OPTIONAL_FAMILIES]
    if missing:
        raise ConfigError(f"{record}: the champion has no {', '.join(missing)} model; promote a complete package receipt")
    return {family: models[family] for family in families if family in models}
