"""Landing snapshots: new files become a DVC-tracked, content-addressed folder, staged in git; nothing twice."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from monitoring.landing import snapshot
from tests.conftest import venv_env


def repo_with_landing(root: Path) -> Path:
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, env=venv_env(), check=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"ingest": {"landing": "data/landing", "landed": "data/landed"}}))
    (root / "data" / "landed").mkdir(parents=True)
    (root / "data" / "landing" / "text").mkdir(parents=True)
    (root / "data" / "landing" / "images" / "cat").mkdir(parents=True)
    return root


def staged(root: Path) -> set[str]:
    out = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=root, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_new_files_are_snapshotted_once_tracked_by_dvc_and_staged(tmp_path: Path) -> None:
    root = repo_with_landing(tmp_path)
    landing = root / "data" / "landing"
    (landing / "text" / "week1.csv").write_text("source,reference\na: 1,One.\n")
    (landing / "text" / "copy of week1.csv").write_text("source,reference\na: 1,One.\n")  # same content: kept once
    (landing / "images" / "cat" / "tabby.png").write_bytes(b"\x89PNG fake but bytes are bytes")
    first = snapshot(root)
    assert first is not None and first.files == 2
    stored = sorted(p.relative_to(first.path).as_posix() for p in first.path.rglob("*") if p.is_file())
    assert [Path(s).parent.as_posix() for s in stored] == ["images/cat", ".", "text"]  # dataset folders kept
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert sorted(manifest.values()) == ["images/cat/tabby.png", "text/copy of week1.csv"]
    assert {f"data/landed/{first.name}.dvc", "data/landed/.gitignore"} <= staged(root)
    status = subprocess.run(
        ["dvc", "status", f"data/landed/{first.name}.dvc"], cwd=root, env=venv_env(), capture_output=True, text=True
    )
    assert status.returncode == 0 and "changed" not in status.stdout  # cached and up to date

    assert snapshot(root) is None  # nothing new: no empty snapshot
    (landing / "text" / "week2.jsonl").write_text('{"source": "a: 2", "reference": "Two."}\n')
    second = snapshot(root)
    assert second is not None and second.files == 1 and second.name != first.name
    assert [p.name for p in (second.path / "text").iterdir()][0].endswith(".jsonl")
    (landing / "images" / "dog").mkdir()  # the same bytes under another label: a relabel, so it lands again
    (landing / "images" / "dog" / "tabby.png").write_bytes(b"\x89PNG fake but bytes are bytes")
    relabelled = snapshot(root)
    assert relabelled is not None and relabelled.files == 1 and (relabelled.path / "images" / "dog").is_dir()

    for path in landing.rglob("*"):  # the landing folder emptied: the snapshots stay, in DVC's cache too
        if path.is_file():
            path.unlink()
    subprocess.run(["rm", "-rf", str(first.path)], check=True)
    subprocess.run(
        ["dvc", "checkout", f"data/landed/{first.name}.dvc"], cwd=root, env=venv_env(), check=True, capture_output=True
    )
    assert (first.path / "manifest.json").is_file()
