"""The shared model store (serving/store.py): the package stage exports the Bento, its models inside; promotion
publishes the champion (champion.json); a serving box with an empty BentoML store imports the champion and serves
the Bento itself, outside the repository. A store that is missing, has nothing promoted, lacks the asked version
or holds a broken archive fails with one line and leaves no trace; a store that cannot be written is a temporary
failure (exit 75)."""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from serving.promoted import FAMILIES
from tests.conftest import REPO_ROOT
from tests.serving.conftest import service_env, start_server, stop_server

RECORD = {"name": "Aurora", "category": "lamp", "colour": "amber", "tone": "playful"}  # the tiny models' text schema
FAKE = {"models": {f: f"aigc-{f}:{f}0000" for f in FAMILIES}, "bento": "aigc-pipeline:0123456789abcdef"}
"""A receipt no BentoML store holds: exports of it only work where its archive is there already."""


def store_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m serving.store ...` with `home` as the BentoML store."""
    command = [sys.executable, "-m", "serving.store", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=service_env(home), capture_output=True, text=True, timeout=600)


def package(home: Path, models: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "serving.package", *(str(models / f) for f in FAMILIES), "--out", str(out), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=service_env(home), capture_output=True, text=True, timeout=600)


def files_under(folder: Path) -> dict[str, int]:
    """Each file under folder (relative path) and its modification time."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_layout(receipt: dict[str, Any]) -> set[str]:
    """One archive, the Bento's (its models inside), and the receipts: no separate model archives, and no
    champion.json, which only a promotion writes."""
    version = receipt["bento"].split(":")[1]
    return {f"bentos/aigc-pipeline-{version}.bento", f"receipts/{version}.json"}


def cut_inside(archive: Path, member: str) -> bytes:
    """The start of an xz-compressed tar archive (a .bento) that ends inside `member`'s data: a truncated archive
    whose copy of that file is damaged."""
    with tarfile.open(archive) as tar:
        info = tar.getmember(member)
    data, decompressor, decompressed = archive.read_bytes(), lzma.LZMADecompressor(), 0
    for end in range(256, len(data), 256):
        decompressed += len(decompressor.decompress(data[end - 256 : end]))
        if decompressed > info.offset_data:  # the first bytes of the member are in, not all of them
            assert decompressed < info.offset_data + info.size, f"no cut inside {member}"
            return data[:end]
    raise AssertionError(f"{member} is not in {archive}")


def store_entries(home: Path) -> list[str]:
    """`<name>/<version>` of every model and Bento in a BentoML home (what `bentoml list` would show)."""
    return sorted(
        p.relative_to(home).as_posix() for kind in ("models", "bentos") for p in (home / kind).glob("*/*") if p.name != "latest"
    )


def one_error_line(run: subprocess.CompletedProcess[str], code: int, *names: str) -> str:
    """The one error line of a failed CLI run; asserts the exit code, no traceback, and that it names `names`."""
    assert run.returncode == code, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, run.stderr[-3000:]
    assert all(name in errors[0] for name in names), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def shared(bento_home: Path, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A shared store the package stage exported to (a folder it had to create), and the receipt."""
    remote = tmp_path_factory.mktemp("shared") / "aigc"
    run = package(bento_home, tiny_models, bento_home / "exported.json", "--compressed", str(tiny_models / "compressed"),
                  "--export-to", str(remote))  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    # bento_home holds these models, their copies and this Bento already: nothing imported or built, only exported.
    assert run.stderr.count("already in the store as") == 2 * len(FAMILIES) + 1, run.stderr[-3000:]
    assert "imported as" not in run.stderr and "written" in run.stderr
    return remote, json.loads((bento_home / "exported.json").read_text())


@pytest.mark.slow
def test_an_exported_bento_is_imported_into_an_empty_store_and_served_outside_the_repo(
    shared: tuple[Path, dict[str, Any]], bento_home: Path, tiny_models: Path, tmp_path: Path
) -> None:
    source, receipt = shared
    assert receipt == json.loads((bento_home / "receipt.json").read_text())  # the same content, the same tags
    remote = tmp_path / "aigc"  # a copy: what this test promotes is no other test's
    shutil.copytree(source, remote)
    written = files_under(remote)
    assert set(written) == expected_layout(receipt)  # and no temporary file left behind
    version = receipt["bento"].split(":")[1]
    assert json.loads((remote / "receipts" / f"{version}.json").read_text()) == receipt

    again = package(bento_home, tiny_models, tmp_path / "again.json", "--compressed", str(tiny_models / "compressed"),
                    "--export-to", str(remote))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "written" not in again.stderr and again.stderr.count("already there") == 2  # the Bento, its receipt
    assert files_under(remote) == written  # content-addressed: nothing rewritten

    home = tmp_path / "serving-box-bentoml"  # a serving box: its own, empty store
    unpromoted = store_cli(home, "import", str(remote))  # packaged and exported, never promoted: nothing to serve
    one_error_line(unpromoted, 65, "nothing promoted to this store yet", "monitoring.promote", "--bento", version)
    published = store_cli(bento_home, "export", str(bento_home / "exported.json"), str(remote), "--champion")  # by hand
    assert published.returncode == 0, published.stderr[-3000:]
    assert json.loads((remote / "champion.json").read_text()) == receipt
    after = files_under(remote)
    assert after == {**written, "champion.json": after["champion.json"]}  # only champion.json was written

    imported = store_cli(home, "import", str(remote))
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip().splitlines()[-1] == f"bentoml serve {receipt['bento']}"
    entries = store_entries(home)
    assert entries == sorted(
        [
            f"bentos/{receipt['bento'].replace(':', '/')}",
            *(f"models/{t.replace(':', '/')}" for t in (*receipt["models"].values(), *receipt["compressed"].values())),
        ]
    )  # the compressed copies travel inside the Bento
    for bento in (receipt["bento"], version):  # a bare version: the store's receipt names the Bento
        twice = store_cli(home, "import", str(remote), "--bento", bento)
        assert twice.returncode == 0 and twice.stderr.count("already in the store") == 1, twice.stderr[-3000:]
        assert twice.stdout.strip().splitlines()[-1] == f"bentoml serve {receipt['bento']}"
    assert store_entries(home) == entries

    # Served from the imported Bento alone: run outside the repository, the repo not on PYTHONPATH, and no
    # promotion record to fall back on, so the Bento's own code and its pinned arguments are all it has.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    log = tmp_path / "server.log"
    env = {"PYTHONPATH": "", "AIGC_PROMOTED": str(outside / "no-such-record.json")}
    try:
        server = start_server(home, tmp_path / "requests", output=log, target=receipt["bento"], cwd=outside, **env)
    except RuntimeError as err:
        raise AssertionError(f"{err}:\n{log.read_text(errors='replace')[-3000:]}") from None
    try:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        bento_src = home / "bentos" / receipt["bento"].replace(":", "/") / "src"
        assert workers and {Path(w.cwd()) for w in workers} == {bento_src}  # the Bento's copy of the code, not the repo's
        assert httpx.get(f"{server.url}/readyz", timeout=30).status_code == 200
        response = httpx.post(f"{server.url}/generate_text", json={"record": RECORD}, timeout=60)
        assert response.status_code == 200, response.text
        assert isinstance(response.json()["text"], str)
        assert response.headers["x-model-tag"] == receipt["models"]["text"]
    finally:
        stop_server(server)


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["truncated in a model", "misplaced"])
def test_a_broken_bento_archive_fails_in_one_line_and_leaves_nothing_in_the_store(
    shared: tuple[Path, dict[str, Any]], broken: str, tmp_path: Path
) -> None:
    source, receipt = shared
    remote = tmp_path / "aigc"
    shutil.copytree(source, remote)
    archive = remote / "bentos" / f"{receipt['bento'].replace(':', '-')}.bento"
    args: list[str] = []
    if broken == "misplaced":  # another version's name on this archive: not the Bento its receipt names
        tag = "aigc-pipeline:0000000000000000"
        (remote / "receipts" / "0000000000000000.json").write_text(json.dumps({**receipt, "bento": tag}))
        archive = archive.rename(remote / "bentos" / "aigc-pipeline-0000000000000000.bento")
        args, names = ["--bento", tag], [f"holds {receipt['bento']}"]
    else:  # the champion's archive, cut off inside the text model the Bento carries
        (remote / "champion.json").write_text(json.dumps(receipt))
        tag, text = receipt["bento"], receipt["models"]["text"].replace(":", "/")
        archive.write_bytes(cut_inside(archive, f"./models/{text}/model.safetensors"))
        names = ["unreadable archive"]
    home = tmp_path / "bentoml"
    run = store_cli(home, "import", str(remote), *args)
    one_error_line(run, 65, str(archive), tag, "export", *names)
    assert store_entries(home) == []  # neither the Bento nor any of its models, not even the intact ones


@pytest.mark.slow
def test_export_and_import_go_through_an_fsspec_url(bento_home: Path, tmp_path: Path) -> None:
    # fsspec's in-memory filesystem stands in for s3:// (same code path: a URL, not a local folder), so both
    # ends run in one process, on a copy of the store: export, empty the store, import.
    home = tmp_path / "bentoml"
    shutil.copytree(bento_home, home, ignore=shutil.ignore_patterns("tmp"))
    script = """
import json, sys, bentoml, fsspec
from serving import store
receipt = json.loads(open(sys.argv[1]).read())
first = store.export(receipt, "memory://shared/aigc", champion=True)
second = store.export(receipt, "memory://shared/aigc", champion=True)
for tag in receipt["models"].values():
    bentoml.models.delete(tag)
bentoml.delete(receipt["bento"])
tag = store.import_("memory://shared/aigc")
stored = sorted(str(m.tag) for m in bentoml.models.list())
print(json.dumps({"first": first, "second": second, "tag": tag, "stored": stored, "bento": str(bentoml.get(tag).tag)}))
"""
    run = subprocess.run([sys.executable, "-c", script, str(home / "receipt.json")], cwd=REPO_ROOT, env=service_env(home),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result, receipt = json.loads(run.stdout.splitlines()[-1]), json.loads((home / "receipt.json").read_text())
    assert set(result["first"]) == {*expected_layout(receipt), "champion.json"} and result["second"] == []
    assert result["tag"] == result["bento"] == receipt["bento"]
    assert set(receipt["models"].values()) <= set(result["stored"])


@pytest.mark.parametrize(
    ("case", "code", "names"),
    [
        ("missing folder", 65, ["no such shared model store"]),
        ("nothing promoted", 65, ["nothing promoted to this store yet", "monitoring.promote", "--bento", "0123456789abcdef"]),
        ("unknown version", 65, ["no Bento aigc-pipeline:0000000000000000", "0123456789abcdef"]),
        ("bad version", 78, ["--bento", "../x"]),
    ],
)
def test_import_from_a_bad_store_fails_in_one_line(case: str, code: int, names: list[str], tmp_path: Path) -> None:
    remote = tmp_path / "aigc"
    if case != "missing folder":
        remote.mkdir()
    if case != "missing folder":  # exported (the package stage does, in every experiment), never promoted
        receipt = {"models": {f: f"aigc-{f}:{f}0000" for f in FAMILIES}, "bento": "aigc-pipeline:0123456789abcdef"}
        (remote / "receipts").mkdir()
        (remote / "receipts" / "0123456789abcdef.json").write_text(json.dumps(receipt))
    bento = {"unknown version": ["--bento", "aigc-pipeline:0000000000000000"], "bad version": ["--bento", "../x"]}
    run = store_cli(tmp_path / "bentoml", "import", str(remote), *bento.get(case, []))
    one_error_line(run, code, *names, *([str(remote)] if code == 65 else []))
    assert not (tmp_path / "bentoml" / "models").exists() or store_entries(tmp_path / "bentoml") == []


def test_export_of_a_missing_receipt_fails_in_one_line(tmp_path: Path) -> None:
    run = store_cli(tmp_path / "bentoml", "export", str(tmp_path / "bento.json"), str(tmp_path / "aigc"))
    one_error_line(run, 65, str(tmp_path / "bento.json"), "package stage")
    assert not (tmp_path / "aigc").exists()


@pytest.mark.parametrize("blocked", ["receipts/ is a file", "champion.json is a folder"])
def test_a_store_that_cannot_be_written_is_a_temporary_failure_in_one_line(blocked: str, tmp_path: Path) -> None:
    remote = tmp_path / "aigc"
    (remote / "bentos").mkdir(parents=True)
    (remote / "bentos" / "aigc-pipeline-0123456789abcdef.bento").write_bytes(b"exported before")  # no Bento to read
    if blocked == "receipts/ is a file":
        (remote / "receipts").write_text("")
    else:
        (remote / "receipts").mkdir()
        (remote / "receipts" / "0123456789abcdef.json").write_text(json.dumps(FAKE))
        (remote / "champion.json").mkdir()
    receipt = tmp_path / "bento.json"
    receipt.write_text(json.dumps(FAKE))
    before = files_under(remote)
    run = store_cli(tmp_path / "bentoml", "export", str(receipt), str(remote), "--champion")
    one_error_line(run, 75, str(remote), "cannot write the shared model store")  # EX_TEMPFAIL: the flows retry it
    assert files_under(remote) == before  # and no temporary file left behind


@pytest.mark.slow
def test_promotions_publish_the_champion_and_an_experiments_export_never_moves_it(
    bento_home: Path, tiny_models: Path, tmp_path: Path
) -> None:
    remote = tmp_path / "aigc"
    repo = tmp_path / "repo"  # a repository whose params name the shared model store
    repo.mkdir()
    (repo / "params.yaml").write_text(yaml.safe_dump({"package": {"export_to": str(remote)}}))
    record = tmp_path / "promoted.json"

    def promote(*args: str) -> None:
        command = [sys.executable, "-m", "monitoring.promote", "--repo", str(repo), "--record", str(record), *args]
        run = subprocess.run(command, cwd=REPO_ROOT, env=service_env(bento_home), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]

    def champion() -> dict[str, Any]:
        return json.loads((remote / "champion.json").read_text())

    # The champion so far: the same models in an earlier Bento, whose archive an earlier promotion published.
    earlier = {**json.loads((bento_home / "receipt.json").read_text()), "bento": "aigc-pipeline:0000000000000000"}
    (remote / "bentos").mkdir(parents=True)
    (remote / "bentos" / "aigc-pipeline-0000000000000000.bento").write_bytes(b"published before")
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    promote("--receipt", str(tmp_path / "earlier.json"), "--why", "the champion so far")
    assert champion() == earlier

    # A retrain experiment's package stage exports its challenger before the gate decides: archives only.
    challenger = tmp_path / "challenger.json"
    exported = package(bento_home, tiny_models, challenger, "--export-to", str(remote))
    assert exported.returncode == 0, exported.stderr[-3000:]
    receipt = json.loads(challenger.read_text())
    assert set(files_under(remote)) >= expected_layout(receipt) and champion() == earlier

    promote("--receipt", str(challenger), "--why", "the gate said yes")
    assert champion() == receipt  # names that receipt's Bento, which serving boxes now import
    promote("--rollback", "--why", "back to the one before")
    assert champion() == earlier
