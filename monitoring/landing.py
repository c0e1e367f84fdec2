"""New data, landed reproducibly: files dropped into the landing folder become a DVC-tracked snapshot.

    python -m monitoring.landing          # land feedback edits, snapshot the landing folder (every retrain does it first)

`ingest` never reads the landing folder (`ingest.landing`) itself: files there are untracked, a DVC
experiment run aside (`--temp`) would not see them, and nothing could reproduce a retrain once they move.
A snapshot copies every landed file whose content no earlier snapshot holds into
`<ingest.landed>/<snapshot>/`, keeping its dataset sub-folder (`text/`, `images/<label>/`, `restore/`) and
naming it by its content hash, with `manifest.json` mapping the original names. The snapshot folder is
named by the hash of what it holds, `dvc add`-ed (its `.dvc` file is staged in git, so experiments carry
it), and read by `ingest` with every earlier snapshot. The landing folder can be emptied once a snapshot is
taken; `dvc exp apply <retrain>` then `dvc repro` still rebuild the retrain's data.

Users' corrections land the same way: before each snapshot, every `POST /feedback` part with edited texts
(`feedback-*.parquet` beside the request log) becomes `<landing>/text/feedback-<part>.csv`, the source and
the edited text under the configured `ingest.text` column names, so the next retrain trains on them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from components.common import DATASETS, ConfigError, load_params, require, write_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Snapshot:
    name: str
    path: Path
    files: int


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def landed_files(landed: Path) -> set[tuple[str, str]]:
    """(folder, content hash) of every file already in a snapshot: the same bytes under another label or
    dataset are another file (a relabelled image lands again)."""
    return {
        (path.parent.relative_to(snapshot).as_posix(), path.stem)
        for snapshot in landed.iterdir() if snapshot.is_dir()
        for name in DATASETS for path in (snapshot / name).rglob("*") if path.is_file()
    }  # fmt: skip


def new_files(landing: Path, landed: Path) -> list[tuple[Path, Path, str]]:
    """(original, stored relative path, digest) of each landing file no snapshot holds in its folder."""
    known = landed_files(landed) if landed.is_dir() else set()
    found: dict[tuple[str, str], tuple[Path, Path, str]] = {}
    for name in DATASETS:
        for path in sorted((landing / name).rglob("*")) if (landing / name).is_dir() else []:
            if not path.is_file() or path.name.startswith("."):
                continue
            key = (path.parent.relative_to(landing).as_posix(), file_digest(path))
            if key in known or key in found:
                continue
            found[key] = (path, Path(key[0]) / f"{key[1]}{path.suffix.lower()}", key[1])
    return list(found.values())


def track(root: Path, folder: Path) -> None:
    """`dvc add` the snapshot (cached, content-addressed), then stage its .dvc file and .gitignore in git, so
    that an experiment run aside from the workspace carries the snapshot."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.add(str(folder.resolve()))
    pointers = [str(folder.with_suffix(".dvc").relative_to(root)), str((folder.parent / ".gitignore").relative_to(root))]
    staged = subprocess.run(["git", "add", "--", *pointers], cwd=root, capture_output=True, text=True)
    if staged.returncode != 0:
        raise RuntimeError(f"git add {' '.join(pointers)} failed: {staged.stderr.strip()}")


def feedback_to_landing(root: Path) -> list[Path]:
    """One landing CSV per feedback part that holds edited texts with their source; returns the new files.

    Parts are never rewritten, so a part's file is the same bytes every time and a snapshot takes it once."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    ingest = load_params("ingest", root / "params.yaml")
    columns = require(ingest, "text", dict, "ingest")
    log_dir = root / require(load_params("monitor", root / "params.yaml"), "log_dir", str, "monitor")
    landing = root / require(ingest, "landing", str, "ingest") / "text"
    written = []
    for part in sorted(log_dir.glob("feedback-*.parquet")) if log_dir.is_dir() else []:
        target = landing / f"{part.stem}.csv"
        if target.exists():
            continue
        rows = pq.read_table(part, columns=["source", "edited_text"])
        rows = rows.filter(pc.and_(pc.is_valid(rows["source"]), pc.is_valid(rows["edited_text"])))
        if rows.num_rows == 0:
            continue
        names = [require(columns, "source_column", str, "ingest.text"), require(columns, "reference_column", str, "ingest.text")]
        landing.mkdir(parents=True, exist_ok=True)
        pacsv.write_csv(pa.table([rows["source"], rows["edited_text"]], names=names), target)
        written.append(target)
    if written:
        log.info("feedback: %d files of edited texts landed in %s", len(written), landing)
    return written


def snapshot(root: Path) -> Snapshot | None:
    """Snapshot the new files of params.yaml's `ingest.landing` into `ingest.landed`; None when nothing is new."""
    params = load_params("ingest", root / "params.yaml")
    landing = root / require(params, "landing", str, "ingest")
    landed = root / require(params, "landed", str, "ingest")
    files = new_files(landing, landed)
    if not files:
        return None
    name = hashlib.sha256("\n".join(sorted(stored.as_posix() for _, stored, _ in files)).encode()).hexdigest()[:16]
    target = landed / name
    for original, stored, _ in files:
        (target / stored).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(original, target / stored)
    write_json({stored.as_posix(): original.relative_to(landing).as_posix() for original, stored, _ in files}, target / MANIFEST)
    track(root, target)
    log.info("landing: %d new files snapshotted as %s", len(files), target)
    return Snapshot(name, target, len(files))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m monitoring.landing", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (params.yaml, dvc.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        feedback_to_landing(args.repo.resolve())
        taken = snapshot(args.repo.resolve())
    except (ConfigError, RuntimeError) as err:
        print(f"monitoring.landing: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"snapshot {taken.name}: {taken.files} new files in {taken.path}" if taken else "landing: nothing new to snapshot")


if __name__ == "__main__":
    main()
