"""The promotion record: promote pushes a champion, rollback returns to the one before, every change kept; each
change of champion is published to the shared model store (params `package.export_to`), if one is set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.common import ConfigError
from serving.promoted import FAMILIES, PromotionError, current, promote, read_events, rollback, served_tags
from tests.conftest import REPO_ROOT


def tags(version: str) -> dict[str, str]:
    return {family: f"aigc-{family}:{version}" for family in FAMILIES}


def repo_with(root: Path, export_to: str | None) -> Path:
    """A repository root whose params.yaml names the shared model store (or none)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"package": {"export_to": export_to}}))
    return root


def shared_store(folder: Path, *versions: str) -> Path:
    """A shared model store holding the Bento archives of `versions` already (what a package export writes), so
    that publishing them needs no BentoML store."""
    (folder / "bentos").mkdir(parents=True)
    for version in versions:
        (folder / "bentos" / f"aigc-pipeline-{version}.bento").write_bytes(b"exported by the package stage")
    return folder


def test_rollback_returns_to_the_previous_champion_and_history_keeps_who_when_why(tmp_path: Path) -> None:
    record = tmp_path / "promoted.json"
    assert current(record) is None
    with pytest.raises(PromotionError, match="no earlier champion"):
        rollback(record, "ana", "nothing to roll back")
    promote(record, tags("v1"), "aigc-pipeline:b1", "ana", "first models")
    promote(record, tags("v2"), "aigc-pipeline:b2", "retrain flow", "not worse", experiment="retrain-x")
    promote(record, tags("v3"), "aigc-pipeline:b3", "retrain flow", "not worse", experiment="retrain-y")
    assert served_tags(record, FAMILIES) == tags("v3")
    back = rollback(record, "ben", "names wrong in v3")
    assert back["models"] == tags("v2") and back["replaced"] == tags("v3") and back["experiment"] == "retrain-x"
    assert served_tags(record, FAMILIES) == tags("v2")
    rollback(record, "ben", "v2 too")
    assert served_tags(record, FAMILIES) == tags("v1")
    with pytest.raises(PromotionError, match="no earlier champion"):
        rollback(record, "ben", "past the first")
    events = read_events(record)
    rollbacks = [(e["action"], e["by"], e["why"]) for e in events][-2:]
    assert rollbacks == [("rollback", "ben", "names wrong in v3"), ("rollback", "ben", "v2 too")]
    assert all(e["at"] for e in events)
    on_disk = json.loads(record.read_text())
    assert on_disk["current"]["models"] == tags("v1")  # readable without replaying


def test_a_broken_record_is_one_clear_error_not_a_served_guess(tmp_path: Path) -> None:
    from components.common import ConfigError

    record = tmp_path / "promoted.json"
    with pytest.raises(ConfigError, match="python -m monitoring.promote"):
        served_tags(record, FAMILIES)
    record.write_text("{not json")
    with pytest.raises(PromotionError, match="not a promotion record"):
        current(record)
    record.write_text(json.dumps({"events": [{"action": "delete"}]}))
    with pytest.raises(PromotionError, match="promote / rollback"):
        current(record)
    promote(tmp_path / "partial.json", {"text": "aigc-text:v1"}, None, "ana", "text only")
    with pytest.raises(ConfigError, match="no image, restore model"):
        served_tags(tmp_path / "partial.json", FAMILIES)
    # A champion promoted before diffusion models were packaged still serves its models (the GAN generates).
    older = {family: f"aigc-{family}:v0" for family in ("text", "image", "restore")}
    promote(tmp_path / "older.json", older, None, "ana", "before diffusion")
    assert served_tags(tmp_path / "older.json", FAMILIES) == older


def test_the_cli_refuses_what_it_cannot_do_in_one_line(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "monitoring.promote", "--record", str(tmp_path / "promoted.json"), *args]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)

    no_why = cli("--rollback")
    assert no_why.returncode == 2 and no_why.stderr.strip().count("\n") == 0 and "--why" in no_why.stderr
    missing = cli("--receipt", str(tmp_path / "nowhere.json"))
    assert missing.returncode == 2 and "dvc repro package" in missing.stderr and "Traceback" not in missing.stderr
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"models": tags("never-imported"), "bento": "aigc-pipeline:x"}))
    absent = cli("--receipt", str(receipt))
    assert absent.returncode == 2 and "is not in this model store" in absent.stderr
    assert cli("--show").stdout.strip().endswith("nothing promoted yet")


def test_an_ab_test_runs_until_ended_promoted_or_rolled_back(tmp_path: Path) -> None:
    from serving.promoted import challenge, challenger, end_ab

    record = tmp_path / "promoted.json"
    with pytest.raises(PromotionError, match="promote a champion"):
        challenge(record, tags("c1"), None, 0.1, "split", "ana", "too early")
    promote(record, tags("v1"), None, "ana", "first")
    with pytest.raises(PromotionError, match="share in"):
        challenge(record, tags("c1"), None, 1.5, "split", "ana", "too much")
    challenge(record, tags("c1"), None, 0.1, "split", "ana", "try c1")
    assert challenger(record)["models"] == tags("c1") and served_tags(record, FAMILIES) == tags("v1")
    end_ab(record, "ana", "enough")
    assert challenger(record) is None
    with pytest.raises(PromotionError, match="no A/B test"):
        end_ab(record, "ana", "again")
    challenge(record, tags("c2"), None, 0.0, "shadow", "ana", "shadow c2")
    promote(record, tags("c2"), None, "ana", "users preferred c2")  # promotion ends the test
    assert challenger(record) is None and json.loads(record.read_text())["ab"] is None
    rollback(record, "ana", "back")  # A/B events never count as champions
    assert served_tags(record, FAMILIES) == tags("v1")


def test_the_online_decision_promotes_a_better_challenger_and_ends_a_worse_ones_test(tmp_path: Path) -> None:
    from monitoring.ab import BETTER, UNKNOWN, WORSE, act
    from serving.promoted import challenge, challenger

    record = tmp_path / "promoted.json"
    repo_with(tmp_path, None)  # no shared model store: nothing to publish
    promote(record, tags("v1"), None, "ana", "first")

    def report(decision: str) -> dict[str, object]:
        comparison = {"decision": decision, "reason": "challenger − champion +0.1 (95% CI +0.05 … +0.15)"}
        return {"comparison": comparison, "metric": "click", "challenger": tags("c1"), "experiment": None}

    challenge(record, tags("c1"), None, 0.5, "split", "ana", "try c1")
    assert act(tmp_path, record, report(UNKNOWN), "ana").startswith("nothing to do")
    assert challenger(record) is not None
    act(tmp_path, record, report(WORSE), "ana")
    assert challenger(record) is None and served_tags(record, FAMILIES) == tags("v1")
    challenge(record, tags("c1"), None, 0.5, "split", "ana", "try c1 again")
    act(tmp_path, record, report(BETTER), "ana")
    assert served_tags(record, FAMILIES) == tags("c1") and current(record)["why"].startswith("online A/B")


def test_compressed_copies_follow_their_champion_and_a_compression_test_promotes_nothing(tmp_path: Path) -> None:
    from monitoring.ab import BETTER, act
    from serving.promoted import challenge, challenger

    record = tmp_path / "promoted.json"
    repo_with(tmp_path, None)
    small = {family: f"aigc-{family}:int8-{family}" for family in FAMILIES}
    promote(record, tags("v1"), None, "ana", "first", compressed=small)
    assert served_tags(record, FAMILIES, compressed=True) == small and served_tags(record, FAMILIES) == tags("v1")
    with pytest.raises(PromotionError, match="not the champion's own copies"):
        challenge(record, tags("other"), None, 0.5, "split", "ana", "int8?", compression_test=True)
    challenge(record, small, None, 0.5, "split", "ana", "int8 on CPU boxes?", compression_test=True)

    def report(models: dict[str, str], **more: object) -> dict[str, object]:
        comparison = {"decision": BETTER, "reason": "challenger − champion +0.1 (95% CI +0.05 … +0.15)"}
        return {"comparison": comparison, "metric": "click", "challenger": models, "experiment": None, **more}

    said = act(tmp_path, record, report(small, compression_test=True), "ana")
    assert "serve the compressed copies with AIGC_COMPRESSED=1" in said and challenger(record) is None
    assert current(record)["models"] == tags("v1")  # the champion stays; its copies were what was tested

    # A fp32 challenger that wins keeps its own copies: AIGC_COMPRESSED=1 serves the new champion's.
    its_copies = {family: f"aigc-{family}:int8-c1" for family in FAMILIES}
    challenge(record, tags("c1"), None, 0.5, "split", "ana", "try c1", compressed=its_copies)
    act(tmp_path, record, report(tags("c1"), compressed=its_copies), "ana")
    assert served_tags(record, FAMILIES) == tags("c1") and served_tags(record, FAMILIES, compressed=True) == its_copies
    rollback(record, "ana", "back")
    assert served_tags(record, FAMILIES, compressed=True) == small
    older = tmp_path / "older.json"
    promote(older, tags("v0"), None, "ana", "before the compress stage")
    with pytest.raises(ConfigError, match=r"the champion has no compressed models \(AIGC_COMPRESSED=1\)"):
        served_tags(older, FAMILIES, compressed=True)


def test_each_change_of_champion_is_published_and_a_failed_publication_says_how_to_retry(tmp_path: Path) -> None:
    from components.common import TransientError
    from monitoring.ab import BETTER, act
    from monitoring.promote import publish_champion
    from serving.promoted import challenge

    record = tmp_path / "promoted.json"
    assert publish_champion(repo_with(tmp_path / "no-store", None), record) is None  # export_to null: nothing to do
    remote = shared_store(tmp_path / "aigc", "b1", "b2")
    repo = repo_with(tmp_path / "repo", str(remote))

    def champion() -> dict[str, object]:
        return json.loads((remote / "champion.json").read_text())

    promote(record, tags("v1"), "aigc-pipeline:b1", "ana", "first")
    assert publish_champion(repo, record) == str(remote)
    assert champion() == {"models": tags("v1"), "bento": "aigc-pipeline:b1"}
    assert json.loads((remote / "receipts" / "b1.json").read_text()) == champion()

    challenge(record, tags("v2"), "aigc-pipeline:b2", 0.5, "split", "ana", "try v2")  # an A/B test publishes nothing
    assert champion()["bento"] == "aigc-pipeline:b1"
    comparison = {"decision": BETTER, "reason": "challenger − champion +0.1 (95% CI +0.05 … +0.15)"}
    report = {
        "comparison": comparison,
        "metric": "click",
        "challenger": tags("v2"),
        "bento": "aigc-pipeline:b2",
        "experiment": None,
    }
    assert f"published to {remote}" in act(repo, record, report, "ana")  # the online decision promotes and publishes
    assert champion() == {"models": tags("v2"), "bento": "aigc-pipeline:b2"}

    rollback(record, "ben", "v2 is worse after all")
    (remote / "receipts").rename(tmp_path / "receipts")  # the store cannot take b1's receipt: a file where its folder was
    (remote / "receipts").write_text("")
    with pytest.raises(TransientError) as failed:
        publish_champion(repo, record)
    message = str(failed.value)
    assert "recorded locally" in message and "was not updated" in message and "monitoring.promote --publish" in message
    assert current(record)["models"] == tags("v1") and champion()["bento"] == "aigc-pipeline:b2"  # recorded, not published
    (remote / "receipts").unlink()
    (tmp_path / "receipts").rename(remote / "receipts")
    publish_champion(repo, record)  # the retry
    assert champion() == {"models": tags("v1"), "bento": "aigc-pipeline:b1"}
