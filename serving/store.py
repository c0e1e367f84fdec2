"""A shared model store: packaged Bentos, their models inside, exported as BentoML's own archives to a folder or
an fsspec URL, and the champion, which a serving box imports into its BentoML store.

    python -m serving.store export models/bento.json /mnt/shared/aigc [--champion]   # or s3://bucket/aigc, gs://, az://
    python -m serving.store import /mnt/shared/aigc [--bento <name>:<version> | --bento <version>]

The archives are content-addressed, like the tags the `package` stage gives (serving/package.py): a name says
what the file holds, so a file already there is never written again and an export only adds. One file is not:
champion.json names the Bento to serve, and only a promotion or a rollback moves it.

    <dest>/bentos/<name>-<version>.bento   `Bento.export`'s archive: the Bento and the models it pins
    <dest>/receipts/<version>.json         the package stage's receipt: the Bento's and models' tags
    <dest>/champion.json                   the promotion record's champion: what `import` takes by default

The package stage exports every Bento it builds, a retrain experiment's challenger included, and never touches
champion.json: a challenger the champion / challenger gate rejects is there, but no serving box takes it. The
champion is published by `python -m monitoring.promote` (a promotion, a rollback, the retrain flow and the
online A/B decision alike) when params `package.export_to` is set, or by hand with `export --champion`.

The Bento pins its models by Bento arguments (serving/service.py `served_models`), so BentoML counts them as
the Bento's models: its archive carries a copy of each, and importing it puts them in the serving box's store
($BENTOML_HOME) beside the Bento. One archive thus moves everything, and each model is stored once.

Every file is written under a temporary name and then renamed, the Bento first, champion.json last, so a reader
never finds a half-written archive or a receipt naming an archive that is not there yet. A failure to write
(an unreachable bucket, a full disk, no permission) is temporary (exit 75, which the flows retry). `import`
checks that the archive holds the receipt's Bento and models, leaves nothing in the store when it does not or
cannot be read, and prints the command that serves the Bento. URLs need the fsspec implementation of their
scheme installed (s3fs, gcsfs, adlfs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from components.common import ConfigError, DataError, TransientError, run_main

log = logging.getLogger(__name__)

CHAMPION = "champion.json"
"""The receipt of the Bento a serving box imports by default: the promotion record's champion."""
BENTO_EXT = "bento"
VERSION = r"[A-Za-z0-9][A-Za-z0-9._-]*"
TAG = re.compile(rf"^([a-z0-9][a-z0-9._-]*):({VERSION})$")
"""A BentoML tag with its version (`aigc-text:0123abcd`); the version also names files here, so no `/` or `..`."""


def split_tag(tag: str, what: str) -> tuple[str, str]:
    """(name, version) of a tag, or a DataError naming where the tag came from."""
    match = TAG.match(tag) if isinstance(tag, str) else None
    if match is None:
        raise DataError(f"{what}: {tag!r} is not a BentoML tag with a version (name:version)")
    return match.group(1), match.group(2)


def archive(tag: str, ext: str) -> str:
    """The archive's file name, as BentoML's export names it: `<name>-<version>.<ext>`."""
    name, version = tag.split(":")
    return f"{name}-{version}.{ext}"


def layout(receipt: dict[str, Any]) -> dict[str, str]:
    """Each file of one export, by what it holds (`bento`, `receipt`): its path under dest, in writing order."""
    version = receipt["bento"].split(":")[1]
    return {"bento": f"bentos/{archive(receipt['bento'], BENTO_EXT)}", "receipt": f"receipts/{version}.json"}


def store_home() -> str:
    return os.environ.get("BENTOML_HOME", "~/bentoml")


def stored_models() -> set[str]:
    """The tags of every model in the local BentoML store."""
    import bentoml

    return {str(model.tag) for model in bentoml.models.list()}


def packaged_bento(receipt: dict[str, Any]) -> Any:
    """The receipt's Bento from the local store, once it is sure the Bento pins the receipt's models and the store
    has them (`Bento.export` copies each into the archive, and would look elsewhere for a missing one)."""
    import bentoml

    try:
        bento = bentoml.get(receipt["bento"])
    except bentoml.exceptions.NotFound:
        bento = None
    missing = sorted(set(receipt["models"].values()) - stored_models())
    if bento is None or missing:
        what = ", ".join([*([receipt["bento"]] if bento is None else []), *missing])
        raise DataError(
            f"{what} not in the BentoML store {store_home()}; run the package stage with this BENTOML_HOME, or import "
            "the Bento into it (python -m serving.store import <store> --bento <tag>), first"
        )
    pinned = {str(model.tag) for model in bento.info.all_models}
    if not set(receipt["models"].values()) <= pinned:
        raise DataError(
            f"{bento.tag} pins {', '.join(sorted(pinned)) or 'no models'}, not the receipt's "
            f"{', '.join(sorted(receipt['models'].values()))}; rerun the package stage"
        )
    return bento


def check_receipt(data: Any, where: str) -> dict[str, Any]:
    """The receipt `{"models": {family: tag}, "bento": tag}`, or a DataError naming `where`."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict) or not data["models"] or "bento" not in data:
        raise DataError(f'{where}: not a package receipt ({{"models": {{family: tag}}, "bento": tag}}); rerun the package stage')
    for tag in [*data["models"].values(), data["bento"]]:
        split_tag(tag, where)
    return data


def read_receipt(path: Path) -> dict[str, Any]:
    """A receipt the package stage wrote (models/bento.json)."""
    try:
        return check_receipt(json.loads(path.read_text(encoding="utf-8")), str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: no such receipt; run the package stage first (dvc repro package)") from None
    except (OSError, ValueError) as err:  # JSONDecodeError included
        raise DataError(f"{path}: unreadable receipt ({err}); rerun the package stage") from None


def open_dest(dest: str) -> tuple[Any, str]:
    """The fsspec filesystem of a folder or URL and the root path in it."""
    import fsspec

    try:
        return fsspec.url_to_fs(dest)
    except ImportError as err:  # the scheme's implementation (s3fs, gcsfs, adlfs) is not installed
        raise ConfigError(f"{dest}: {err}") from None
    except ValueError as err:  # an unknown scheme
        raise ConfigError(f"{dest}: not a folder or a URL fsspec knows ({err})") from None


def url(fs: Any, path: str) -> str:
    """How BentoML and the messages name a path: a local one as a plain path, else as a URL."""
    if "file" in fs.protocol:
        return path
    # `scheme://` + the path without a leading `/`: BentoML rebuilds a URL with urlunsplit, which turns the
    # `memory:///x` of a host-less scheme into `memory:/x`, a local path to fsspec. `s3://bucket/x` is unchanged.
    scheme = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
    return f"{scheme}://{path.lstrip('/')}"


def put_atomically(fs: Any, path: str, write: Callable[[str], None]) -> None:
    """Have `write` write a temporary file beside `path` (given its URL), then rename it to `path`: a reader, or
    an export interrupted halfway, never leaves a partial file under the final, content-addressed name."""
    folder, _, name = path.rpartition("/")
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.partial-{uuid.uuid4().hex[:8]}-{name}"  # keeps the extension BentoML reads the format from
    try:
        write(url(fs, temporary))
        fs.mv(temporary, path)
    finally:
        if fs.exists(temporary):
            fs.rm(temporary)


def write_text(fs: Any, path: str, text: str) -> None:
    def write(to: str) -> None:
        with fs.open(to, "w", encoding="utf-8") as fh:
            fh.write(text)

    put_atomically(fs, path, write)


def export(receipt: dict[str, Any], dest: str, champion: bool = False) -> list[str]:
    """Write the receipt's Bento with its models (from the local BentoML store) and the receipt to `dest`; files
    already there are left alone. With `champion`, then make the receipt champion.json, what serving boxes import.
    Returns the paths written, relative to dest. A failure to write is a TransientError (retry it)."""
    check_receipt(receipt, "receipt")
    fs, root = open_dest(dest)
    root = root.rstrip("/")
    receipt_text = json.dumps(receipt, indent=2, sort_keys=True) + "\n"
    written = []
    try:
        for what, relative in layout(receipt).items():
            path = f"{root}/{relative}"
            if fs.exists(path):
                log.info("%s: already there", relative)
                continue
            if what == "receipt":
                write_text(fs, path, receipt_text)
            else:
                put_atomically(fs, path, packaged_bento(receipt).export)
            log.info("%s: written", relative)
            written.append(relative)
        path = f"{root}/{CHAMPION}"
        if champion and (not fs.exists(path) or fs.cat_file(path).decode("utf-8") != receipt_text):
            write_text(fs, path, receipt_text)  # last: it only ever names an archive that is there
            log.info("%s: %s", CHAMPION, receipt["bento"])
            written.append(CHAMPION)
    except OSError as err:  # PermissionError, a full disk, an unreachable bucket, a file where a folder should be
        raise TransientError(
            f"{dest}: cannot write the shared model store ({type(err).__name__}: {err}); check the path, its space and "
            "its permissions, then export again"
        ) from None
    log.info("exported %s to %s%s", receipt["bento"], dest, " as the champion" if champion else "")
    return written


def destination(params: dict[str, Any]) -> str | None:
    """The shared model store params `package.export_to` names (a folder or URL), or None: none."""
    if "export_to" not in params:
        raise ConfigError("missing params key 'package.export_to' (a folder or URL to export to, or null)")
    value = params["export_to"]
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(f"params key 'package.export_to' must be a folder or URL, or null; got {value!r}")
    return value


def exported_versions(fs: Any, root: str) -> list[str]:
    return sorted(Path(p).stem for p in fs.glob(f"{root}/receipts/*.json"))


def wanted_receipt(fs: Any, root: str, dest: str, bento: str | None) -> dict[str, Any]:
    """The receipt of the Bento to import: `bento`'s (`name:version`, or a bare version: the name is the store's
    receipt's), else champion.json's."""
    known = ", ".join(exported_versions(fs, root)) or "none"
    if bento is None:
        path = f"{root}/{CHAMPION}"
        missing = (
            f"{dest}: nothing promoted to this store yet (no {CHAMPION}); promote a receipt with "
            f"`python -m monitoring.promote` (with params package.export_to set) or name one with --bento "
            f"(versions there: {known})"
        )
    else:
        given = TAG.match(bento) or re.fullmatch(f"()({VERSION})", bento)  # a bare version: the receipt names the Bento
        if given is None:
            raise ConfigError(f"--bento {bento!r}: give <name>:<version> or a version (versions in {dest}: {known})")
        version = given.group(2)
        path = f"{root}/receipts/{version}.json"
        missing = f"{dest}: no Bento {bento} exported there (versions there: {known}); run the export for it first"
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        raise DataError(missing) from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{url(fs, path)}: unreadable ({err})") from None
    try:
        receipt = check_receipt(json.loads(text), url(fs, path))
    except ValueError as err:
        raise DataError(f"{url(fs, path)}: not JSON ({err}); export the Bento again") from None
    if bento is not None and ":" in bento and receipt["bento"] != bento:
        raise DataError(f"{url(fs, path)}: names {receipt['bento']}, not {bento}; export the Bento again")
    if bento is not None and ":" not in bento and split_tag(receipt["bento"], url(fs, path))[1] != bento:
        raise DataError(f"{url(fs, path)}: names {receipt['bento']}, not version {bento}; export the Bento again")
    return receipt


def discard(bento: str | None, models: set[str]) -> None:
    """Remove from the local store a Bento and models one import brought, so that it leaves nothing behind."""
    import bentoml

    if bento is not None:
        bentoml.bentos.delete(bento)
    for tag in sorted(models):
        bentoml.models.delete(tag)


def import_bento(where: str, receipt: dict[str, Any]) -> None:
    """Import the receipt's Bento archive, and with it the models it carries, into the local store. A broken archive,
    or one that is not what the receipt pins, leaves nothing there: BentoML unpacks an archive whole before it
    stores anything, and what it stored of a wrong or failed one is removed here."""
    import bentoml

    tag, before = receipt["bento"], stored_models()
    try:
        bento = bentoml.import_bento(where)
    except FileNotFoundError:
        raise DataError(f"{where}: missing from the shared model store; export {tag} again") from None
    except Exception as err:  # tarfile, lzma, yaml, cattrs or BentoML: each says the archive is unusable
        discard(None, stored_models() - before)  # models stored before the Bento itself failed to copy
        raise DataError(f"{where}: unreadable archive ({type(err).__name__}: {err}); delete it and export {tag} again") from None
    brought = stored_models() - before
    missing = sorted(set(receipt["models"].values()) - before - brought)
    if str(bento.tag) != tag or missing:  # a renamed or misplaced archive: not what the receipt pins
        discard(str(bento.tag), brought)
        holds = f"holds {bento.tag}" if str(bento.tag) != tag else f"lacks the models {', '.join(missing)}"
        raise DataError(f"{where}: {holds}, not what receipt {tag} names; delete it and export {tag} again")
    log.info("imported %s and its models %s from %s", tag, ", ".join(sorted(brought)) or "(all in the store already)", where)


def import_(dest: str, bento: str | None = None) -> str:
    """Import a Bento (the given `<name>:<version>` or version, else champion.json's: the promoted one) and its
    models from `dest` into the local BentoML store, unless the store has it already. Returns the Bento's tag."""
    import bentoml

    fs, root = open_dest(dest)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise DataError(f"{dest}: no such shared model store; give the folder or URL `python -m serving.store export` wrote to")
    receipt = wanted_receipt(fs, root, dest, bento)
    tag, missing = receipt["bento"], sorted(set(receipt["models"].values()) - stored_models())
    try:
        bentoml.get(tag)
    except bentoml.exceptions.NotFound:  # not imported yet
        import_bento(url(fs, f"{root}/{layout(receipt)['bento']}"), receipt)
        return str(tag)
    if missing:  # only a whole Bento archive can be imported, and BentoML will not store a Bento twice
        raise DataError(
            f"{tag} is in the BentoML store {store_home()} but its models {', '.join(missing)} are not; "
            f"`bentoml delete {tag}` and import again"
        )
    log.info("%s and its models: already in the store", tag)
    return str(tag)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.store", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("export", help="write a receipt's Bento (its models inside) to a shared model store")
    out.add_argument("receipt", type=Path, help="the package stage's receipt (models/bento.json)")
    out.add_argument("dest", help="a folder or URL (s3://bucket/aigc, ...)")
    out.add_argument(
        "--champion", action="store_true",
        help=f"then make it the store's {CHAMPION}, what serving boxes import (promotions do this themselves)",
    )  # fmt: skip
    into = commands.add_parser("import", help="bring a Bento and its models from a shared model store into $BENTOML_HOME")
    into.add_argument("dest", help="the folder or URL exported to")
    into.add_argument(
        "--bento", default=None, help=f"<name>:<version> or a version to import (default: the promoted one, {CHAMPION})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        if args.command == "export":
            export(read_receipt(args.receipt), args.dest, champion=args.champion)
        else:
            print(f"bentoml serve {import_(args.dest, args.bento)}")

    run_main(body)


if __name__ == "__main__":
    main()
