"""Stage `package`: the pipeline's models into BentoML's model store, then a Bento from `bentofile.yaml`.

    python -m serving.package models/text models/image models/restore models/diffusion --out models/bento.json

Each model folder is imported as `aigc-<family>:<hash of its files>` with labels: its headline metrics, the
hash of the params and of the data that produced it, and the git revision. With `--compressed
models/compressed`, each family's compressed copy (the `compress` stage's) is imported too, labelled with its
method, size ratio and the metrics its evaluation measured for it; the receipt lists those tags under
`compressed`, the Bento ships them, and the service serves them with AIGC_COMPRESSED=1. A folder whose content is
already in the store is not imported again, so a rerun adds nothing. Then the Bento is built from
`serving/bentofile.yaml` (offline: no package locking, nothing downloaded) as
`aigc-pipeline:<hash of the model tags and the shipped code>`, pinned to these models by Bento arguments,
and the receipt lists the tags. Tags are content hashes, not BentoML's time-based ids, so the receipt that
DVC tracks is the same on every machine that packages the same models and code. The store is BentoML's
(`$BENTOML_HOME`, default `~/bentoml`).

With params `package.export_to` (or `--export-to`) set to a folder or URL, the Bento and its models are then
exported there as BentoML archives (serving/store.py); a rerun on a store that holds them already only exports.
The export only adds archives: what a serving box imports (`python -m serving.store import <it>`) is the
champion that promotion publishes there, never what was packaged last (a retrain experiment packages, and
exports, its challenger before the gate has decided).

Packaging serves nothing: the service serves the promotion record's champion (serving/promoted.py), so a
retrain experiment can package its challenger without touching what is served. `python -m monitoring.promote`
makes a receipt the champion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import PARAMS_FILE, ConfigError, DataError, load_params, run_main, write_json
from components.metrics import HEADLINE, evaluation_stage
from components.pipeline import stage
from serving import store
from serving.promoted import FAMILIES

log = logging.getLogger(__name__)


def content_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def bento_name(bentofile: Path) -> str:
    import yaml

    return str(yaml.safe_load(bentofile.read_text(encoding="utf-8"))["name"])


def bento_version(model_tags: dict[str, str], bentofile: Path, root: Path) -> str:
    """A content hash of what the Bento holds: the model tags, the bentofile and every file it includes."""
    import yaml

    digest = hashlib.sha256(json.dumps(model_tags, sort_keys=True).encode())
    digest.update(bentofile.read_bytes())
    for pattern in yaml.safe_load(bentofile.read_text(encoding="utf-8")).get("include", []):
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def model_labels(family: str, folder: Path, root: Path) -> dict[str, str]:
    """Labels of one model: headline metrics, params / data hashes, git revision, content hash; for a compressed
    copy (compression.json), its method, size ratio and the headline metrics its evaluation measured for it."""
    from components.compression import compression_of
    from serving.inference import model_provenance

    labels = {"family": family, "content_hash": content_hash(folder), "git_revision": git_revision(root)}
    labels.update(model_provenance(folder))
    compression = compression_of(folder)
    if compression is not None:
        labels.update(compression=compression["method"], size_ratio=str(compression["size_ratio"]))
    metrics_path = root / stage(evaluation_stage(family), root).only_metrics()
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        if compression is not None:
            metrics = metrics.get("compressed") or {}
        labels.update({key: str(metrics[key]) for key in HEADLINE[family] if metrics.get(key) is not None})
    return labels


def import_model(family: str, folder: Path, root: Path) -> str:
    """Tag of `aigc-<family>` holding folder's content: the existing one if the store has it, else a new one.
    A compressed copy is a model of its family too, with its own content hash."""
    import shutil

    import bentoml

    from components.model_io import PICKLE_SUFFIXES

    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise DataError(f"{folder}: no model here (run the {family} training stage first)")
    pickles = [p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ConfigError(f"{folder}: refusing to package pickle files {pickles}")
    labels = model_labels(family, folder, root)
    tag = bentoml.Tag(f"aigc-{family}", labels["content_hash"])
    try:
        existing = bentoml.models.get(tag)
        log.info("%s: already in the store as %s", folder, existing.tag)
        return str(existing.tag)
    except bentoml.exceptions.NotFound:  # not imported yet
        pass
    try:
        with bentoml.models.create(tag, labels=labels, metadata={"source": str(folder)}) as model:
            for path in folder.iterdir():
                if path.is_file():
                    shutil.copy2(path, Path(model.path) / path.name)
    except bentoml.exceptions.BentoMLException as err:
        if not saved_meanwhile(err):
            raise
        log.info("%s: imported meanwhile by another package run as %s", folder, tag)
        return str(bentoml.models.get(tag).tag)
    log.info("%s: imported as %s", folder, model.tag)
    return str(model.tag)


def saved_meanwhile(err: Exception) -> bool:
    """Whether BentoML refused to save an item because another process saved the same tag since we looked:
    two package runs on one store (parallel experiments) with the same content, hence the same tag."""
    return "already exists" in str(err)


def package(folders: dict[str, Path], root: Path, bentofile: Path, out: Path, compressed: Path | None = None) -> dict[str, Any]:
    """Import the models (and the compressed copies in `compressed/<family>`, when given), build the Bento,
    write the receipt; returns it."""
    import bentoml

    tags = {family: import_model(family, folder, root) for family, folder in folders.items()}
    compressed_tags = {} if compressed is None else {f: import_model(f, compressed / f, root) for f in folders}
    arguments = {f"{family}_model": tag for family, tag in tags.items()}
    arguments |= {f"{family}_compressed_model": tag for family, tag in compressed_tags.items()}
    version = bento_version(arguments, bentofile, root)
    try:
        bento = bentoml.get(f"{bento_name(bentofile)}:{version}")
        log.info("the Bento is already in the store as %s", bento.tag)
    except bentoml.exceptions.NotFound:
        # Pinned by Bento arguments: the Bento serves these models wherever it runs, whatever else the store holds.
        try:
            bento = bentoml.bentos.build_bentofile(
                str(bentofile), build_ctx=str(root), version=version, labels={"git_revision": git_revision(root)},
                args=arguments,
            )  # fmt: skip
        except bentoml.exceptions.BentoMLException as err:
            if not saved_meanwhile(err):
                raise
            bento = bentoml.get(f"{bento_name(bentofile)}:{version}")
            log.info("the Bento was built meanwhile by another package run as %s", bento.tag)
    receipt = {"models": tags, "bento": str(bento.tag)} | ({"compressed": compressed_tags} if compressed_tags else {})
    write_json(receipt, out)
    log.info("built %s with %s", bento.tag, ", ".join(tags.values()))
    return receipt


@dataclass(frozen=True)
class PackageConfig:
    """params.yaml's `package` section: where each packaged Bento is exported (None: nowhere)."""

    export_to: str | None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PackageConfig:
        return cls(store.destination(params))


CONFIG = PackageConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.package", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for family in FAMILIES:
        parser.add_argument(family, type=Path, help=f"{family} model folder (models/{family})")
    parser.add_argument("--compressed", type=Path, default=None, help="folder of compressed copies (models/compressed)")
    parser.add_argument("--bentofile", type=Path, default=Path("serving/bentofile.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (metrics/, git)")
    parser.add_argument("--out", type=Path, required=True, help="receipt JSON to write (models/bento.json)")
    parser.add_argument("--params", type=Path, default=Path(PARAMS_FILE), help="params file (its `package` section)")
    parser.add_argument("--export-to", default=None, help="folder or URL to export to (default: params package.export_to)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        config = PackageConfig.from_params(load_params("package", args.params))  # checked before anything is built
        dest = args.export_to if args.export_to is not None else config.export_to
        receipt = package({f: getattr(args, f) for f in FAMILIES}, args.root, args.bentofile, args.out, args.compressed)
        if dest is not None:
            store.export(receipt, dest)  # archives only: champion.json moves with promotions (monitoring/promote.py)

    run_main(body)


if __name__ == "__main__":
    main()
