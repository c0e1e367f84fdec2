"""Choose what the service serves: promote a package receipt, roll back to the previous champion, or show.

    python -m monitoring.promote                                  # the workspace's receipt becomes the champion
    python -m monitoring.promote --receipt r.json --why "checked by hand"
    python -m monitoring.promote --rollback --why "names wrong in today's copy"
    python -m monitoring.promote --show                           # the champion and the history

The record (params.yaml's `promotion.record`) is the only thing the service reads to choose its models
(serving/promoted.py); every change is appended with who (`--by`, default the login name), when and why.
A running service keeps the models it loaded: restart it (or roll out a new replica) to serve the change.
The retrain flow calls `promote_receipt` itself when the champion / challenger gate lets a challenger through.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from components.common import ConfigError, load_params, require
from serving.promoted import FAMILIES, PromotionError, champions, read_events, rollback
from serving.promoted import promote as record_promotion

log = logging.getLogger(__name__)


def record_path(root: Path) -> Path:
    """The promotion record, params.yaml's `promotion.record`."""
    return root / require(load_params("promotion", root / "params.yaml"), "record", str, "promotion")


def receipt_path(root: Path) -> Path:
    """The `package` stage's receipt (its one output in dvc.yaml): the model and Bento tags it built."""
    from components.pipeline import stage

    return root / stage("package", root).only_out()


def who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return os.environ.get("USER", "unknown")


def read_receipt(receipt: Path) -> dict[str, Any]:
    """A package receipt whose model tags are all in the model store, or a one-line error."""
    import bentoml

    if not receipt.is_file():
        raise PromotionError(f"{receipt}: no package receipt; run `dvc repro package` first")
    try:
        content = json.loads(receipt.read_text(encoding="utf-8"))
        models, bento = content["models"], content.get("bento")
    except (ValueError, KeyError, TypeError) as err:
        raise PromotionError(f"{receipt}: not a package receipt ({err}); rerun `dvc repro package`") from None
    missing = sorted(set(FAMILIES) - set(models))
    if missing:
        raise PromotionError(f"{receipt}: no {', '.join(missing)} model in the receipt; rerun `dvc repro package`")
    for family, tag in models.items():
        try:
            bentoml.models.get(tag)
        except bentoml.exceptions.NotFound:
            raise PromotionError(
                f"{receipt}: {family} model {tag} is not in this model store ($BENTOML_HOME); run `dvc repro package` here"
            ) from None
    return {"models": {family: str(models[family]) for family in FAMILIES}, "bento": bento}


def promote_receipt(receipt: Path, record: Path, by: str, why: str, experiment: str | None = None) -> dict[str, Any]:
    """The receipt's models become the champion; returns the recorded event."""
    content = read_receipt(receipt)
    event = record_promotion(record, content["models"], content["bento"], by, why, experiment)
    log.info("promoted %s (%s) by %s: %s", ", ".join(content["models"].values()), content["bento"], by, why)
    return event


def show(record: Path) -> str:
    events = read_events(record)
    stack = champions(events)
    if not stack:
        return f"{record}: nothing promoted yet"
    lines = [f"champion: {', '.join(stack[-1]['models'].values())} (bento {stack[-1]['bento']})", "history:"]
    lines += [f"  {e['at']} {e['action']:8} by {e['by']}: {e['why']} -> {', '.join(e['models'].values())}" for e in events]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.promote", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (params.yaml, dvc.yaml)")
    parser.add_argument("--receipt", type=Path, default=None, help="package receipt to promote (default: the package stage's)")
    parser.add_argument("--record", type=Path, default=None, help="promotion record (default: params promotion.record)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--rollback", action="store_true", help="return to the champion before the current one")
    action.add_argument("--show", action="store_true", help="print the champion and the history")
    parser.add_argument("--why", default=None, help="the reason, kept in the history (required for --rollback)")
    parser.add_argument("--by", default=None, help="who (default: the login name)")
    parser.add_argument("--experiment", default=None, help="the experiment the receipt came from, if any")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        record = args.record or record_path(args.repo)
        if args.show:
            print(show(record))
            return
        by = args.by or who()
        if args.rollback:
            if not args.why:
                raise PromotionError("--rollback: say why with --why, it is kept in the history")
            event = rollback(record, by, args.why)
            print(f"rolled back to {', '.join(event['models'].values())}; restart the service to serve them")
            return
        receipt = args.receipt or receipt_path(args.repo)
        event = promote_receipt(args.repo / receipt, record, by, args.why or "promoted by hand", args.experiment)
        print(f"promoted {', '.join(event['models'].values())}; restart the service to serve them")
    except (PromotionError, ConfigError) as err:
        print(f"monitoring.promote: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
