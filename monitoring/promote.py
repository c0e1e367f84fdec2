"""Choose what the service serves: promote a package receipt, roll back to the previous champion, or show.

    python -m monitoring.promote                                  # the workspace's receipt becomes the champion
    python -m monitoring.promote --receipt r.json --why "checked by hand"
    python -m monitoring.promote --rollback --why "names wrong in today's copy"
    python -m monitoring.promote --show                           # the champion and the history
    python -m monitoring.promote --challenger --receipt r.json --share 0.1   # online A/B test (or --shadow)
    python -m monitoring.promote --end-ab --why "enough"          # stop it
    python -m monitoring.promote --publish                        # retry publishing the champion (below)

The record (params.yaml's `promotion.record`) is the only thing the service reads to choose its models
(serving/promoted.py); every change is appended with who (`--by`, default the login name), when and why.
Every change is then pushed to the Pushgateway with the loop's other metrics (monitoring/loop_metrics.py,
when params `observability.pushgateway` names one). A running service keeps the models it loaded: restart
it (or roll out a new replica) to serve the change.
The retrain flow calls `promote_receipt` itself when the champion / challenger gate lets a challenger through.

With params `package.export_to` set, every change of champion (a promotion, a rollback, the retrain flow's
and the online A/B decision's promotions) is then published to that shared model store (serving/store.py):
the champion's Bento archive, if it is not there yet, and champion.json, what serving boxes import. The record
is written first; if publishing fails, the message says so and how to retry.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from components.common import EX_TEMPFAIL, ConfigError, DataError, TransientError, load_params, require
from serving.promoted import FAMILIES, SHADOW, PromotionError, challenge, champions, current, end_ab, read_events, rollback
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
    compressed = content.get("compressed") or {}
    for kind, tags in (("", models), ("compressed ", compressed)):
        for family, tag in tags.items():
            try:
                bentoml.models.get(tag)
            except bentoml.exceptions.NotFound:
                raise PromotionError(
                    f"{receipt}: {kind}{family} model {tag} is not in this model store ($BENTOML_HOME); "
                    "run `dvc repro package` here"
                ) from None
    return {"models": {family: str(models[family]) for family in FAMILIES}, "bento": bento,
            "compressed": {family: str(tag) for family, tag in compressed.items()}}  # fmt: skip


def apply_experiment(root: Path, experiment: str, receipt: dict[str, Any]) -> list[str]:
    """`dvc exp apply <experiment>`: the workspace's models, metrics and receipt become the experiment's, so
    the next champion / challenger comparison runs against them. Nothing is rebuilt (a rebuild could train
    models no gate has seen): the workspace receipt must then be the experiment's `receipt`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    run = subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "apply", experiment], cwd=root, env=env,
                         capture_output=True, text=True)  # fmt: skip
    lines = (run.stdout + run.stderr).splitlines()[-40:]
    if run.returncode != 0:
        raise PromotionError(f"dvc exp apply {experiment} failed (exit {run.returncode}): {(lines or ['no output'])[-1]}")
    workspace = json.loads(receipt_path(root).read_text(encoding="utf-8"))
    if workspace.get("models") != receipt.get("models"):
        raise PromotionError(f"after dvc exp apply {experiment} the workspace receipt is not the experiment's; nothing promoted")
    return lines


def shared_store(root: Path) -> str | None:
    """The shared model store champions are published to (params `package.export_to`), or None: none, also for a
    repository whose params.yaml has no `package` section (older than shared stores) or no params.yaml."""
    from serving import store

    path = root / "params.yaml"
    if not path.is_file() or "package" not in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}):
        return None
    return store.destination(load_params("package", path))


def publish_champion(root: Path, record: Path, receipt: Path | None = None) -> str | None:
    """Publish the record's current champion to the shared model store (params `package.export_to` of the
    repository at `root`): its Bento archive, if not there yet, then champion.json, what serving boxes import.
    Returns the store, or None when none is set. Called once the record is written: a failure says the change
    is recorded but not published, and how to retry (`receipt`, the promoted receipt's file, if there is one)."""
    dest = shared_store(root)
    if dest is None:
        return None
    from serving import store

    champion = current(record)
    if champion is None or not champion.get("bento"):
        what = "nothing is promoted" if champion is None else "the champion names no Bento"
        raise PromotionError(f"{record}: {what}, so there is nothing to publish to {dest}; promote a package receipt")
    retry = f"`python -m monitoring.promote --publish --repo {root} --record {record}`"
    if receipt is not None:
        retry = f"`python -m serving.store export {receipt} {dest} --champion` or {retry}"
    unpublished = f"the champion {champion['bento']} is recorded locally in {record}, but the shared model store "
    unpublished += f"{dest} was not updated"
    try:
        published = {"models": champion["models"], "bento": champion["bento"]}
        if champion.get("compressed"):
            published["compressed"] = champion["compressed"]
        store.export(published, dest, champion=True)
    except TransientError as err:
        raise TransientError(f"{unpublished}: {err}; retry with {retry}") from None
    except (DataError, ConfigError) as err:
        raise PromotionError(f"{unpublished}: {err}; then retry with {retry}") from None
    log.info("published %s to %s as the champion", champion["bento"], dest)
    return dest


def promote_receipt(root: Path, receipt: Path, record: Path, by: str, why: str, experiment: str | None = None) -> dict[str, Any]:
    """The receipt's models become the champion, published to the shared model store when params
    `package.export_to` of the repository `root` sets one; returns the recorded event."""
    shared_store(root)  # its params checked before anything is recorded
    content = read_receipt(receipt)
    event = record_promotion(record, content["models"], content["bento"], by, why, experiment, content["compressed"])
    log.info("promoted %s (%s) by %s: %s", ", ".join(content["models"].values()), content["bento"], by, why)
    publish_champion(root, record, receipt)
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
    action.add_argument("--challenger", action="store_true", help="start an online A/B test of the receipt's models")
    action.add_argument("--end-ab", action="store_true", help="stop the running A/B test")
    action.add_argument(
        "--publish", action="store_true", help="publish the champion to params package.export_to (after a failed try)"
    )
    parser.add_argument(
        "--share", type=float, default=None, help="with --challenger: its share of traffic (default params ab.share)"
    )
    parser.add_argument("--shadow", action="store_true", help="with --challenger: run it beside the champion, unseen")
    parser.add_argument(
        "--compressed", action="store_true", help="with --challenger: test the receipt's compressed copies against the champion"
    )
    parser.add_argument("--why", default=None, help="the reason, kept in the history (required for --rollback)")
    parser.add_argument("--by", default=None, help="who (default: the login name)")
    parser.add_argument("--experiment", default=None, help="the experiment the receipt came from, if any")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    change(args)  # a refused change exits here: it changed nothing to push
    if not (args.show or args.publish) and (args.repo / "params.yaml").is_file():
        from monitoring.loop_metrics import publish

        log.log(*publish(args.repo, args.record))  # the dashboards see the change


def change(args: argparse.Namespace) -> None:
    """The change (or the look) the arguments ask for, with its errors as one line and an exit status."""
    try:
        record = args.record or record_path(args.repo)
        if args.show:
            print(show(record))
            return
        if args.publish:
            dest = publish_champion(args.repo, record)
            print(f"published the champion to {dest}" if dest else "params package.export_to is null: nowhere to publish")
            return
        by = args.by or who()
        if args.end_ab:
            end_ab(record, by, args.why or "ended by hand")
            print("A/B test ended; restart the service to serve the champion alone")
            return
        if args.compressed and not args.challenger:
            raise PromotionError("--compressed: only with --challenger (serve the champion's copies with AIGC_COMPRESSED=1)")
        if args.challenger:
            ab = load_params("ab", args.repo / "params.yaml")
            content = read_receipt(args.repo / (args.receipt or receipt_path(args.repo)))
            if args.compressed and not content["compressed"]:
                raise PromotionError("--compressed: the receipt lists no compressed models; run `dvc repro package`")
            models = content["compressed"] if args.compressed else content["models"]
            mode = SHADOW if args.shadow else require(ab, "mode", str, "ab")
            share = args.share if args.share is not None else float(require(ab, "share", (int, float), "ab", low=0, high=1))
            why = args.why or "A/B test started by hand"
            copies = None if args.compressed else content["compressed"]  # a fp32 challenger's, kept if it is promoted
            challenge(record, models, content["bento"], share, mode, by, why, args.experiment, copies, args.compressed)
            print(f"A/B test: {', '.join(models.values())} ({mode}, share {share}); restart the service to start it")
            return
        if args.rollback:
            if not args.why:
                raise PromotionError("--rollback: say why with --why, it is kept in the history")
            shared_store(args.repo)  # its params checked before anything is recorded
            event = rollback(record, by, args.why)
            publish_champion(args.repo, record)
            print(f"rolled back to {', '.join(event['models'].values())}; restart the service to serve them")
            return
        receipt = args.receipt or receipt_path(args.repo)
        event = promote_receipt(args.repo, args.repo / receipt, record, by, args.why or "promoted by hand", args.experiment)
        print(f"promoted {', '.join(event['models'].values())}; restart the service to serve them")
    except (PromotionError, ConfigError) as err:
        print(f"monitoring.promote: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TransientError as err:  # the shared model store could not be written: retry later
        print(f"monitoring.promote: {err}", file=sys.stderr)
        raise SystemExit(EX_TEMPFAIL) from None


if __name__ == "__main__":
    main()
