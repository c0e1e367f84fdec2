"""Helpers every stage shares: params, errors with exit codes, stable hashing, safe paths, progress.

Only the standard library and yaml are imported here: training stages import this on a GPU machine that has
torch and transformers but no pyarrow, Prefect, DVC or Great Expectations. Parquet helpers live in
components.tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"

# sysexits.h codes: the flow retries only what could be transient, never bad data or bad config.
EX_DATAERR = 65
EX_CONFIG = 78

DATASETS = ("text", "images", "restore")
"""The three embedded datasets: data-to-text copy, labelled images to generate, photos to restore."""

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {
    **{name: name for name in SPLITS},
    **dict.fromkeys(("training",), "train"),
    **dict.fromkeys(("valid", "validation", "dev", "development"), "val"),
    **dict.fromkeys(("testing",), "test"),
}
"""Split names a user's split column or split files may use (case-insensitive), and the split each means."""
SPLIT_FILE = "split.json"
"""How the clean stage split the text (`by`, `group`, counts): in the clean and text features folders."""


class ConfigError(ValueError):
    """A params value is missing or invalid; the message names the key."""


class DataError(RuntimeError):
    """The input data cannot be processed as configured (missing columns, empty file, too much quarantined)."""


def load_params(section: str, path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    """Read one top-level section of params.yaml, with `base` merged in under the key `base`.

    Args:
        section: the stage's own section (`ingest`, `clean`, ...).
        path: the params file; dvc.yaml runs stages from the repo root, so the default is relative.
    """
    params_path = Path(path)
    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path.resolve()}")
    with params_path.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if section not in params:
        raise ConfigError(f"params.yaml has no section '{section}'")
    return {**params[section], "base": params.get("base", {})}


def require(
    mapping: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    prefix: str,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """Return mapping[key] checked against `kind` (and, for numbers, [low, high]), or raise a ConfigError
    naming `prefix.key`."""
    if key not in mapping:
        raise ConfigError(f"missing params key '{prefix}.{key}'")
    value = mapping[key]
    if kind is int or kind == (int, float):
        # yaml reads `true` as a bool, which Python counts as an int: never a valid size or ratio here.
        numeric, noun = ((int,), "an integer") if kind is int else ((int, float), "a number")
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(f"params key '{prefix}.{key}' must be {noun}, got {value!r}")
        check_range(value, f"{prefix}.{key}", low, high)
        return value
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"params key '{prefix}.{key}' must be {expected}, got {value!r}")
    return value


def check_range(value: float, key: str, low: float | None = None, high: float | None = None) -> None:
    """Raise a ConfigError naming `key` when value is outside [low, high]."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"params key '{key}' = {value!r} is outside {bounds}")


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def unit_interval(text: str, seed: int) -> float:
    """Map `text` to a stable pseudo-random float in [0, 1), salted by `seed`."""
    return stable_hash(f"{seed}:{text}") / 2.0**64


def assign_splits(keys: list[str], fractions: dict[str, float], seed: int) -> list[str]:
    """Split by a hash of each key, so a key's split never depends on the other keys.

    Equal keys always land in the same split. When a split comes out empty although there are at least as
    many distinct keys as splits, the key whose hash lies nearest that split's interval moves there, so
    small sets (a dozen photos) still get a test image.

    Args:
        keys: the grouping key of each row (e.g. the canonical source record).
        fractions: split name -> fraction, in order; fractions sum to 1.
        seed: salts the hash so a different seed gives a different split.
    """
    names = list(fractions)
    bounds: list[tuple[str, float, float]] = []
    start = 0.0
    for name in names:
        bounds.append((name, start, start + fractions[name]))
        start += fractions[name]
    distinct = sorted(set(keys))
    position = {key: unit_interval(key, seed) for key in distinct}

    def split_of(u: float) -> str:
        for name, low, high in bounds:
            if low <= u < high:
                return name
        return names[-1]

    assigned = {key: split_of(u) for key, u in position.items()}
    if len(distinct) >= len(names):
        for name, low, high in bounds:
            if fractions[name] <= 0 or name in assigned.values():
                continue
            counts = {n: sum(1 for s in assigned.values() if s == n) for n in names}
            donors = [k for k in distinct if counts[assigned[k]] > 1]
            centre = (low + high) / 2
            nearest = min(donors, key=lambda k: abs(position[k] - centre))
            assigned[nearest] = name
    return [assigned[key] for key in keys]


def write_json(data: Any, path: Path) -> None:
    """Write pretty JSON atomically (metrics files are read by DVC while other stages run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def resolve_inside(root: Path, candidate: Path) -> Path | None:
    """Return candidate's real path if it stays inside root's real path, else None (symlink or `..` escape)."""
    real_root = root.resolve()
    real = (root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
    return real if real == real_root or real_root in real.parents else None


def run_main(body: Callable[[], None]) -> None:
    """Run a stage's main body: log to stderr, turn known errors into one clear line and a sysexits code."""
    logging.basicConfig(
        level=os.environ.get("AIGC_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(EX_CONFIG) from err
    except DataError as err:
        log.error("data error: %s", err)
        raise SystemExit(EX_DATAERR) from err


def progress(iterable: Iterable[Any], silent: bool = False, **kwargs: Any) -> Any:
    """tqdm on a terminal, quiet in CI logs and DVC's captured output unless AIGC_PROGRESS=1 asks for it."""
    from tqdm.auto import tqdm

    disable = silent or (not sys.stderr.isatty() and os.environ.get("AIGC_PROGRESS") != "1")
    return tqdm(iterable, disable=disable, **kwargs)
